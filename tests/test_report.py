"""`batch report`: the page a real headless Chromium draws from a real output, checked against DuckDB and
`batch summary`; its bound at a million rows; its refusals."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from functools import partial
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image, ImageOps

from batch import report
from batch.writer import read_record
from benchmarks.packing import Sample, write_parquet, write_tar
from tests import images
from tests.conftest import FAST, run_batch

INJECTED = "<script>/& <img src=x onerror=alert(1)>.jpg"  # a folder and a file name: user data, never markup
TITLE = "Run <b>7</b> & co"
LATIN_1 = b"caf\xe9.jpg"  # not UTF-8: stored as `caf\xe9.jpg` with the exact name in `path_bytes`
PAGE_BOUND = 1_000_000


@dataclass
class Element:
    tag: str
    attributes: dict[str, str]
    children: list[Element | str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(child if isinstance(child, str) else child.text for child in self.children)

    def all(self, tag: str | None = None, kind: str | None = None) -> list[Element]:
        """Descendants with this tag and/or class, in document order."""
        found = []
        for child in self.children:
            if isinstance(child, Element):
                if (tag is None or child.tag == tag) and (kind is None or kind in child.attributes.get("class", "").split()):
                    found.append(child)
                found += child.all(tag, kind)
        return found

    def section(self, heading: str) -> Element:
        (found,) = [section for section in self.all("section") if section.all("h2")[0].text.startswith(heading)]
        return found


class _Tree(HTMLParser):
    """The DOM Chromium serialises (every element closed but the void ones) as Elements."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, markup: str):
        super().__init__(convert_charrefs=True)
        self.root = Element("document", {})
        self.open = [self.root]
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {name: value or "" for name, value in attrs})
        self.open[-1].children.append(element)
        if tag not in self.VOID:
            self.open.append(element)

    def handle_endtag(self, tag):
        while len(self.open) > 1 and self.open.pop().tag != tag:
            pass

    def handle_data(self, data):
        self.open[-1].children.append(data)


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    return found


def browse(page: Path, profile: Path, *arguments: str) -> str:
    """Headless Chromium on the page, as a person's browser opens a file: no server, no network."""
    result = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                             *arguments, page.as_uri()], capture_output=True, text=True, timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@dataclass
class Reported:
    inputs: Path
    output: Path
    page: Path
    dom: Element
    screenshot: Path

    def query(self, sql: str) -> list[tuple]:
        return duckdb.sql(sql.replace("parts", f"read_parquet('{self.output}/*.parquet')")).fetchall()


@pytest.fixture(scope="module")
def reported(tmp_path_factory) -> Reported:
    """The default model over the test images, some of them gone or changed since, reported and browsed."""
    root = tmp_path_factory.mktemp("report")
    inputs = root / "in"
    images.write_all(inputs / "good", images.GOOD)
    images.write_all(inputs / "bad", images.BAD)
    for name in ("chelsea", "coffee", "rocket"):
        shutil.copy(images.PHOTOS / f"{name}.jpg", inputs / f"{name}.jpg")
    (inputs / INJECTED).parent.mkdir()
    shutil.copy(images.PHOTOS / "rocket.jpg", inputs / INJECTED)
    shutil.copy(images.PHOTOS / "coffee.jpg", inputs / "gone.jpg")
    shutil.copy(images.PHOTOS / "chelsea.jpg", os.path.join(os.fsencode(inputs), LATIN_1))
    shutil.copy(images.PHOTOS / "chelsea.jpg", inputs / "now a folder.jpg")
    shutil.copy(images.PHOTOS / "rocket.jpg", inputs / "now text.jpg")
    run_batch("classify", inputs, "-o", root / "out")
    (inputs / "gone.jpg").unlink()
    (inputs / "now a folder.jpg").unlink()
    (inputs / "now a folder.jpg").mkdir()
    (inputs / "now text.jpg").write_text("moved elsewhere")
    page = root / "report.html"
    run_batch("report", root / "out", "-o", page, "--title", TITLE)
    dom = _Tree(browse(page, root / "profile", "--dump-dom")).root
    browse(page, root / "profile", f"--screenshot={root / 'shot.png'}", "--window-size=1280,2400", "--hide-scrollbars")
    return Reported(inputs, root / "out", page, dom, root / "shot.png")


def bars(section: Element) -> dict[str, int]:
    return {bar.all(kind="name")[0].text: int(bar.all(kind="count")[0].text.replace(",", "")) for bar in section.all(kind="bar")}


def test_the_label_chart_draws_duckdbs_counts(reported):
    labels = dict(reported.query("SELECT label, count(*) FROM parts WHERE label IS NOT NULL GROUP BY label"))
    assert 3 <= len(labels) <= report.LABELS_SHOWN  # the real model sees cats, espresso, a rocket...
    chart = reported.dom.section("Labels")
    drawn = bars(chart)
    assert drawn == labels
    widths = [float(re.search(r"width:\s*([\d.]+)%", fill.attributes["style"])[1]) for fill in chart.all(kind="fill")]
    assert widths == pytest.approx([100 * count / max(labels.values()) for count in drawn.values()], abs=0.1)
    assert sum(bars(reported.dom.section("Confidence")).values()) == sum(labels.values())


def test_thumbnails_are_small_inline_jpegs_of_the_files(reported):
    exact = dict(reported.query("SELECT path, coalesce(path_bytes, encode(path)) FROM parts"))
    cards = reported.dom.all(kind="card")
    pictures = [(card.all(kind="path")[0].text, card.all("img")) for card in cards]
    assert 0 < len([found for _, found in pictures if found]) <= 72
    for path, found in pictures:
        if not found:
            continue
        uri = found[0].attributes["src"]
        assert uri.startswith("data:image/jpeg;base64,")
        encoded = base64.b64decode(uri.split(",", 1)[1])
        assert len(encoded) <= report.THUMBNAIL_BYTES
        with Image.open(io.BytesIO(encoded)) as thumbnail, open(exact[path], "rb") as file, Image.open(file) as original:
            expected = ImageOps.exif_transpose(original).size
            assert max(thumbnail.size) <= report.THUMBNAIL
            assert thumbnail.size[0] / thumbnail.size[1] == pytest.approx(expected[0] / expected[1], rel=0.05), path


def test_a_file_gone_or_replaced_since_gets_a_placeholder_saying_why(reported):
    reasons = {card.all(kind="path")[0].text: card.all(kind="placeholder") for card in reported.dom.all(kind="card")}
    assert reasons[str(reported.inputs / "gone.jpg")][0].text == "file gone"
    assert reasons[str(reported.inputs / "now a folder.jpg")][0].text == "not a plain file"
    assert reasons[str(reported.inputs / "now text.jpg")][0].text == "no longer an image"


def test_a_name_that_is_not_utf8_is_opened_by_its_exact_bytes(reported):
    cards = [card for card in reported.dom.all(kind="card") if card.all(kind="path")[0].text.endswith("caf\\xe9.jpg")]
    assert cards and all(card.all("img") and not card.all(kind="placeholder") for card in cards)


def photos(first: int) -> list[Sample]:
    return [Sample(f"{first + number:07d}", (images.PHOTOS / f"{name}.jpg").read_bytes(), f"https://example.org/{name}.jpg")
            for number, name in enumerate(PHOTO_NAMES)]  # fmt: skip


PHOTO_NAMES = ("chelsea", "coffee", "rocket")


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> dict[str, Element]:
    """The photos in tars and Parquet files, classified; then one tar deleted, one cut short, one Parquet
    file rewritten with fewer rows; reported and browsed. Every card by its path (16 rows: all of them are
    among the least confident)."""
    root = tmp_path_factory.mktemp("packed")
    tar = write_tar(root / "shard-000000.tar", photos(0))
    gone = write_tar(root / "shard-000001.tar", photos(3))
    cut = write_tar(root / "shard-000002.tar", photos(6))
    table = write_parquet(root / "part-00000.parquet", photos(9), row_group_rows=2)
    shrunk = write_parquet(root / "part-00001.parquet", photos(12))
    (root / "a folder.tar").mkdir()  # named like a tar, but a folder: its files are plain files
    shutil.copy(images.PHOTOS / "coffee.jpg", root / "a folder.tar" / "coffee.jpg")
    run_batch("classify", tar, gone, cut, table, shrunk, root / "a folder.tar", "-o", root / "out", *FAST, "--workers", "1")
    gone.unlink()
    with tarfile.open(cut) as opened:
        second = opened.getmember("0000007.jpg").offset_data
    cut.write_bytes(cut.read_bytes()[: second + 5000])
    write_parquet(shrunk, photos(12)[:1])
    page = root / "report.html"
    run_batch("report", root / "out", "-o", page)
    dom = _Tree(browse(page, root / "profile", "--dump-dom")).root
    return {card.all(kind="path")[0].text.removeprefix(f"{root}/"): card for card in dom.all(kind="card")}


def test_members_of_tars_and_parquet_files_get_thumbnails_of_their_own_bytes(packed):
    """Each member's thumbnail is the one its photo makes as a file: the member's bytes were read exactly. A file
    in a folder named like a tar is a plain file."""
    as_files = {name: report.thumbnail(partial(open, images.PHOTOS / f"{name}.jpg", "rb"))[0] for name in PHOTO_NAMES}
    members = {f"shard-000000.tar/{number:07d}.jpg": PHOTO_NAMES[number] for number in range(3)}
    members |= {f"part-00000.parquet/{9 + number:07d}.jpg": PHOTO_NAMES[number] for number in range(3)}
    members |= {"shard-000002.tar/0000006.jpg": "chelsea", "part-00001.parquet/0000012.jpg": "chelsea",
                "a folder.tar/coffee.jpg": "coffee"}  # fmt: skip
    for path, name in members.items():
        shown = packed[path].all("img")
        assert shown and not packed[path].all(kind="placeholder"), path
        assert shown[0].attributes["src"] == as_files[name], path
        assert len(base64.b64decode(as_files[name].split(",", 1)[1])) <= report.THUMBNAIL_BYTES


def test_a_member_whose_container_went_or_changed_gets_a_placeholder_saying_why(packed):
    reasons = {path: card.all(kind="placeholder")[0].text for path, card in packed.items() if card.all(kind="placeholder")}
    assert set(reasons) == {
        *(f"shard-000001.tar/{number:07d}.jpg" for number in (3, 4, 5)),
        "shard-000002.tar/0000007.jpg", "shard-000002.tar/0000008.jpg",
        "part-00001.parquet/0000013.jpg", "part-00001.parquet/0000014.jpg",
    }  # fmt: skip
    assert {reasons[f"shard-000001.tar/{number:07d}.jpg"] for number in (3, 4, 5)} == {"tar gone"}
    assert re.fullmatch(r"truncated: the tar ends \d+ bytes into this member's \d+", reasons["shard-000002.tar/0000007.jpg"])
    assert reasons["shard-000002.tar/0000008.jpg"].startswith("truncated tar: the file ends at byte ")
    shrunk = {reasons[f"part-00001.parquet/{number:07d}.jpg"] for number in (13, 14)}
    assert shrunk == {"no longer in the Parquet file"}


def test_the_least_confident_are_duckdbs_lowest_scores(reported):
    lowest = reported.query(f"SELECT path, score FROM parts WHERE score IS NOT NULL ORDER BY score, path "
                            f"LIMIT {report.LEAST_CONFIDENT}")  # fmt: skip
    cards = reported.dom.section(f"The {report.LEAST_CONFIDENT} least confident").all(kind="card")
    assert [card.all(kind="path")[0].text for card in cards] == [path for path, _ in lowest]
    assert [card.all(kind="label")[0].text.rsplit(" ", 1)[1] for card in cards] == [f"{score:.3f}" for _, score in lowest]


def test_examples_show_each_frequent_label_with_its_own_rows(reported):
    section = reported.dom.section("Examples")
    counts = dict(reported.query("SELECT label, count(*) FROM parts WHERE label IS NOT NULL GROUP BY label"))
    headings = [heading.text for heading in section.all("h3")]
    assert headings == sorted(counts, key=lambda label: (-counts[label], label))[: report.GRID_LABELS]
    for grid, label in zip(section.all(kind="grid"), headings):
        cards = grid.all(kind="card")
        assert len(cards) == min(report.PER_LABEL, counts[label])
        assert {card.all(kind="label")[0].text.rsplit(" ", 1)[0] for card in cards} == {label}


def test_error_kinds_are_the_summarys(reported):
    summary = run_batch("summary", reported.output).stdout
    listed = summary.split("errors:")[1].split("top labels:")[0].splitlines()[1:]
    expected = {kind: int(count) for count, kind in (line.split(None, 1) for line in listed)}
    rows = reported.dom.section("Errors").all("tr")[1:]
    assert {row.all(kind="kind")[0].text: int(row.all(kind="count")[0].text) for row in rows} == expected
    assert "not a regular file" in expected and "permission denied" in expected


def test_user_data_stays_text(reported):
    assert reported.dom.all("script") == []
    assert all(image.attributes["src"].startswith("data:image/jpeg;base64,") for image in reported.dom.all("img"))
    (heading,) = reported.dom.all("h1")
    assert heading.text == TITLE and heading.all() == []
    assert str(reported.inputs / INJECTED) in [path.text for path in reported.dom.all(kind="path")]


def test_provenance_and_throughput_are_the_parts_own(reported):
    (part,) = reported.output.glob("part-*.parquet")
    record = read_record(str(part))
    fields = {row.all("th")[0].text: row.all("td")[0].text for row in reported.dom.section("Provenance").all("tr")}
    assert fields["model"] == "efficientnet_lite0" == record["identity"]["model"]
    assert fields["weights_sha256"] == record["identity"]["weights_sha256"]
    assert fields["torch"] == record["provenance"]["torch"] and fields["host"] == record["provenance"]["host"]
    throughput = reported.dom.section("Throughput").text
    assert f"{record['chunk']['rows']:,} rows committed" in throughput and "images/s per task" in throughput


def test_the_screenshot_shows_the_page(reported):
    pixels = np.asarray(Image.open(reported.screenshot).convert("RGB")).astype(int)
    assert pixels.std() > 20  # not a blank page
    bar_blue = (np.abs(pixels - (0x3A, 0x6E, 0xA5)).sum(axis=2) < 12).sum()
    assert bar_blue > 2000  # the charts' bars were drawn
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 2000  # photographs, not only text and bars


def test_the_page_is_replaced_whole(reported, tmp_path):
    page = tmp_path / "report.html"
    page.write_text("an older report")
    run_batch("report", reported.output, "-o", page, umask=0o022)
    assert page.read_text().startswith("<!doctype html>")
    assert sorted(os.listdir(tmp_path)) == ["report.html"]  # no staging file left
    assert page.stat().st_mode & 0o777 == 0o644


def test_bad_arguments_exit_2_naming_the_problem_and_create_nothing(reported, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a file").write_text("")
    (tmp_path / "locked").mkdir(mode=0o555)
    cases = {
        (tmp_path / "a file", tmp_path / "r.html"): "is a file",
        (tmp_path / "empty", tmp_path / "r.html"): "no committed results",
        (reported.output, tmp_path / "missing" / "r.html"): "not a writable folder",
        (reported.output, tmp_path / "locked" / "r.html"): "not a writable folder",
        (reported.output, tmp_path / "empty"): "is a directory",
    }
    for (output, target), message in cases.items():
        result = run_batch("report", output, "-o", target, check=False)
        assert result.returncode == 2 and message in result.stderr, (output, target, result.stderr)
    assert sorted(os.listdir(tmp_path)) == ["a file", "empty", "locked"] and not os.listdir(tmp_path / "locked")


def test_a_million_rows_give_a_page_of_bounded_size(tmp_path):
    """Every row names a real picture of noise, the costliest thumbnail, so the bound holds at its worst."""
    from benchmarks.report_scale import write_output

    random = np.random.default_rng(1)
    noise = [str(tmp_path / f"noise-{number:03d}.png") for number in range(200)]
    for name in noise:
        Image.fromarray(random.integers(0, 256, (report.THUMBNAIL, report.THUMBNAIL, 3), np.uint8)).save(name)
    write_output(tmp_path / "out", 1_000_000, lambda count, first: [noise[n % len(noise)] for n in range(first, first + count)])
    page = tmp_path / "report.html"
    run_batch("report", tmp_path / "out", "-o", page)
    markup = page.read_text()
    assert len(markup.encode()) < PAGE_BOUND
    thumbnails = re.findall(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", markup)
    assert len(thumbnails) == report.GRID_LABELS * report.PER_LABEL + report.LEAST_CONFIDENT == 72
    assert all(len(base64.b64decode(encoded)) <= report.THUMBNAIL_BYTES for encoded in thumbnails)
    assert "<b>1,000,000</b> rows in 10 parts" in markup
