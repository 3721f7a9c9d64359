"""batch.mounts: telling from /proc/self/mountinfo whether OUT/.lock keeps out a task on another node.

The lines follow the kernel's format (proc(5)): the per-mount options, optional fields ending at " - ",
then fstype, source and the file system's own options as its show_options writes them: Lustre's
llite_lib.c (flock/localflock, noflock since 2.14), NFS's nfs_show_mount_options (nolock, local_lock=),
BeeGFS's MountConfig_showOptions (cfgFile=).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from batch import mounts
from batch.mounts import Mount, lock_failure_hint, lock_scope_warning, mount_of

ROOT = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro"
SHM = "25 22 0:23 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw,inode64"
LUSTRE_FLOCK = "120 22 0:52 / /lustre rw,relatime shared:70 - lustre mgs1@o2ib:mgs2@o2ib:/home rw,flock,lazystatfs"
LUSTRE_LOCAL = "121 120 0:53 / /lustre/scratch rw,relatime shared:71 - lustre mgs@o2ib:/scratch rw,localflock"
# A client before 2.12.3 mounted without options: noflock, and nothing shown. 2.14 and later show noflock.
LUSTRE_OLD_DEFAULT = "122 22 0:54 / /lustre2 rw,relatime shared:72 - lustre mgs@tcp:/lfs rw,user_xattr,lazystatfs"
LUSTRE_NOFLOCK = "123 22 0:55 / /lustre3 rw,relatime shared:73 - lustre mgs@o2ib:/lfs rw,noflock,checksum,lazystatfs"
NFS3_NOLOCK = (
    "513 22 0:61 / /data rw,relatime shared:201 - nfs 10.1.1.5:/export/data rw,vers=3,rsize=1048576,"
    "wsize=1048576,namlen=255,hard,nolock,proto=tcp,timeo=600,retrans=2,sec=sys,mountaddr=10.1.1.5,"
    "mountvers=3,mountport=20048,mountproto=udp,local_lock=all,addr=10.1.1.5"
)
NFS3 = (
    "514 22 0:62 / /projects rw,relatime shared:202 - nfs 10.1.1.5:/export/projects rw,vers=3,rsize=1048576,"
    "wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,retrans=2,sec=sys,mountaddr=10.1.1.5,mountvers=3,"
    "mountport=20048,mountproto=udp,local_lock=none,addr=10.1.1.5"
)


def nfs4(mount_point: str, local_lock: str) -> str:
    return (
        f"512 22 0:60 / {mount_point} rw,relatime shared:200 - nfs4 10.1.1.5:/export/home rw,vers=4.2,"
        "rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,retrans=2,sec=sys,"
        f"clientaddr=10.1.2.3,local_lock={local_lock},addr=10.1.1.5"
    )


def table(*lines: str) -> str:
    return "\n".join((ROOT, SHM) + lines) + "\n"


def escape(path: str) -> str:
    return path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")


def test_parses_the_real_format_and_merges_the_options():
    text = "36 35 98:0 / /mnt1 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
    expected = Mount("/mnt1", "ext3", "/dev/root", frozenset({"rw", "noatime", "errors=continue"}))
    assert mount_of("/mnt1/out", text) == expected
    scratch = mount_of("/lustre/scratch/out", table(LUSTRE_FLOCK, LUSTRE_LOCAL))
    assert scratch is not None and scratch.source == "mgs@o2ib:/scratch"
    assert {"relatime", "localflock"} <= scratch.options
    no_optional_fields = "37 35 98:1 / /mnt2 rw - xfs /dev/sdb rw,attr2\n"
    assert mount_of("/mnt2", "garbage line\n" + no_optional_fields).fstype == "xfs"  # type: ignore[union-attr]


def test_longest_mount_point_wins_on_a_path_boundary():
    text = table(LUSTRE_FLOCK, LUSTRE_LOCAL)
    assert mount_of("/lustre/scratch/run1/out", text).mount_point == "/lustre/scratch"  # type: ignore[union-attr]
    assert mount_of("/lustre/scratch", text).mount_point == "/lustre/scratch"  # type: ignore[union-attr]
    assert mount_of("/lustre/scratchy/out", text).mount_point == "/lustre"  # type: ignore[union-attr]
    assert mount_of("/lustre/home/out", text).mount_point == "/lustre"  # type: ignore[union-attr]
    assert mount_of("/elsewhere", text).mount_point == "/"  # type: ignore[union-attr]
    assert lock_scope_warning("/lustre/scratchy/out", text) is None
    assert lock_scope_warning("/lustre/scratch/out", text) is not None


def test_a_mount_stacked_on_the_same_point_hides_the_one_below():
    over = "124 120 0:56 / /lustre rw,relatime shared:74 - lustre 10.0.0.1@o2ib:/home rw,localflock,lazystatfs"
    assert "localflock" in mount_of("/lustre/out", table(LUSTRE_FLOCK, over)).options  # type: ignore[union-attr]


def test_escaped_mount_points_are_unescaped():
    line = r"130 22 0:57 / /lustre/my\040scratch\011x\134y rw,relatime shared:75 - lustre mgs@tcp:/my rw,localflock"
    mount = mount_of("/lustre/my scratch\tx\\y/out", table(LUSTRE_FLOCK, line))
    assert mount is not None and mount.mount_point == "/lustre/my scratch\tx\\y"
    warning = lock_scope_warning("/lustre/my scratch\tx\\y/out", table(LUSTRE_FLOCK, line))
    assert warning is not None and "at /lustre/my scratch\tx\\y:" in warning


def test_a_symlink_into_the_mount_is_resolved(tmp_path: Path):
    mount_point = tmp_path / "lustre mnt"
    (mount_point / "out").mkdir(parents=True)
    (tmp_path / "link").symlink_to(mount_point / "out")
    line = f"131 22 0:58 / {escape(os.path.realpath(mount_point))} rw,relatime - lustre mgs@tcp:/x rw,localflock"
    mount = mount_of(str(tmp_path / "link"), table(line))
    assert mount is not None and mount.mount_point == os.path.realpath(mount_point)
    assert lock_scope_warning(str(tmp_path / "link"), table(line)) is not None


def test_lustre_localflock_is_coherent_on_one_node_only():
    warning = lock_scope_warning("/lustre/scratch/out", table(LUSTRE_FLOCK, LUSTRE_LOCAL))
    assert warning is not None and "\n" not in warning
    for part in (
        "/lustre/scratch/out",
        "lustre at /lustre/scratch",
        "localflock",
        "this node only",
        "two tasks on different nodes could write the same buckets",
        "-o flock",
    ):
        assert part in warning


@pytest.mark.parametrize("line, mount_point", [(LUSTRE_OLD_DEFAULT, "/lustre2"), (LUSTRE_NOFLOCK, "/lustre3")])
def test_lustre_without_flock_has_no_locks(line: str, mount_point: str):
    warning = lock_scope_warning(f"{mount_point}/out", table(line))
    assert warning is not None
    for part in (f"lustre at {mount_point}", "off", "ENOSYS", "different nodes", "-o flock"):
        assert part in warning


def test_lustre_with_flock_is_fine():
    assert lock_scope_warning("/lustre/home/out", table(LUSTRE_FLOCK, LUSTRE_LOCAL)) is None


@pytest.mark.parametrize(
    "line, mount_point, shown",
    [
        (NFS3_NOLOCK, "/data", "local_lock=all,nolock"),
        (nfs4("/home", "posix"), "/home", "local_lock=posix"),
        (nfs4("/home", "all"), "/home", "local_lock=all"),
    ],
)
def test_nfs_with_local_locks(line: str, mount_point: str, shown: str):
    warning = lock_scope_warning(f"{mount_point}/out", table(line))
    assert warning is not None
    for part in (
        f"at {mount_point}",
        f"mounted with {shown}",
        "this node",
        "different nodes",
        "without nolock",
        "local_lock=none",
    ):
        assert part in warning


@pytest.mark.parametrize(
    "line, mount_point",
    [
        (NFS3, "/projects"),
        (nfs4("/home", "none"), "/home"),
        (nfs4("/home", "flock"), "/home"),  # lockf is posix
    ],
)
def test_nfs_with_network_locks_is_fine(line: str, mount_point: str):
    assert lock_scope_warning(f"{mount_point}/out", table(line)) is None


@pytest.mark.parametrize("path", ["/", "/tmp/out", "/dev/shm/out"])
def test_local_file_systems_are_fine(path: str):
    assert lock_scope_warning(path, table()) is None


def beegfs(conf: Path) -> str:
    return f"600 22 0:70 / /mnt/beegfs rw,relatime shared:300 - beegfs beegfs_nodev rw,cfgFile={conf}"


@pytest.mark.parametrize(
    "setting, warns",
    [
        ("tuneUseGlobalFileLocks        = true", False),
        ("tuneUseGlobalFileLocks = false", True),
        ("# tuneUseGlobalFileLocks = true", True),  # a comment: the default, false
    ],
)
def test_beegfs_reads_global_file_locks_from_the_client_config(tmp_path: Path, setting: str, warns: bool):
    conf = tmp_path / "beegfs-client.conf"
    conf.write_text(f"sysMgmtdHost = mgmt01\ntuneUseGlobalAppendLocks = true\n{setting}\n")
    warning = lock_scope_warning("/mnt/beegfs/out", table(beegfs(conf)))
    assert (warning is not None) == warns
    if warning:
        assert "beegfs at /mnt/beegfs" in warning and "different nodes" in warning
        assert f"tuneUseGlobalFileLocks = true in {conf}" in warning


def test_beegfs_with_an_unreadable_config_still_warns(tmp_path: Path):
    warning = lock_scope_warning("/mnt/beegfs/out", table(beegfs(tmp_path / "missing.conf")))
    assert warning is not None and "cannot read" in warning and "tuneUseGlobalFileLocks" in warning


def test_failure_hint_names_errno_fstype_and_fix():
    enosys = OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    hint = lock_failure_hint("/lustre2/out/.lock", enosys, table(LUSTRE_OLD_DEFAULT))
    for part in ("/lustre2/out/.lock", "ENOSYS", os.strerror(errno.ENOSYS), "lustre at /lustre2", "-o flock"):
        assert part in hint
    enolck = OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    hint = lock_failure_hint("/projects/out/.lock", enolck, table(NFS3))
    assert "ENOLCK" in hint and "nfs at /projects" in hint and "rpc.statd" in hint
    hint = lock_failure_hint("/home/out/.lock", enolck, table(nfs4("/home", "none")))
    assert "ENOLCK" in hint and "nfs4 at /home" in hint and "rpc.statd" not in hint
    hint = lock_failure_hint("/x/.lock", OSError(errno.EOPNOTSUPP, "Operation not supported"), "")
    name = errno.errorcode[errno.EOPNOTSUPP]  # ENOTSUP on Linux: the same number
    assert hint.startswith(f"cannot lock /x/.lock ({name}: Operation not supported)") and "different nodes" in hint


@pytest.mark.parametrize("text", ["", "garbage\n", "1 2 3\n", "1 2 3:4 / /a rw - \n", "\x00 - -\n" * 3])
def test_odd_mountinfo_never_raises(text: str):
    assert mount_of("/lustre/out", text) is None
    assert lock_scope_warning("/lustre/out", text) is None
    assert "EINVAL" in lock_failure_hint("/lustre/out", OSError(errno.EINVAL, "Invalid argument"), text)
    assert lock_failure_hint("/x", OSError("no errno at all"), text).startswith("cannot lock /x")


def test_unreadable_mountinfo_gives_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(mounts, "MOUNTINFO", str(tmp_path / "absent"))
    assert mount_of(str(tmp_path)) is None and lock_scope_warning(str(tmp_path)) is None
    assert "ENOLCK" in lock_failure_hint(str(tmp_path), OSError(errno.ENOLCK, "No locks available"))


@pytest.mark.skipif(not os.path.exists(mounts.MOUNTINFO), reason="no /proc/self/mountinfo here")
def test_this_machines_tmp_path_is_local(tmp_path: Path):
    mount = mount_of(str(tmp_path))
    assert mount is not None and mount.fstype and str(tmp_path).startswith(mount.mount_point)
    assert lock_scope_warning(str(tmp_path)) is None
