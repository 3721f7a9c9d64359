"""A real Apptainer for the tests, on Debian 12, which packages none; the sandbox's needs stay here.

Debian unstable packages Apptainer 1.4, built against a newer glibc, so it runs inside a Debian unstable
root made once with debootstrap (about 540 MB, kept in ROOT for the next run, like a package cache).
Apptainer refuses to run under chroot, and as root here it aborts (root lacks CAP_SYS_RESOURCE), so each
call enters that root in a private mount namespace with pivot_root, mounts a fresh /proc, and drops to an
unprivileged user, as on a cluster's login node. The host's /tmp is bound at /tmp, so the folders the
tests make there have the same paths inside and out, and builds unpack on disk rather than in memory.
`/dev/fuse` opens to everyone, so squashfuse mounts a SIF instead of unpacking it on every run.

An `apptainer` wrapper first on PATH does all this, so `batch image sif`, `slurm/classify.sh` and the
README's lines call plain `apptainer`. BATCH_TEST_APPTAINER_USER chooses the user it runs as.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.podman import write_wrapper

ROOT = Path(os.environ.get("BATCH_TEST_APPTAINER_ROOT", "/var/cache/batch-tests/apptainer-sid"))
PACKAGES = ["apptainer", "squashfs-tools", "squashfuse", "fuse3", "e2fsprogs"]
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
APT = ["apt-get", "-qq", "-o", "Acquire::Check-Valid-Until=false"]

# $1 the unstable root, $2 the user, $3 the caller's folder; then apptainer's arguments.
ENTER = r"""
set -e
root=$1 user=$2 here=$3
shift 3
mount --make-rprivate /
mount --bind "$root" "$root"
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount --rbind /sys "$root/sys"
mount --rbind /tmp "$root/tmp"
cd "$root"
mkdir -p .oldroot
pivot_root . .oldroot
cd /
umount -l /.oldroot
home=/tmp/batch-apptainer-home-$user
mkdir -p "$home"
chown "$user:" "$home"
cd "$here" 2>/dev/null || cd "$home"
exec setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups \
    env HOME="$home" PATH=/usr/local/bin:/usr/bin:/bin apptainer "$@"
"""


@dataclass
class Apptainer:
    wrapper_dir: Path  # holds the `apptainer` wrapper

    def env(self, base: dict[str, str] | None = None, user: str | None = None) -> dict[str, str]:
        """`base` (default: this process's environment) with the wrapper first on PATH."""
        base = dict(os.environ if base is None else base)
        base["PATH"] = f"{self.wrapper_dir}:{base['PATH']}"
        if user:
            base["BATCH_TEST_APPTAINER_USER"] = user
        return base

    def build_env(self) -> dict[str, str]:
        """The environment for builds that run %post: the host's CA bundle bound over the image's, since a
        TLS-intercepting proxy stands between us and PyPI (tests/podman.py binds it into Podman builds
        likewise), and lz4 for the SIF's squashfs, far quicker to write than the default gzip on two cores;
        nothing the tests compare depends on it."""
        bundle = self.wrapper_dir / "ca-certificates.crt"
        if not bundle.exists():
            shutil.copy(HOST_CA_BUNDLE, bundle)
            bundle.chmod(0o644)
        return {**os.environ, "APPTAINER_BIND": f"{bundle}:{HOST_CA_BUNDLE}:ro", "APPTAINER_MKSQUASHFS_ARGS": "-comp lz4"}

    def __call__(self, *args: str, user: str | None = None, check: bool = True, timeout: float = 600,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:  # fmt: skip
        result = subprocess.run(["apptainer", *args], capture_output=True, text=True, timeout=timeout,
                                env=self.env(env, user), cwd=cwd)  # fmt: skip
        if check and result.returncode:
            raise AssertionError(f"apptainer {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    def cleanup(self) -> None:
        for home in Path("/tmp").glob("batch-apptainer-home-*"):
            shutil.rmtree(home, ignore_errors=True)  # Apptainer's cache and temporary files
        shutil.rmtree(self.wrapper_dir, ignore_errors=True)


def start(users: list[str]) -> Apptainer:
    """Apptainer for `users` (the first is the default); the unstable root is made on first use."""
    if not (ROOT / "usr" / "bin" / "apptainer").exists():
        _bootstrap()
    _add_users(users)
    os.chmod("/dev/fuse", 0o666)
    user = f'"${{BATCH_TEST_APPTAINER_USER:-{users[0]}}}"'
    return Apptainer(write_wrapper("apptainer", f"exec unshare -m sh -c '{ENTER}' sh {ROOT} {user} \"$PWD\" \"$@\""))


def _bootstrap() -> None:
    """Debian unstable with Apptainer, made beside ROOT and renamed into place, so a half-made one is redone."""
    partial = ROOT.with_name(ROOT.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["debootstrap", "--variant=minbase", "sid", str(partial), _mirror()], check=True,
                   capture_output=True, timeout=1800)  # fmt: skip
    for name in ["resolv.conf", "hosts"]:
        shutil.copy(f"/etc/{name}", partial / "etc" / name)
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in [[*APT, "update"], [*APT, "install", "-y", "--no-install-recommends", *PACKAGES]]:
        subprocess.run(["chroot", str(partial), *step], check=True, capture_output=True, env=environment, timeout=1800)
    partial.rename(ROOT)


def _mirror() -> str:
    """The Debian mirror this machine's apt uses (a site may have its own)."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    for line in sources.read_text().splitlines() if sources.exists() else []:
        if line.startswith("URIs:"):
            return line.split()[1]
    return "http://deb.debian.org/debian"


def _add_users(users: list[str]) -> None:
    """Apptainer looks its caller up in the root's own /etc/passwd and /etc/group."""
    for name in users:
        user = pwd.getpwnam(name)
        group = grp.getgrgid(user.pw_gid)
        for table, line in [("passwd", ":".join(map(str, user))), ("group", f"{group.gr_name}:x:{group.gr_gid}:")]:
            path = ROOT / "etc" / table
            if line.split(":")[0] not in {entry.split(":")[0] for entry in path.read_text().splitlines()}:
                with open(path, "a") as handle:
                    handle.write(line + "\n")
