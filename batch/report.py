"""`batch report`: one HTML page to look at an output's predictions, where `batch summary` counts them.

The page is self-contained (styles and thumbnails inlined, no script, nothing fetched: its
Content-Security-Policy forbids both), so it can be mailed or opened from a cluster's file system.
Its size does not grow with the output: every aggregate is a DuckDB query over the parts, out of core
like the summary's, and only samples are drawn: the top LABELS_SHOWN labels, PER_LABEL thumbnails of
each of the GRID_LABELS most frequent (picked by a hash of the path, so an output always gives the same
page), the LEAST_CONFIDENT rows, ERROR_EXAMPLES paths per error kind. That is 72 thumbnails of at most
THUMBNAIL_BYTES: under 0.8 MB as base64, whatever the row count. Thumbnails are made only of files
that decoded when they were classified; one that has gone or changed since gets a placeholder saying why.
An image inside a tar or Parquet file is read from it as `classify` read it (`containers.locate`, then
its `Reader`), each container listed once for all the cards.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import stat
import tempfile
from collections import Counter, defaultdict
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from itertools import chain
from typing import Any, BinaryIO, Callable, Iterable

import duckdb
from PIL import Image, ImageOps, UnidentifiedImageError

from batch import containers, transient
from batch.commit import list_parts
from batch.decode import to_rgb
from batch.spill import Budget
from batch.summary import Throughput
from batch.writer import read_record

LABELS_SHOWN = 30
GRID_LABELS = 8
PER_LABEL = 6
LEAST_CONFIDENT = 24
ERROR_KINDS = 30
ERROR_EXAMPLES = 3
THUMBNAIL = 96  # px, the longer side
QUALITY = 70  # JPEG with subsampled colour: pure noise, the costliest picture, makes 5.8 KB at 96 px
THUMBNAIL_BYTES = 8_000  # the bound tests/test_report.py holds it to
VALUES_SHOWN = 5  # distinct values of one provenance field (hosts, job ids...)
NOT_SHOWN = {"labels", "shard", "slurm_array_task_id"}  # the class list, and what differs in every task
PICTURE_COLUMNS = "path, path_bytes, label, score"
Thumbnail = tuple[str | None, str]  # a JPEG data URI, or None and why there is none


@dataclass(frozen=True)
class Picture:
    """One row shown as a card: its name, exact name, prediction and a line of detail."""

    path: str
    path_bytes: bytes | None
    label: str | None
    score: float | None
    detail: str = ""

    @property
    def name(self) -> str:
        """The exact name, as `os` takes it."""
        return self.path if self.path_bytes is None else os.fsdecode(self.path_bytes)


def write_report(output: str, target: str, title: str | None = None, budget: Budget | None = None) -> str:
    """Write the page for OUTPUT to TARGET atomically; a line saying what was written. Raises ValueError
    naming the problem (no parts, a target folder that cannot be written) before any work."""
    parts = [part.path for part in list_parts(output)]
    if not parts:
        raise ValueError(f"{output}: no committed results (part-*.parquet) to report on")
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {target}: {folder} is not a writable folder")
    page = render(output, parts, title or f"batch report: {output}", budget or Budget.of())
    _replace(target, page.encode())
    return f"wrote {target} ({len(page) / 1e6:.2f} MB, {page.count('<img ')} thumbnails)"


def render(output: str, parts: list[str], title: str, budget: Budget) -> str:
    records = [read_record(path) for path in parts]
    with budget.connect() as connection:
        query = _Query(connection, parts)
        labels = dict(query.rows("SELECT label, count(*) FROM parts GROUP BY label"))
        errors = labels.pop(None, 0)
        ranked = sorted(labels.items(), key=lambda item: (-item[1], item[0]))
        rows = sum(labels.values()) + errors
        examples = _examples(query, [label for label, _ in ranked[:GRID_LABELS]])
        least_confident = _least_confident(query)
        shown = thumbnails([picture.name for picture in chain(*examples.values(), least_confident)])
        body = [
            f"<h1>{_text(title)}</h1>",
            _overview(output, rows, errors, len(labels), records),
            _section("Labels", _label_chart(ranked, rows)),
            _section("Confidence of the top label", _confidence(query)),
            _section("Examples of the most frequent labels", _example_grids(examples, shown)),
            _section(f"The {LEAST_CONFIDENT} least confident predictions",
                     _grid(least_confident, shown) if least_confident else "<p>No predictions.</p>"),
            _section("Errors by kind", _errors(query, errors)),
            _section("Provenance", _provenance(records)),
            _section("Throughput", _throughput(Throughput.of(records))),
        ]
    return PAGE.format(title=_text(title), body="\n".join(body))


class _Query:
    """SQL over the parts, which the statements name `parts`."""

    def __init__(self, connection: duckdb.DuckDBPyConnection, parts: list[str]):
        self.connection, self.parts = connection, parts

    def rows(self, sql: str, **parameters: Any) -> list[tuple]:
        sql = sql.replace("FROM parts", "FROM read_parquet($parts)")
        return self.connection.execute(sql, {"parts": self.parts, **parameters}).fetchall()


def _overview(output: str, rows: int, errors: int, labels: int, records: list[dict]) -> str:
    shards = {tuple(record.get("provenance", {}).get("shard", {}).get("buckets", ())) for record in records}
    identities = [record.get("identity", {}) for record in records]
    models = Counter(f"{identity.get('model')} ({identity.get('weights')})" for identity in identities)  # name, source
    return (f"<p class=overview>{_text(output)}: <b>{rows:,}</b> rows in {len(records):,} parts from {len(shards):,} shards; "
            f"<b>{errors:,}</b> errors ({_share(errors, rows)}); {labels:,} distinct labels; "
            f"model {', '.join(_text(name) for name in models)}.</p>")  # fmt: skip


def _label_chart(ranked: list[tuple[str, int]], rows: int) -> str:
    if not ranked:
        return "<p>No row has a label: every input failed.</p>"
    shown = ranked[:LABELS_SHOWN]
    rest = sum(count for _, count in ranked[LABELS_SHOWN:])
    note = f"<p class=note>and {rest:,} rows under {len(ranked) - len(shown):,} other labels</p>" if rest else ""
    return _bars(shown, rows) + note


def _confidence(query: _Query) -> str:
    bins = dict(query.rows("SELECT least(greatest(floor(score * 10), 0), 9)::INT AS bin, count(*) FROM parts "
                           "WHERE score IS NOT NULL GROUP BY bin"))  # fmt: skip
    if not bins:
        return "<p>No scores.</p>"
    return _bars([(f"{bin / 10:.1f} to {(bin + 1) / 10:.1f}", bins.get(bin, 0)) for bin in range(10)], sum(bins.values()))


def _bars(counts: list[tuple[str, int]], total: int) -> str:
    """A bar per (name, count), each with its count in text; widths relative to the largest."""
    largest = max(count for _, count in counts) or 1
    return "<div class=bars>" + "".join(
        f"<div class=bar><span class=name>{_text(name)}</span><span class=track><span class=fill "
        f"style='width:{100 * count / largest:.1f}%'></span></span><span class=count>{count:,}</span>"
        f"<span class=share>{_share(count, total)}</span></div>"
        for name, count in counts
    ) + "</div>"  # fmt: skip


def _examples(query: _Query, labels: list[str]) -> dict[str, list[Picture]]:
    """PER_LABEL rows of each label, in the labels' order."""
    picked = dict(query.rows(f"SELECT label, min_by(({PICTURE_COLUMNS}), hash(path), $n) FROM parts "
                             "WHERE list_contains($labels, label) GROUP BY label", n=PER_LABEL, labels=labels))  # fmt: skip
    return {label: [Picture(*row) for row in picked[label]] for label in labels}


def _example_grids(examples: dict[str, list[Picture]], shown: dict[str, Thumbnail]) -> str:
    if not examples:
        return "<p>No labels.</p>"
    grids = [f"<h3>{_text(label)}</h3>" + _grid(pictures, shown) for label, pictures in examples.items()]
    return f"<p class=note>{PER_LABEL} rows of each, picked by a hash of the path.</p>" + "".join(grids)


def _least_confident(query: _Query) -> list[Picture]:
    rows = query.rows(f"SELECT {PICTURE_COLUMNS}, topk_labels[2], topk_scores[2] FROM parts WHERE score IS NOT NULL "
                      "ORDER BY score, path LIMIT $n", n=LEAST_CONFIDENT)  # fmt: skip
    return [Picture(*row[:4], detail=f"then {row[4]} {row[5]:.3f}" if row[4] is not None else "") for row in rows]


def _grid(pictures: Iterable[Picture], shown: dict[str, Thumbnail]) -> str:
    return "<div class=grid>" + "".join(_card(picture, shown[picture.name]) for picture in pictures) + "</div>"


def _card(picture: Picture, thumbnail: Thumbnail) -> str:
    uri, reason = thumbnail
    shown = f"<img src='{uri}' alt=''>" if uri else f"<span class=placeholder>{_text(reason)}</span>"
    score = f" {picture.score:.3f}" if picture.score is not None else ""
    detail = f"<span class=detail>{_text(picture.detail)}</span>" if picture.detail else ""
    return (f"<figure class=card><div class=picture>{shown}</div><figcaption>"
            f"<span class=label>{_text(picture.label or '')}{score}</span>{detail}"
            f"<span class=path>{_text(picture.path)}</span></figcaption></figure>")  # fmt: skip


def thumbnails(names: list[str]) -> dict[str, Thumbnail]:
    """Each name's thumbnail. Members of tars and Parquet files are read first, container by container."""
    with closing(containers.Reader()) as reader:
        shown = {member.path: thumbnail(partial(reader.open, member)) for member in containers.locate(names)}
    return shown | {name: thumbnail(partial(_open, name)) for name in dict.fromkeys(names) if name not in shown}


def thumbnail(opened: Callable[[], BinaryIO]) -> Thumbnail:
    """A JPEG of at most THUMBNAIL px a side of the picture `opened()` gives, or None and why there is none."""
    try:
        with opened() as handle, Image.open(handle) as image:
            image.draft("RGB", (THUMBNAIL, THUMBNAIL))  # JPEGs decode at reduced scale: a 24 Mpx photo costs little
            small = to_rgb(ImageOps.exif_transpose(image))
            small.thumbnail((THUMBNAIL, THUMBNAIL))
    except FileNotFoundError:
        return None, "file gone"
    except PermissionError:
        return None, "unreadable"
    except (NotADirectoryError, _NotAFile):
        return None, "not a plain file"
    except UnidentifiedImageError:
        return None, "no longer an image"
    except containers.MemberError as error:
        return None, str(error)[:80]
    except Exception as error:  # noqa: BLE001 - Pillow's plugins raise anything on bytes changed since
        return None, f"cannot decode: {error}"[:80]
    encoded = io.BytesIO()
    small.save(encoded, "JPEG", quality=QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(encoded.getvalue()).decode(), ""


class _NotAFile(OSError):
    """A folder, FIFO or device where the picture was."""


def _open(name: str) -> BinaryIO:
    """A plain file, opened without blocking, so a FIFO put in a picture's place is refused, not waited on."""
    descriptor = os.open(name, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise _NotAFile(name)
    return open(descriptor, "rb")


def _errors(query: _Query, errors: int) -> str:
    if not errors:
        return "<p>None: every input was classified.</p>"
    kinds = query.rows("SELECT split_part(error, ':', 1) AS kind, count(*) AS n, min_by((path, error), path, $n), "
                       "count(*) OVER () FROM parts WHERE error IS NOT NULL GROUP BY kind ORDER BY n DESC, kind LIMIT $kinds",
                       n=ERROR_EXAMPLES, kinds=ERROR_KINDS)  # fmt: skip
    more = f"<p class=note>and {kinds[0][3] - len(kinds)} other kinds</p>" if kinds[0][3] > len(kinds) else ""
    rows = "".join(
        f"<tr><td class=kind>{_text(kind)}{_transient_note(kind)}</td><td class=count>{count:,}</td><td><ul>"
        + "".join(f"<li><span class=path>{_text(path)}</span>: {_text(error)}</li>" for path, error in examples)
        + "</ul></td></tr>"
        for kind, count, examples, _ in kinds
    )  # fmt: skip
    return f"<table class=errors><tr><th>kind</th><th>rows</th><th>examples</th></tr>{rows}</table>{more}"


def _transient_note(kind: str) -> str:
    return f"<p class=note>{_text(transient.REDO)}</p>" if kind == transient.KIND else ""


def _provenance(records: list[dict]) -> str:
    """Each field of the parts' identity and provenance with its distinct values and how many parts have each."""
    values: dict[str, Counter[str]] = defaultdict(Counter)
    for record in records:
        for section in ("identity", "provenance"):
            for key, value in (record.get(section) or {}).items():
                if key not in NOT_SHOWN:
                    values[key][value if isinstance(value, str) else json.dumps(value, sort_keys=True)] += 1
    rows = []
    for key, counts in values.items():
        shown = [f"{_text(value)}" + (f" <span class=note>({count:,} parts)</span>" if len(counts) > 1 else "")
                 for value, count in counts.most_common(VALUES_SHOWN)]  # fmt: skip
        if len(counts) > VALUES_SHOWN:
            shown.append(f"<span class=note>and {len(counts) - VALUES_SHOWN:,} more</span>")
        rows.append(f"<tr><th>{_text(key)}</th><td>{'<br>'.join(shown)}</td></tr>")
    return f"<table class=provenance>{''.join(rows)}</table>"


def _throughput(speed: Throughput) -> str:
    lines = [f"{speed.rows:,} rows committed in {speed.busy:,.0f} s of task time"]
    if speed.per_task:
        lines.append(f"<b>{speed.per_task:,.1f}</b> images/s per task")
    if speed.overall:
        lines.append(f"<b>{speed.overall:,.1f}</b> images/s overall, {speed.wall:,.0f} s from "
                     f"{speed.started:%Y-%m-%d %H:%M:%S} to {speed.committed:%Y-%m-%d %H:%M:%S} UTC")  # fmt: skip
    lines.append("devices: " + ", ".join(f"{_text(str(name))} ({count:,} parts)" for name, count in speed.devices.most_common()))
    return "<ul class=throughput>" + "".join(f"<li>{line}</li>" for line in lines) + "</ul>"


def _section(heading: str, content: str) -> str:
    return f"<section><h2>{_text(heading)}</h2>{content}</section>"


def _share(count: int, total: int) -> str:
    return f"{100 * count / total:.1f}%" if total else "-"


def _text(value: str) -> str:
    """Paths, labels and error texts are the user's data: never markup."""
    return html.escape(value, quote=True)


def _replace(target: str, content: bytes) -> None:
    """Write beside TARGET and rename over it, so a reader never sees half a page; mode as `open` would give."""
    handle, staging = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(target)), prefix=".report-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(content)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o666 & ~umask)
        os.replace(staging, target)
    except BaseException:
        os.unlink(staging)
        raise


PAGE = """<!doctype html>
<html lang=en><head><meta charset=utf-8>
<meta http-equiv=Content-Security-Policy content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }}
h2 {{ border-bottom: 1px solid #ccc; margin-top: 1.6em; }}
h3 {{ margin: 1em 0 .3em; font-size: 1em; }}
.note {{ color: #666; }}
.bar {{ display: grid; grid-template-columns: 16em 1fr 7em 4em; gap: .6em; align-items: center; }}
.bar .name {{ overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }}
.track {{ background: #eee; height: 1em; }}
.fill {{ display: block; background: #3a6ea5; height: 100%; }}
.count, .share {{ text-align: right; font-variant-numeric: tabular-nums; }}
.grid {{ display: flex; flex-wrap: wrap; gap: .6em; }}
.card {{ margin: 0; width: 150px; }}
.picture {{ height: 96px; display: flex; align-items: flex-end; }}
.placeholder {{ width: 96px; height: 96px; background: repeating-linear-gradient(45deg, #eee 0 8px, #ddd 8px 16px);
  color: #900; font-size: 11px; display: flex; align-items: center; justify-content: center; text-align: center; }}
figcaption {{ font-size: 12px; }}
figcaption span {{ display: block; }}
.path {{ color: #555; word-break: break-all; font-family: monospace; font-size: 11px; }}
table {{ border-collapse: collapse; }}
th, td {{ text-align: left; vertical-align: top; padding: .2em .8em .2em 0; border-bottom: 1px solid #eee; }}
.provenance td {{ word-break: break-all; font-family: monospace; font-size: 12px; }}
.errors ul {{ margin: 0; padding-left: 1em; }}
</style></head>
<body>
{body}
</body></html>
"""
