"""Container images: the Containerfile is the one recipe; Podman builds it, and apptainer.def is emitted from it.

`definition` runs spython (DockerParser, then SingularityWriter) and mends what it gets wrong for us:
LABEL lines keep their `key="value"` form and trailing backslashes, ARG values are not substituted,
ENV values are not exported during %post, USER becomes `su -` in %post, %files entries that the
layering splits would nest inside each other, and the runscript `cd`s into WORKDIR, where
Apptainer users expect their own working directory. The runscript is the one Apptainer makes when it
converts the OCI image, ENTRYPOINT with the arguments or else CMD, so both routes to a SIF run alike.
The labels only a build knows (its time and commit) are left out of the definition,
where they would be frozen at the day it was written. The header names its base through build arguments
that default to the Containerfile's pinned image, so a build node without a registry can start from a file.
"""

from __future__ import annotations

import datetime
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass

import batch

HELP = """\
The batch image classifier (batch {version}).
    apptainer exec --nv classify.sif batch classify /data/images -o /scratch/preds
    apptainer run classify.sif classify --help        # runs `batch classify --help`
Bind your data and scratch folders (--bind /data,/scratch); with --cleanenv, forward
CUDA_VISIBLE_DEVICES and the SLURM_* variables as APPTAINERENV_*."""

# Labels whose values only a build knows: a committed apptainer.def cannot hold them (Apptainer records
# its own build time, org.label-schema.build-date).
BUILD_LABELS = ("org.opencontainers.image.created", "org.opencontainers.image.revision")

# The header takes the base from build arguments, the Containerfile's pinned image by default, so a build
# node without registry access builds from a file: --build-arg BOOTSTRAP=docker-archive --build-arg
# BASE_IMAGE=python.tar (`podman save` or `docker save` of that image), or BOOTSTRAP=localimage with a SIF.
BASE = """\
Bootstrap: {{{{ BOOTSTRAP }}}}
From: {{{{ BASE_IMAGE }}}}

%arguments
BOOTSTRAP=docker
BASE_IMAGE={image}
"""

# %test: `apptainer test` keeps the caller's environment, so doctor sees what the job was allotted.
TEST = """\
# In a job that was allotted GPUs (SLURM_JOB_GPUS, CUDA_VISIBLE_DEVICES...) this fails unless they
# are visible: apptainer test --nv classify.sif
exec batch doctor"""


class ImageError(RuntimeError):
    """A container tool is missing or failed; the message says which and how."""


def _run(command: list[str]) -> None:
    """Run a tool with its output going straight to the user's terminal or job log."""
    try:
        result = subprocess.run(command, check=False)
    except FileNotFoundError:
        raise ImageError(f"{command[0]} is not installed or not on PATH") from None
    if result.returncode:
        raise ImageError(f"{shlex.join(command)} failed with exit status {result.returncode}")


def _git(folder: str, *arguments: str) -> str | None:
    """A git command's output in `folder`; None where git is missing or the folder is not a checkout."""
    try:
        result = subprocess.run(["git", "-C", folder, *arguments], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def revision(folder: str) -> str:
    """The commit the build context is at, with "-dirty" when its files differ from it; "unknown" outside git."""
    commit = _git(folder, "rev-parse", "--verify", "HEAD")
    if not commit:
        return "unknown"
    changes = _git(folder, "status", "--porcelain", "--", ".")
    return commit if changes == "" else f"{commit}-dirty"


def source(folder: str) -> str | None:
    """The https URL of the checkout's origin, credentials removed; None leaves the Containerfile's default."""
    url = _git(folder, "remote", "get-url", "origin") or ""
    return re.sub(r"^https://[^/@]*@", "https://", url) if url.startswith("https://") else None


def build_command(context: str, containerfile: str, tag: str, base_image: str | None, extra: tuple[str, ...]) -> list[str]:
    """podman build, with the OCI labels' values as build arguments (the Containerfile's LABEL takes them)."""
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")  # RFC 3339, UTC
    arguments = {"VERSION": batch.__version__, "REVISION": revision(context), "CREATED": created,
                 "SOURCE": source(context), "BASE_IMAGE": base_image}  # fmt: skip
    command = ["podman", "build", "-f", containerfile, "-t", f"{tag}:{batch.__version__}", "-t", f"{tag}:latest"]
    for name, value in arguments.items():
        if value:
            command += ["--build-arg", f"{name}={value}"]
    return [*command, *extra, context]


def build(context: str, containerfile: str, tag: str, base_image: str | None, extra: tuple[str, ...]) -> None:
    _run(build_command(context, containerfile, tag, base_image, extra))


@dataclass(frozen=True)
class SifResult:
    archive: str
    sif: str | None
    command: str  # what builds the SIF; run it on the cluster when apptainer was not here


def sif(image: str, sif_path: str, archive: str | None = None) -> SifResult:
    """podman save --format oci-archive, then apptainer build and apptainer test where apptainer exists."""
    archive = archive or re.sub(r"\.sif$", "", sif_path) + ".oci.tar"
    if os.path.exists(archive):
        os.remove(archive)  # podman save refuses to overwrite
    _run(["podman", "save", "--format", "oci-archive", "-o", archive, image])
    command = f"apptainer build {shlex.quote(sif_path)} oci-archive://{shlex.quote(os.path.abspath(archive))}"
    if not shutil.which("apptainer"):
        return SifResult(archive, None, command)
    _run(["apptainer", "build", "--force", sif_path, f"oci-archive://{os.path.abspath(archive)}"])
    if not os.path.exists(sif_path):
        raise ImageError(f"{command} did not produce {sif_path}")
    _run(["apptainer", "test", sif_path])
    return SifResult(archive, sif_path, command)


# --- apptainer.def from the Containerfile ----------------------------------------------------------


def _arguments(containerfile: str) -> dict[str, str]:
    """ARG defaults, which Apptainer cannot take at build time the way Podman does."""
    values = {}
    with open(containerfile, encoding="utf-8") as handle:
        for line in handle:
            match = re.match(r"^\s*ARG\s+(\w+)=(\S+)", line)
            if match:
                values[match[1]] = match[2].strip("\"'")
    return values


def _substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0]), text)


def _whole_copies(files: list[list[str]]) -> list[list[str]]:
    """Drop entries that lie inside a folder also listed, and repeats.

    The Containerfile copies batch/__init__.py before batch/ to keep its dependency layer cacheable;
    Apptainer copies every %files entry before %post, and copying batch/ into the folder the first
    entry created would nest it as batch/batch/.
    """
    sources = [os.path.normpath(source) for source, _ in files]
    kept = []
    for (source, target), normal in zip(files, sources):
        inside_another = any(normal.startswith(other + os.sep) for other in sources)
        if not inside_another and [source, target] not in kept:
            kept.append([source, target])
    return kept


def definition(containerfile: str = "Containerfile") -> str:
    from spython.main.parse.parsers import DockerParser
    from spython.main.parse.writers import SingularityWriter

    stages = DockerParser(containerfile, load=False).parse()  # load=True would parse it a second time
    if len(stages) != 1:
        raise ImageError(f"{containerfile} has {len(stages)} stages; the definition supports one")
    (recipe,) = stages.values()
    values = _arguments(containerfile)
    environment = {line.split("=", 1)[0]: _substitute(line, values) for line in recipe.environ}
    labels = []
    for (line,) in recipe.labels:
        key, _, quoted = line.rstrip(" \\").partition("=")
        value = quoted.strip('"')
        if key not in BUILD_LABELS:
            labels.append(f"{key} {_substitute(value, values)}")
    post = []
    for line in recipe.install:
        name = line.split("=", 1)[0]
        if line.startswith("USER ") or name in values:
            continue  # Apptainer runs as the caller; ARG values are substituted where used
        post.append(f"export {environment[name]}" if name in environment and "=" in line else line)
    recipe.labels, recipe.install, recipe.environ = [[label] for label in labels], post, list(environment.values())
    recipe.files = _whole_copies(recipe.files)
    runscript = _runscript(recipe.entrypoint, recipe.cmd)
    recipe.workdir, recipe.entrypoint, recipe.cmd = None, None, None
    text = SingularityWriter(stages).convert()
    text = re.sub(r"%runscript\n.*?(?=\n%|\Z)", lambda _match: f"%runscript\n{runscript}", text, flags=re.S)
    text = re.sub(r"\n%startscript\n.*?(?=\n%|\Z)", "", text, flags=re.S)
    text = re.sub(r"\nStage: spython-base\n+", "\n\n", text).lstrip()
    text = re.sub(r"\ABootstrap: docker\nFrom: ([^\n]*)\n", lambda match: BASE.format(image=match[1]), text)
    header = f"# Generated from {os.path.basename(containerfile)} by `batch image def`; do not edit by hand.\n"
    extras = f"\n%help\n{HELP.format(version=values.get('VERSION', batch.__version__))}\n\n%test\n{TEST}\n"
    return header + text.rstrip() + "\n" + extras


def _runscript(entrypoint: list[str], default_arguments: list[str]) -> str:
    """ENTRYPOINT run with the caller's arguments, or with CMD when there are none."""
    default = f'[ "$#" -gt 0 ] || set -- {shlex.join(default_arguments)}\n' if default_arguments else ""
    return f'{default}exec {shlex.join(entrypoint)} "$@"'


def check_definition(containerfile: str, committed: str) -> str | None:
    """None when the committed file is what the Containerfile gives, else a unified diff."""
    import difflib

    wanted = definition(containerfile)
    try:
        with open(committed, encoding="utf-8") as handle:
            current = handle.read()
    except FileNotFoundError:
        return f"{committed} does not exist; write it with `batch image def`"
    if current == wanted:
        return None
    return "".join(difflib.unified_diff(current.splitlines(True), wanted.splitlines(True), committed, "from " + containerfile))
