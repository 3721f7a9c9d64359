"""Every option of `batch classify` and `batch bench` reaches its own field of the options the run gets,
and no other; with no options, the run gets the options' own defaults."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import click
import pytest
from click.testing import CliRunner

from batch import bench, cli, pipeline
from batch import plan as planning
from batch.bench import BenchOptions
from batch.environment import Shard
from batch.models import PreprocessOverrides
from batch.plan import ClassifyOptions
from batch.retry_failed import RetryFailed

CLASSIFY_BASE = ["a.jpg", "b", "-o", "out"]
CLASSIFY = [  # arguments beyond the base, and what they change
    (["--model", "resnet18"], {"model": "resnet18"}),
    (["--weights", "IMAGENET1K_V1"], {"weights": "IMAGENET1K_V1"}),
    (["--labels", "names.txt"], {"labels_file": "names.txt"}),
    (["--template", "a {}", "--template", "the {}"], {"templates": ("a {}", "the {}")}),
    (["--resize", "300"], {"overrides": PreprocessOverrides(resize=300)}),
    (["--crop", "250"], {"overrides": PreprocessOverrides(crop=250)}),
    (["--interpolation", "bicubic"], {"overrides": PreprocessOverrides(interpolation="bicubic")}),
    (["--mean", "0.1,0.2,0.3"], {"overrides": PreprocessOverrides(mean=(0.1, 0.2, 0.3))}),
    (["--std", "0.4,0.5,0.6"], {"overrides": PreprocessOverrides(std=(0.4, 0.5, 0.6))}),
    (["--topk", "7"], {"topk": 7}),
    (["--activation", "sigmoid"], {"activation": "sigmoid"}),
    (["--batch-size", "17"], {"batch_size": 17}),
    (["--workers", "3"], {"workers": 3}),
    (["--device", "cuda:5"], {"device": "cuda:5"}),
    (["--precision", "fp16"], {"precision": "fp16"}),
    (["--decode", "gpu"], {"decode": "gpu"}),
    (["--num-shards", "9", "--shard-index", "4"], {"shard": Shard(4, 9)}),
    (["--embeddings"], {"embeddings": True}),
    (["--overwrite"], {"overwrite": True}),
    (["--strict"], {"strict": True}),
    (["--max-error-rate", "0.25"], {"max_error_rate": 0.25}),
    (["--commit-every", "12.5"], {"commit_every": 12.5}),
    (["--decode-timeout", "7.5"], {"decode_timeout": 7.5}),
    (["--io-retries", "5"], {"io_retries": 5}),
    (["--retry-failed"], {"retry_failed": RetryFailed()}),
    (["--retry-failed", "--retry-kind", "io error", "--retry-kind", "truncated"],
     {"retry_failed": RetryFailed(("io error", "truncated"))}),
    (["--verbose"], {"verbose": True}),
]
BENCH = [
    (["x", "y"], {"sources": ("x", "y")}),
    (["--generate", "11"], {"generate": 11}),
    (["--width", "90-130"], {"widths": (90, 130)}),
    (["--model", "resnet18"], {"model": "resnet18"}),
    (["--weights", "none"], {"weights": "none"}),
    (["--labels", "names.txt"], {"labels_file": "names.txt"}),
    (["--template", "a {}", "--template", "the {}"], {"templates": ("a {}", "the {}")}),
    (["--device", "cuda:5"], {"device": "cuda:5"}),
    (["--precision", "bf16"], {"precision": "bf16"}),
    (["--batch-size", "17"], {"batch_size": 17}),
    (["--workers", "3"], {"workers": 3}),
]


def top_level(options: Any) -> dict[str, Any]:
    """A dataclass's fields, nested ones left whole."""
    return {field.name: getattr(options, field.name) for field in fields(options)}


def run_classify(monkeypatch, arguments: list[str]) -> dict[str, Any]:
    """What `batch classify` hands the pipeline, and whether it asked for verbose logs; nothing runs."""
    seen: dict[str, Any] = {}
    monkeypatch.setattr(cli.StopRequest, "install", lambda self: self)
    monkeypatch.setattr(cli, "setup_logging", lambda verbose: seen.update(verbose=verbose))
    monkeypatch.setattr(planning, "plan", lambda options, env: seen.update(top_level(options)))
    monkeypatch.setattr(pipeline, "execute", lambda run, stop: 0)
    result = CliRunner().invoke(cli.classify, [*CLASSIFY_BASE, *arguments])
    assert result.exit_code == 0, result.output
    return seen


def run_bench(monkeypatch, arguments: list[str]) -> dict[str, Any]:
    """What `batch bench` hands the input stage and the measurements; nothing runs."""
    seen: dict[str, Any] = {}

    def resolve_inputs(sources, generate, widths, _folder):
        seen.update(sources=sources, generate=generate, widths=widths)
        return [], "nothing"

    monkeypatch.setattr(cli, "setup_logging", lambda verbose: None)
    monkeypatch.setattr(bench, "resolve_inputs", resolve_inputs)
    monkeypatch.setattr(bench, "run", lambda paths, options, described: seen.update(top_level(options)) or iter(()))
    result = CliRunner().invoke(cli.bench, arguments)
    assert result.exit_code == 0, result.output
    return seen


RUNNERS = {"classify": (run_classify, CLASSIFY_BASE, CLASSIFY), "bench": (run_bench, [], BENCH)}


def changed(got: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    assert got.keys() == base.keys()
    return {name: value for name, value in got.items() if value != base[name]}


@pytest.mark.parametrize(
    "command, arguments, expected",
    [(command, arguments, expected) for command, (_run, _base, cases) in RUNNERS.items() for arguments, expected in cases],
)
def test_an_option_changes_its_own_field_and_no_other(monkeypatch, command, arguments, expected):
    run, _base, _cases = RUNNERS[command]
    assert changed(run(monkeypatch, arguments), run(monkeypatch, [])) == expected


@pytest.mark.parametrize("command", sorted(RUNNERS))
def test_every_option_is_checked_above(command):
    _run, base, cases = RUNNERS[command]
    named = {*base, *(argument for arguments, _expected in cases for argument in arguments)}
    options = [param for param in getattr(cli, command).params if isinstance(param, click.Option)]
    assert [param.opts for param in options if not named & set(param.opts)] == []


def test_without_options_the_runs_get_the_options_defaults(monkeypatch):
    expected = top_level(ClassifyOptions(sources=("a.jpg", "b"), output="out"))
    assert run_classify(monkeypatch, []) == {**expected, "verbose": False}
    inputs = {"sources": (), "generate": 256, "widths": (500, 500)}
    assert run_bench(monkeypatch, []) == {**inputs, **top_level(BenchOptions())}


def test_the_help_names_the_defaults_and_choices_the_model_modules_hold():
    """cli.py imports the model modules only inside commands, to keep --help instant, so it writes out what
    they hold: the activations, the interpolations and CLIP's default prompt are held equal to theirs here."""
    from batch import decode, model_clip, models

    options = {param.name: param for param in cli.classify.params}
    assert tuple(options["activation"].type.choices) == models.ACTIVATIONS
    assert set(options["interpolation"].type.choices) == set(decode.INTERPOLATIONS)
    assert options["templates"].help.endswith(f"[default: {', '.join(map(repr, model_clip.DEFAULT_TEMPLATES))}]")
