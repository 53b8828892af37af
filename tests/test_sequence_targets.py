"""Training at every position (train.objective=all_positions): the same pairs as the prefix rows."""
import dataclasses
import types

import numpy as np
import pytest
import torch

from ckd.data.multidomain import SeqExamples
from student.sequence_targets import every_position_view


def examples(rows, max_len):
    """SeqExamples from (user, history, target) rows, one domain."""
    n = len(rows)
    hist = np.zeros((n, max_len), dtype=np.int64)
    for r, (_, h, _) in enumerate(rows):
        hist[r, : len(h)] = h
    return SeqExamples(np.array([u for u, _, _ in rows], dtype=np.int64), np.zeros(n, dtype=np.int64), hist,
                       np.array([len(h) for _, h, _ in rows], dtype=np.int64),
                       np.array([t for _, _, t in rows], dtype=np.int64))


def pairs(ex):
    """The (user, history, target) pairs a split trains on under either objective."""
    out = []
    for i in range(len(ex)):
        h = ex.histories[i, : ex.lengths[i]].tolist()
        if ex.position_targets is None:
            out.append((int(ex.users[i]), tuple(h), int(ex.targets[i])))
        else:
            out += [(int(ex.users[i]), tuple(h[: k + 1]), int(t))
                    for k, t in enumerate(ex.position_targets[i]) if t != 0]
    return sorted(out)


def test_prefix_rows_become_one_chain_per_user_and_capped_windows_train_their_last_position():
    # user 0: items 1..4 (rows for prefixes of length 1..3); user 1: items 5..9 with max_len 3, so
    # its histories slide once they reach three items.
    rows = [(0, [1, 2, 3], 4), (0, [1, 2], 3), (0, [1], 2),
            (1, [5], 6), (1, [5, 6], 7), (1, [5, 6, 7], 8), (1, [6, 7, 8], 9)]
    view = every_position_view(examples(rows, max_len=3))
    got = {(int(u), tuple(h[:n]), int(t)): p.tolist()
           for u, h, n, t, p in zip(view.users, view.histories, view.lengths, view.targets, view.position_targets)}
    assert got == {(0, (1, 2, 3), 4): [2, 3, 4],
                   (1, (5, 6, 7), 8): [6, 7, 8],
                   (1, (6, 7, 8), 9): [0, 0, 9]}  # [6] and [6, 7] are not rows: only the last position
    assert pairs(view) == pairs(examples(rows, max_len=3))


def test_a_row_whose_target_breaks_the_chain_keeps_its_own_pair():
    # [1] -> 5 although the longer row's history continues [1, 2]: that position must not train "2".
    rows = [(0, [1, 2], 3), (0, [1], 5)]
    view = every_position_view(examples(rows, max_len=4))
    assert pairs(view) == pairs(examples(rows, max_len=4)) == [(0, (1,), 5), (0, (1, 2), 3)]


def test_a_repeated_row_is_a_named_error():
    rows = [(0, [1, 2], 3), (0, [1], 2), (0, [1], 2)]
    with pytest.raises(ValueError, match="repeats a .user, history. row"):
        every_position_view(examples(rows, max_len=4))


def test_scientific_chains_train_exactly_the_prefix_rows_pairs(scientific):
    train = scientific.splits["train"]
    view = every_position_view(train)
    assert len(train) == 34101 and len(view) == 8479  # 8,442 users + 37 later windows of capped users
    assert int((view.position_targets != 0).sum()) == 34101
    assert pairs(view) == pairs(train)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.9])  # 0.9: a gap the 1e-5 check sees on near-uniform logits
def test_position_logits_and_loss_equal_the_prefix_rows_ones(scientific, label_smoothing):
    from student.models.sasrec import SASRec
    from student.trainer import make_student_batch

    torch.manual_seed(0)
    model = SASRec(scientific.vocab_size, max_len=50, hidden=16, layers=2, heads=2, dropout=0.5).eval()
    chains = every_position_view(scientific.splits["train"])
    # 40 users whose histories never reach the cap: one chain each, holding all their rows' pairs.
    pick = np.flatnonzero(chains.lengths < 50)[:40]
    users = chains.users[pick]
    chain_batch = make_student_batch(dataclasses.replace(scientific, splits={"train": chains}), "train", pick)
    prefix_idx = np.flatnonzero(np.isin(scientific.splits["train"].users, users))
    # Row-major order of the chain positions = users in chain order, then growing prefixes.
    order = np.lexsort((scientific.splits["train"].lengths[prefix_idx],
                        np.searchsorted(users, scientific.splits["train"].users[prefix_idx])))
    prefix_batch = make_student_batch(scientific, "train", prefix_idx[order])
    assert np.all(np.diff(users) > 0)  # sorted and unique, so searchsorted gives each user's chain rank
    with torch.no_grad():
        at_positions = model(chain_batch)
        at_last = model(prefix_batch)
    assert at_positions.shape == at_last.shape == (len(prefix_idx), scientific.vocab_size)
    torch.testing.assert_close(at_positions, at_last, atol=1e-5, rtol=1e-5)

    from ckd.config import load_config
    from student.config import DistillConfig
    from student.trainer import Trainer

    # ce_loss reads the domain ranges and the resolved config (label smoothing must reach both branches)
    cfg = load_config(DistillConfig, None, overrides=[f"train.label_smoothing={label_smoothing}"])
    trainer = types.SimpleNamespace(domain_ranges=[scientific.domain_range(0)], cfg=cfg)
    loss_positions = Trainer.ce_loss(trainer, at_positions, chain_batch)
    loss_rows = Trainer.ce_loss(trainer, at_last, prefix_batch)
    assert float(loss_positions) == pytest.approx(float(loss_rows), rel=1e-5)
    assert float(loss_rows) == pytest.approx(np.log(4385), rel=0.01)  # untrained: about uniform


def test_other_students_refuse_position_targets(scientific):
    from student.models import build_student

    fm = build_student("fm", scientific, hidden=8)
    chains = every_position_view(scientific.splits["train"])
    from student.trainer import make_student_batch

    batch = make_student_batch(dataclasses.replace(scientific, splits={"train": chains}), "train", np.arange(4))
    with pytest.raises(NotImplementedError, match="last position only"):
        fm(batch)
