"""ckd.loop: the loop mechanics the teacher and student trainers share."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ckd.loop import (commit_dir, count_parameters, epoch_batches, fresh_dir, rng_state, set_rng_state,
                      staging_dir, torch_permutation, write_dir_atomically)

pytestmark = pytest.mark.unit

LENGTHS = np.array([5, 1, 9, 3, 3, 7, 2, 8, 4, 6, 1])


def test_epoch_batches_cover_rows_once_and_bucket_by_length():
    lengths = np.random.default_rng(0).integers(1, 50, size=1000)

    def draw(bucket):
        perm = torch_permutation(torch.Generator().manual_seed(3))
        return epoch_batches(perm(len(lengths)), lengths, 64, bucket, perm)

    a, b = draw(4), draw(4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # seeded
    assert np.array_equal(np.sort(np.concatenate(a)), np.arange(1000))
    # inside a batch rows are length-sorted, so the padding cost is far below the plain shuffle's
    plain = draw(0)
    pad = lambda bs: sum(len(x) * lengths[x].max() for x in bs)  # noqa: E731
    assert pad(a) < 0.75 * pad(plain)
    assert all(np.all(np.diff(lengths[x]) >= 0) for x in a)


def test_teacher_stream_gives_the_batches_the_teacher_loop_always_drew():
    # Expected values are the output of teachers/training.epoch_batches before the loops shared this
    # function (torch.randperm of the rows, then of the batches, from one generator): a change of
    # draw order or of generator would change every teacher run.
    def draw(bucket):
        perm = torch_permutation(torch.Generator().manual_seed(3))
        return [b.tolist() for b in epoch_batches(perm(len(LENGTHS)), LENGTHS, 3, bucket, perm)]

    assert draw(2) == [[1, 10, 8], [0, 9, 5], [7, 2], [6, 3, 4]]
    assert draw(0) == [[9, 0, 3], [6, 4, 5], [2, 8, 1], [10, 7]]


def test_student_stream_gives_the_batches_the_student_loop_always_drew():
    # Expected values are the output of student.trainer.Trainer.epoch_batches before the loops shared
    # this function: the sampler's shuffled shard, the trailing partial batch dropped, the batch order
    # from numpy's default_rng([seed, epoch, rank]).
    shard = np.array([10, 4, 7, 0, 2, 9, 5, 1, 8, 3, 6])

    def draw(rows, bucket):
        rng = np.random.default_rng([5, 1, 0])
        return [b.tolist() for b in epoch_batches(rows, LENGTHS, 3, bucket, rng.permutation, drop_last=True)]

    assert draw(shard, 2) == [[10, 4, 0], [1, 8, 5], [9, 7, 2]]
    assert draw(shard, 0) == [[10, 4, 7], [0, 2, 9], [5, 1, 8]]
    assert draw(shard[:2], 2) == [[10, 4]]  # a shard smaller than one batch is kept whole


def test_a_failed_write_leaves_the_previous_folder_intact(tmp_path):
    final = tmp_path / "last"
    write_dir_atomically(final, lambda d: (d / "state.json").write_text("1"))

    def broken(d):
        (d / "state.json").write_text("2")
        raise KeyboardInterrupt  # interrupted mid-save

    with pytest.raises(KeyboardInterrupt):
        write_dir_atomically(final, broken)
    assert (final / "state.json").read_text() == "1"
    # the next save starts from an empty staging folder and replaces the copy
    write_dir_atomically(final, lambda d: (d / "other.json").write_text("3"))
    assert sorted(p.name for p in final.iterdir()) == ["other.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_staged_commit_replaces_in_two_steps(tmp_path):
    final = tmp_path / "last"
    final.mkdir()
    (final / "a").write_text("old")
    tmp = fresh_dir(final)
    assert tmp == staging_dir(final) and tmp.is_dir() and not any(tmp.iterdir())
    (tmp / "a").write_text("new")
    assert (final / "a").read_text() == "old"  # nothing changes before the commit
    commit_dir(tmp, final)
    assert (final / "a").read_text() == "new" and not tmp.exists()


def test_rng_state_round_trip_replays_both_streams():
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(5)
    torch.rand(3), torch.randperm(10, generator=gen)
    saved = rng_state(gen)
    first = torch.rand(4), torch.randperm(10, generator=gen)
    torch.manual_seed(99)
    gen.manual_seed(99)
    set_rng_state(saved, gen)
    again = torch.rand(4), torch.randperm(10, generator=gen)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert "shuffle" not in rng_state()


def test_count_parameters_all_or_trainable():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    assert count_parameters(model) == 3 * 4 + 4 + 4 * 2 + 2
    assert count_parameters(model, trainable_only=True) == 4 + 4 * 2 + 2
