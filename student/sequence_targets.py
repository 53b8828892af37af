"""The train split regrouped for training at every position (SASRec's original objective).

UniSRec's processed train files hold one row per (history, next item) pair: every prefix of a
user's training sequence is its own row. Training at every position reads the same pairs from one
row per chain of prefixes: the longest row of the chain, where position k's target is the item
that follows the first k + 1 items. A position is supervised only when its (history, next item)
pair is a row of the original split, so the set of pairs trained on is exactly the original one,
each once; only the grouping into forward passes changes. Histories capped at ``max_len`` slide,
so a capped user's later windows form chains of their own, supervised at their last position.
"""
from __future__ import annotations

import logging

import numpy as np

from ckd.data.multidomain import PAD, SeqExamples

log = logging.getLogger("ckd")


def every_position_view(train: SeqExamples) -> SeqExamples:
    """``train`` as chain rows with ``position_targets`` [N', L] (PAD where no pair is trained).

    A row whose target is not the next item of a longer row's history heads a chain of its own, so it
    keeps its pair. Raises ValueError when the view still does not train exactly the rows' pairs (a
    repeated row), so a run never silently trains on a different set of pairs.
    """
    n, L = train.histories.shape
    # (user, history) -> target of that row
    row_keys = {(int(train.users[i]), train.histories[i, : train.lengths[i]].tobytes()): int(train.targets[i])
                for i in range(n)}
    heads = []
    for i in range(n):
        extended = np.append(train.histories[i, : train.lengths[i]], train.targets[i])
        if (int(train.users[i]), extended.tobytes()) not in row_keys:  # else a position of a longer row
            heads.append(i)
    rows = np.asarray(heads, dtype=np.int64)
    view = train.subset(rows)
    pos = np.full((len(rows), L), PAD, dtype=np.int64)
    for r, i in enumerate(rows):
        length = int(train.lengths[i])
        nxt = np.append(train.histories[i, 1:length], train.targets[i])
        user = int(train.users[i])
        for k in range(length):
            if row_keys.get((user, train.histories[i, : k + 1].tobytes())) == nxt[k]:
                pos[r, k] = nxt[k]
    view.position_targets = pos
    supervised = int((pos != PAD).sum())
    if supervised != n:
        raise ValueError(f"every-position view supervises {supervised} positions but the train split has {n} rows: "
                         "the split repeats a (user, history) row, so the two objectives would train on different pairs")
    log.info("every-position objective: %d train rows regrouped into %d chains", n, len(rows))
    return view
