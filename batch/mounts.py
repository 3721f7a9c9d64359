"""Do POSIX locks on OUT span nodes? `commit.OutputDir` locks a byte range of OUT/.lock so that two
Slurm tasks never write the same buckets, but a shared file system mounted with node-local locks
grants both tasks their lock and nothing fails. So the mount holding OUT is read from
/proc/self/mountinfo and a node-local or missing lock is named, with the option that fixes it.

What the mount options mean (checked against the sources, not guessed):
- Lustre shows `flock` or `localflock` in its super options, and `noflock` since 2.14 (older clients
  show neither); without flock, lock calls fail with ENOSYS. flock is the default since 2.12.3.
- NFS always shows `local_lock=...`; `nolock` implies `local_lock=all`; posix and all keep fcntl
  locks on this client. NFSv2/3 locks otherwise go through NLM, which needs rpc.statd here.
- BeeGFS checks flock/fcntl locks on this node only unless beegfs-client.conf sets
  `tuneUseGlobalFileLocks = true` (default false); that setting is not in mountinfo, so the client's
  config file (`cfgFile=` in the options, else the default path) is read.
Anything unreadable or odd gives None or a generic message: a warning must never stop a run.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
BEEGFS_CONF = "/etc/beegfs/beegfs-client.conf"  # the client's default when no cfgFile= is given
RISK = "two tasks on different nodes could write the same buckets"
FLOCK = "ask the admins to mount it with -o flock"
NFS_FIX = "ask the admins to mount it with local_lock=none and without nolock"
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    source: str
    options: frozenset[str]  # per-mount and super options together: a flag may sit in either


def _unescape(field: str) -> str:
    """The kernel writes space, tab, newline and backslash in these fields as \\040 \\011 \\012 \\134."""
    return _OCTAL.sub(lambda match: chr(int(match[1], 8)), field)


def _parse(line: str) -> Mount | None:
    """`ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`."""
    fields = line.split(" ")
    try:
        fstype, source, super_options = fields[fields.index("-", 6) + 1 :][:3]
    except ValueError:  # no separator, or fewer than three fields after it
        return None
    options = frozenset(fields[5].split(",") + super_options.split(",")) - {""}
    return Mount(_unescape(fields[4]), fstype, _unescape(source), options)


def _within(path: str, mount_point: str) -> bool:
    return path == mount_point or path.startswith(mount_point.rstrip("/") + "/")


def mount_of(path: str, mountinfo: str | None = None) -> Mount | None:
    """The mount holding `path` once symlinks are resolved: the longest mount point above it, the
    last listed of equal ones (a mount stacked on another hides it)."""
    try:
        if mountinfo is None:
            with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as file:
                mountinfo = file.read()
        target = os.path.realpath(path)
        best = None
        for mount in filter(None, map(_parse, mountinfo.split("\n"))):
            if _within(target, mount.mount_point) and (best is None or len(mount.mount_point) >= len(best.mount_point)):
                best = mount
        return best
    except (OSError, ValueError):
        return None


def _beegfs_global_locks(mount: Mount) -> tuple[bool | None, str]:
    """Whether the client's config turns on global locks; None when it cannot be read."""
    conf = next((option[len("cfgFile=") :] for option in mount.options if option.startswith("cfgFile=")), BEEGFS_CONF)
    try:
        with open(conf, encoding="utf-8", errors="replace") as file:
            lines = file.read().splitlines()
    except OSError:
        return None, conf
    for line in lines:
        key, _, value = line.split("#", 1)[0].partition("=")
        if key.strip() == "tuneUseGlobalFileLocks":
            return value.strip().lower() in {"1", "y", "on", "yes", "true"}, conf  # as BeeGFS reads a bool
    return False, conf


def _node_local(mount: Mount) -> tuple[str, str] | None:
    """(what is wrong with locks here, how to fix it), or None where they span nodes or the file system
    is only seen by this node."""
    options = mount.options
    if mount.fstype == "lustre":
        if "localflock" in options:
            return "coherent on this node only (mounted with localflock)", FLOCK
        if "flock" not in options:
            return "off (mounted without flock: lock calls fail with ENOSYS)", FLOCK
    elif mount.fstype in ("nfs", "nfs4"):
        local = sorted(options & {"nolock", "local_lock=all", "local_lock=posix"})
        if local:
            return f"kept on this node (mounted with {','.join(local)})", NFS_FIX
    elif mount.fstype == "beegfs":
        enabled, conf = _beegfs_global_locks(mount)
        if not enabled:
            state = "unknown: cannot read" if enabled is None else "false (the default) in"
            return (
                f"checked on this node only unless tuneUseGlobalFileLocks = true (it is {state} {conf})",
                f"ask the admins to set tuneUseGlobalFileLocks = true in {conf} and remount",
            )
    return None


def lock_scope_warning(path: str, mountinfo: str | None = None) -> str | None:
    """One line naming why locks on `path` do not keep out a task on another node, or None."""
    mount = mount_of(path, mountinfo)
    problem = _node_local(mount) if mount else None
    if mount is None or problem is None:
        return None
    what, fix = problem
    return f"POSIX locks on {path} are {what} on {mount.fstype} at {mount.mount_point}: {RISK}; {fix}"


def lock_failure_hint(path: str, error: OSError, mountinfo: str | None = None) -> str:
    """The message for lockf itself failing on `path`: the errno, the file system, and the fix where known."""
    code = errno.errorcode.get(error.errno, f"errno {error.errno}") if error.errno else "no errno"
    text = f"cannot lock {path} ({code}: {error.strerror or error})"
    mount = mount_of(path, mountinfo)
    if mount is None:
        return f"{text}: without the lock, {RISK}"
    text += f" on {mount.fstype} at {mount.mount_point}: without the lock, {RISK}"
    if mount.fstype == "lustre" and "flock" not in mount.options:
        return f"{text}; {FLOCK}"
    if mount.fstype == "nfs" and not any(option.startswith("vers=4") for option in mount.options):
        return (
            f"{text}; NFSv3 locks go through NLM: ask the admins to run rpc.statd on the nodes and check lockd "
            "on the server (mounting with nolock would only make the locks node-local)"
        )
    return f"{text}; ask the admins whether {mount.fstype} at {mount.mount_point} supports POSIX byte-range locks"
