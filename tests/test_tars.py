"""A tar's member list read from its plain headers agrees with Python's tarfile on every kind of tar."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from batch import tars


def write(target: Path, format: int, names: list[str], extra: bool = True) -> Path:
    """NAMES as files of none to two blocks each; with EXTRA, a folder and a symlink before the last."""
    with tarfile.open(target, "w", format=format) as tar:
        for number, name in enumerate(names):
            info = tarfile.TarInfo(name)
            data = bytes(number % 700)  # from none to two blocks
            info.size, info.mtime = len(data), 1_700_000_000 + number
            tar.addfile(info, io.BytesIO(data))
            if extra and number == len(names) - 2:
                folder = tarfile.TarInfo("a-folder")
                folder.type = tarfile.DIRTYPE
                tar.addfile(folder)
                link = tarfile.TarInfo("a-link.jpg")
                link.type, link.linkname = tarfile.SYMTYPE, names[0]
                tar.addfile(link)
    return target


def by_tarfile(path: Path) -> list[tars.Member]:
    with tarfile.open(path) as tar:
        return [tars.Member(info.name, info.size, info.mtime, info.offset_data) for info in tar if info.isfile()]


def read_plainly(path: Path) -> int:
    """How many members the headers read without tarfile hold, before the first special one."""
    found: list[tars.Member] = []
    with open(path, "rb") as handle:
        tars._plain_members(handle.fileno(), path.stat().st_size, found)
    return len(found)


def listed(path: Path) -> tuple[list[tars.Member], str | None]:
    with open(path, "rb") as handle:
        return tars.members(handle, path.stat().st_size)


PLAIN = [f"{number:07d}.jpg" for number in range(40)] + ["sub/dir/0000041.jpg", ".hidden.jpg"]
LONG = "x" * 150 + "/" + "y" * 80 + ".jpg"  # ustar splits it into a prefix; GNU and pax write long-name headers


GNU, USTAR, PAX = tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT
AT_TEN = [*PLAIN[:10], LONG, *PLAIN[10:]]
AT_FIVE = [*PLAIN[:5], "café-é.jpg", *PLAIN[5:]]


@pytest.mark.parametrize(("format", "names", "plain"), [
    (GNU, PLAIN, 41), (USTAR, PLAIN, 41), (PAX, PLAIN, 41),  # all but the last, after the symlink
    (GNU, AT_TEN, 10), (USTAR, AT_TEN, 42), (PAX, AT_TEN, 10),  # ustar splits the long name into two fields
    (GNU, AT_FIVE, 42), (USTAR, AT_FIVE, 42), (PAX, AT_FIVE, 5),  # pax writes a utf-8 name in its own header
], ids=[f"{form}-{kind}" for kind in ("plain", "a long name", "not ascii") for form in ("gnu", "ustar", "pax")])  # fmt: skip
def test_the_members_are_those_tarfile_reads(tmp_path, format, names, plain):
    tar = write(tmp_path / "t.tar", format, names)
    assert listed(tar) == (by_tarfile(tar), None)
    assert len(by_tarfile(tar)) == len(names)
    assert read_plainly(tar) == plain  # the rest, from the first special header on, is tarfile's


def test_a_tar_whose_first_header_is_special_is_read_by_tarfile_whole(tmp_path):
    tar = write(tmp_path / "t.tar", tarfile.GNU_FORMAT, [LONG, *PLAIN])
    assert listed(tar) == (by_tarfile(tar), None)


def test_a_cut_or_broken_tar_keeps_what_comes_before_and_says_why(tmp_path):
    whole = write(tmp_path / "whole.tar", tarfile.GNU_FORMAT, PLAIN, extra=False).read_bytes()
    members = by_tarfile(tmp_path / "whole.tar")
    tenth = members[10]
    (tmp_path / "cut.tar").write_bytes(whole[: tenth.offset_data + 10])  # the tenth's data cut short
    found, why = listed(tmp_path / "cut.tar")
    assert found == members[:11] and why.startswith("truncated tar: the file ends at byte")

    broken = bytearray(whole)
    broken[tenth.offset_data - 512 : tenth.offset_data] = bytes(range(256)) * 2
    (tmp_path / "broken.tar").write_bytes(bytes(broken))
    found, why = listed(tmp_path / "broken.tar")
    assert found == members[:10] and why == (f"broken tar: no valid header at byte {tenth.offset_data - 512} of "
                                             f"{len(whole)}; the members after it cannot be read")  # fmt: skip

    (tmp_path / "empty.tar").write_bytes(b"")
    assert listed(tmp_path / "empty.tar") == ([], "broken tar: empty file")
