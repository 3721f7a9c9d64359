"""Sources and shards: the same sorted inputs everywhere, each in exactly one shard."""

from __future__ import annotations

import os
import random
import tempfile

import pytest

from batch.environment import JobEnvironment, Shard, ShardingError
from batch.paths import BUCKETS
from batch.sources import SourceError, check_sources, collect
from tests import images


def test_walk_finds_every_image_file_sorted_and_nothing_else(awkward_folder):
    found = collect([str(awkward_folder)])
    expected = sorted(
        [str(awkward_folder / "good" / name) for name in images.GOOD]
        + [str(awkward_folder / "bad" / name) for name in images.BAD]
        + [str(awkward_folder / "folder.jpg" / "inside.jpg")]
    )
    assert found == expected  # upper-case extension, dangling symlink and FIFO in; folder.jpg and readme.txt out


def test_overlapping_sources_and_lists_give_each_file_once(tmp_path, awkward_folder):
    listing = tmp_path / "list.txt"
    inside = awkward_folder / "folder.jpg" / "inside.jpg"
    listing.write_text(f"# a comment\n\n{inside}\n{os.path.relpath(inside, tmp_path)}\n")
    found = collect([f"@{listing}", str(inside), str(awkward_folder / "folder.jpg")])
    assert found == [str(inside)]


def test_list_entries_that_do_not_exist_are_inputs_so_they_get_an_error_row(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("gone.jpg\n")
    assert collect([f"@{listing}"]) == [str(tmp_path / "gone.jpg")]


@pytest.mark.parametrize(
    "source, message",
    [("missing-folder", "source does not exist"), ("@missing.txt", "list file does not exist"),
     ("notes.txt", "neither a folder, an image")],
)  # fmt: skip
def test_bad_sources_are_named(tmp_path, monkeypatch, source, message):
    (tmp_path / "notes.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match=message):
        check_sources([source])


@pytest.mark.parametrize("count", [1, 3, 7, 1000, BUCKETS])
def test_shards_of_any_count_partition_the_buckets_exactly(count):
    ranges = [Shard(index, count).buckets for index in range(count)]
    assert [bucket for buckets in ranges for bucket in buckets] == list(range(BUCKETS))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_more_shards_than_buckets_is_refused():
    with pytest.raises(ShardingError, match=f"between 1 and {BUCKETS}"):
        Shard(0, BUCKETS + 1)


def test_each_input_is_in_exactly_one_shard_whatever_the_count(awkward_folder):
    everything = collect([str(awkward_folder)])
    for count in (1, 2, 5):
        shards = [collect([str(awkward_folder)], Shard(index, count).buckets) for index in range(count)]
        assert sorted(path for shard in shards for path in shard) == everything


def test_array_that_starts_at_one_and_steps_by_two():
    """--array=1-7:2 runs tasks 1, 3, 5, 7: four shards, 0..3."""
    shards = [
        JobEnvironment({"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2",
                        "SLURM_ARRAY_TASK_COUNT": "4"}).shard()
        for task in (1, 3, 5, 7)
    ]  # fmt: skip
    assert shards == [Shard(index, 4) for index in range(4)]


def test_srun_tasks_inside_an_array_task_split_it_further():
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "4",
           "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}  # fmt: skip
    assert JobEnvironment(env).shard() == Shard(5, 8)
    assert JobEnvironment({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}).shard() == Shard(3, 4)
    assert JobEnvironment({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).shard() is None
    assert JobEnvironment({}).shard() is None


def test_irregular_array_asks_for_explicit_shards():
    env = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "3"}
    with pytest.raises(ShardingError, match="--num-shards"):
        JobEnvironment(env).shard()


def test_cpus_come_from_slurm_first():
    assert JobEnvironment({"SLURM_CPUS_PER_TASK": "12"}).cpus() == 12
    assert JobEnvironment({}).cpus() == len(os.sched_getaffinity(0))


def test_sorting_does_not_depend_on_directory_order(tmp_path):
    names = [f"{n:03d}.png" for n in range(50)]
    random.Random(1).shuffle(names)
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert collect([str(tmp_path)]) == sorted(str(tmp_path / name) for name in names)


def test_caches_move_to_a_private_temp_folder_when_home_cannot_hold_them(tmp_path, monkeypatch):
    from batch.environment import redirect_unwritable_caches

    monkeypatch.setenv("HOME", str(tmp_path / "missing" / "home"))
    (tmp_path / "missing").write_text("a file, so nothing can be created below it")
    env = {"TRITON_CACHE_DIR": "/kept"}
    moved = redirect_unwritable_caches(env)
    assert set(moved) == {"XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR"} and env["TRITON_CACHE_DIR"] == "/kept"
    assert all(path.startswith(tempfile.gettempdir()) for path in moved.values())
    monkeypatch.setenv("HOME", str(tmp_path))
    assert redirect_unwritable_caches({}) == {}
