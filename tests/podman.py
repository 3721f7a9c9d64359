"""Podman for the tests: rootless always, and with this sandbox's settings kept here, never in the product.

Run as root (CI), the harness makes a user with subuid/subgid ranges and puts a `podman` wrapper first on
PATH that runs the real Podman as that user, so `batch image build` and the README's commands call
plain `podman` and get rootless Podman. The sandbox needs: runc (Debian's crun fails on this kernel's
cgroups), explicit ulimits (the defaults exceed the hard limits), host networking (slirp4netns fails), and the
host's CA bundle during builds (a TLS-intercepting proxy stands between us and PyPI).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOTLESS_USER = "batch-ci"
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
netns = "host"
[engine]
runtime = "runc"
"""
STORAGE_CONF = '[storage]\ndriver = "overlay"\n'
HOST_TRUST = ["/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf"]


@dataclass
class Podman:
    workspace: Path  # scratch the rootless user can read and write
    wrapper_dir: Path | None  # holds the `podman` wrapper when we run as root
    owner: tuple[int, int]  # uid, gid that files for the containers should belong to
    made: list[str] = field(default_factory=list)  # images to remove at the end

    @property
    def env(self) -> dict[str, str]:
        path = os.environ["PATH"]
        return {**os.environ, "PATH": f"{self.wrapper_dir}:{path}" if self.wrapper_dir else path}

    @property
    def user(self) -> str:
        return pwd.getpwuid(self.owner[0]).pw_name

    def build_options(self) -> list[str]:
        mounts = [f"--volume={path}:{path}:ro" for path in HOST_TRUST if os.path.exists(path)]
        return ["--network=host", *mounts]

    def __call__(self, *args: str, check: bool = True, cwd: Path | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
        result = subprocess.run(["podman", *args], capture_output=True, text=True, env=self.env, cwd=cwd, timeout=timeout)
        if check and result.returncode:
            raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    def give(self, path: Path) -> Path:
        """Hand a folder tree to the rootless user."""
        for folder, _dirs, files in os.walk(path):
            for name in [folder, *(os.path.join(folder, file) for file in files)]:
                os.lchown(name, *self.owner)
        return path

    def cleanup(self) -> None:
        if self.made:
            self("rmi", "--force", *self.made, check=False)
        self("image", "prune", "--force", check=False)
        shutil.rmtree(self.workspace, ignore_errors=True)
        if self.wrapper_dir:
            shutil.rmtree(self.wrapper_dir, ignore_errors=True)


def _write_owned(path: Path, text: str, user: pwd.struct_passwd) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    for part in [path, *path.parents]:
        if str(part) == user.pw_dir:
            break
        os.chown(part, user.pw_uid, user.pw_gid)


def start() -> Podman:
    if os.geteuid() != 0:
        workspace = Path(tempfile.mkdtemp(prefix="batch-podman-"))
        return Podman(workspace, None, (os.getuid(), os.getgid()))
    try:
        user = pwd.getpwnam(ROOTLESS_USER)
    except KeyError:  # useradd also gives the user subuid/subgid ranges
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", ROOTLESS_USER], check=True)
        user = pwd.getpwnam(ROOTLESS_USER)
    config = Path(user.pw_dir) / ".config" / "containers"
    _write_owned(config / "containers.conf", CONTAINERS_CONF, user)
    _write_owned(config / "storage.conf", STORAGE_CONF, user)
    runtime = Path(f"/tmp/batch-ci-runtime-{user.pw_uid}")
    runtime.mkdir(mode=0o700, exist_ok=True)
    os.chown(runtime, user.pw_uid, user.pw_gid)
    wrapper_dir = write_wrapper("podman", f"exec runuser -u {ROOTLESS_USER} -- env HOME={user.pw_dir} "
                                          f"XDG_RUNTIME_DIR={runtime} {shutil.which('podman')} \"$@\"")  # fmt: skip
    workspace = Path(tempfile.mkdtemp(prefix="batch-podman-"))
    os.chmod(workspace, 0o755)
    os.chown(workspace, user.pw_uid, user.pw_gid)
    return Podman(workspace, wrapper_dir, (user.pw_uid, user.pw_gid))


def write_wrapper(command: str, body: str) -> Path:
    """A new folder, readable by every user, holding a shell script named `command`: put it first on PATH."""
    folder = Path(tempfile.mkdtemp(prefix=f"batch-{command}-bin-"))
    os.chmod(folder, 0o755)
    (folder / command).write_text(f"#!/bin/sh\n# {command} as the tests need it (tests/{command}.py)\n{body}\n")
    (folder / command).chmod(0o755)
    return folder


def debootstrap_base(podman: Podman, tag: str) -> str:
    """A Debian 12 base with python3 and venv, from Debian's packages: no container registry is reachable."""
    root = podman.workspace / "bookworm-root"
    subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm", str(root)],
        check=True, capture_output=True, timeout=1200,
    )  # fmt: skip
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["podman", "import", "--quiet", "-", tag], stdin=tar.stdout, check=True, env=podman.env, capture_output=True)
    tar.wait()
    shutil.rmtree(root)
    podman.made.append(tag)
    return tag
