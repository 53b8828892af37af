"""Training losses shared by the teacher kinds."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def domain_ranges(item_domain: torch.Tensor) -> dict[int, tuple[int, int]]:
    """{domain: (start, stop)} of the contiguous global id range each domain owns (PAD, -1, skipped)."""
    out = {}
    for d in torch.unique(item_domain).tolist():
        if d < 0:
            continue
        ids = torch.nonzero(item_domain == d).squeeze(1)
        start, stop = int(ids[0]), int(ids[-1]) + 1
        if stop - start != ids.numel():
            raise ValueError(f"domain {d}'s items are not one contiguous id range")
        out[int(d)] = (start, stop)
    return out


def domain_cross_entropy(seq: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, domains: torch.Tensor,
                         ranges: dict[int, tuple[int, int]], temperature: float) -> torch.Tensor:
    """Mean softmax cross-entropy of ``seq @ table.T / temperature`` over the items of each row's
    own domain ([B, D] sequences, [V, D] item table, global target ids).

    The same loss as a full [B, V] product with other domains' columns masked to -inf (they add
    exp(-inf) = 0 to the partition function), computed per domain block instead: on a union the
    rows of a small domain no longer pay for the large domain's catalogue."""
    total = seq.new_zeros(())
    for d in torch.unique(domains).tolist():
        rows = torch.nonzero(domains == d).squeeze(1)
        start, stop = ranges[int(d)]
        logits = seq[rows] @ table[start:stop].T / temperature
        total = total + F.cross_entropy(logits, targets[rows] - start, reduction="sum")
    return total / targets.shape[0]
