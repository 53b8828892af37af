"""A served teacher's memo of history representations: each distinct history is encoded once.

A student asks for soft labels of the same training rows every epoch; only the candidates a row
is scored against change (the other rows of its reshuffled batch, or a new sample). A frozen
teacher's representation of a history does not depend on the request, so the server may keep it:
``score = similarity(encode(history), candidates)`` then costs the lookup and the product, not the
transformer pass. This is a memo of the teacher's own intermediate state, filled on the fly from
the requests it serves; it holds no soft labels (every score is still computed per request, for the
candidates of that request) and nothing is precomputed before training starts.

Bounded: least-recently-used entries leave once the memo holds more than its byte budget
(``ServiceLimits.history_memo_bytes``; 0 turns it off). Keyed by the history's ids up to its length,
so padding width and batch-mates do not matter. Valid for one model state and one inference
precision only: the owner passes a ``version`` with every call, and a new version empties the memo.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable

import numpy as np
import torch

# Bytes an entry costs beyond its slab row and key: its OrderedDict slot, the bytes object's header
# and its slot number. Measured about 140 (100,000 entries, CPython 3.11); 200 is counted so that
# many short entries cannot overrun the budget.
ENTRY_OVERHEAD_BYTES = 200

Encoder = Callable[[np.ndarray, np.ndarray], torch.Tensor]


class HistoryMemo:
    """LRU memo ``history ids -> [D] representation`` under a byte budget.

    Representations live as rows of one growing slab tensor (a tensor object per entry would cost
    about 600 bytes of headers each); the dict maps each key to its slab row, and rows freed by
    eviction are reused."""

    def __init__(self, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"history memo needs a positive byte budget, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._slots: OrderedDict[bytes, int] = OrderedDict()
        self._slab: torch.Tensor | None = None  # [capacity, D]
        self._free: list[int] = []
        self._used = 0  # slab rows handed out so far (freed ones are in _free)
        self._version: Hashable | None = None
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._slots)

    def clear(self) -> None:
        """Forget every entry and the slab (the counters stay)."""
        self._slots.clear()
        self._slab, self._free, self._used, self.bytes = None, [], 0, 0

    def stats(self) -> dict[str, Any]:
        """Counters for logs and benchmarks."""
        seen = self.hits + self.misses
        return {"entries": len(self._slots), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "hit_rate": self.hits / seen if seen else 0.0}

    def _row_bytes(self) -> int:
        assert self._slab is not None
        return int(self._slab[0].numel()) * self._slab.element_size()

    def _max_rows_for(self, row_bytes: int) -> int:
        """Slab rows the budget allows: every entry takes a row, its key (8 bytes at least) and the overhead."""
        return max(1, self.max_bytes // (row_bytes + 8 + ENTRY_OVERHEAD_BYTES))

    @staticmethod
    def _key_cost(key: bytes) -> int:
        return len(key) + ENTRY_OVERHEAD_BYTES

    def encode(self, histories: np.ndarray, lengths: np.ndarray, encoder: Encoder,
               version: Hashable) -> torch.Tensor:
        """[B, D] representations of ``histories`` [B, L] (right-padded ids) with ``lengths`` [B]:
        memo hits are read back, the distinct missing histories go to ``encoder`` in one call (as
        a [M, L'] array trimmed to their longest row, with their lengths) and are kept."""
        if version != self._version:
            self.clear()
            self._version = version
        hist = np.asarray(histories)
        lens = np.asarray(lengths).astype(np.int64, copy=False)
        if hist.ndim != 2 or lens.shape != (hist.shape[0],):
            raise ValueError(f"history memo: histories [B, L] and lengths [B], got {list(hist.shape)} "
                             f"and {list(lens.shape)}")
        if hist.shape[0] == 0:
            return encoder(hist, lens)
        keys = [hist[i, : lens[i]].astype(np.int64, copy=False).tobytes() for i in range(hist.shape[0])]
        missing: dict[bytes, int] = {}  # distinct missing key -> its row in the encoder's batch
        first_rows: list[int] = []  # the first batch row holding each missing key
        for i, key in enumerate(keys):
            if key in missing:
                continue
            if key in self._slots:
                self._slots.move_to_end(key)
            else:
                missing[key] = len(first_rows)
                first_rows.append(i)
        # A miss is a history encoded; every other row (a memo hit, or a repeat within the batch) is a hit.
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        fresh = None
        if missing:
            rows = np.asarray(first_rows, dtype=np.int64)
            sub_lens = lens[rows]
            width = max(1, int(sub_lens.max()))
            fresh = encoder(np.ascontiguousarray(hist[rows, :width]), sub_lens).detach()
        like = fresh if fresh is not None else self._slab
        out = torch.empty((len(keys), *like.shape[1:]), dtype=like.dtype, device=like.device)
        # Read the hits before storing the new rows: storing may evict (and reuse) a hit's slab row.
        hit_pos = [i for i, k in enumerate(keys) if k not in missing]
        if hit_pos:
            slots = torch.tensor([self._slots[keys[i]] for i in hit_pos], device=out.device)
            out[hit_pos] = self._slab.index_select(0, slots).to(out.dtype)
        if fresh is not None:
            miss_pos = [i for i, k in enumerate(keys) if k in missing]
            out[miss_pos] = fresh[[missing[keys[i]] for i in miss_pos]]
            for key, j in missing.items():
                self._put(key, fresh[j])
        return out

    def _free_slot(self) -> int | None:
        """A free slab row: a freed one, else a new one (the slab doubles, up to ``_max_rows``)."""
        if self._free:
            return self._free.pop()
        assert self._slab is not None
        cap = int(self._slab.shape[0])
        if self._used == cap:
            new_cap = min(2 * cap, self._max_rows_for(self._row_bytes()))
            if new_cap == cap:
                return None
            grown = torch.empty((new_cap, *self._slab.shape[1:]), dtype=self._slab.dtype, device=self._slab.device)
            grown[:cap] = self._slab
            self._slab = grown
            self.bytes += (new_cap - cap) * self._row_bytes()
        self._used += 1
        return self._used - 1

    def _evict_oldest(self) -> None:
        old_key, old_slot = self._slots.popitem(last=False)
        self._free.append(old_slot)
        self.bytes -= self._key_cost(old_key)
        self.evictions += 1

    def _put(self, key: bytes, rep: torch.Tensor) -> None:
        """Keep ``rep`` under ``key``. ``bytes`` counts the whole slab (used or not) plus every
        key's cost, and never exceeds ``max_bytes``."""
        if self._slab is None:
            rows = min(64, self._max_rows_for(rep.numel() * rep.element_size()))
            self._slab = torch.empty((rows, *rep.shape), dtype=rep.dtype, device=rep.device)
            self.bytes += int(self._slab.shape[0]) * self._row_bytes()
            if self.bytes > self.max_bytes:  # not even one row fits: keep nothing
                self.clear()
                return
        cost = self._key_cost(key)
        while self._slots and self.bytes + cost > self.max_bytes:
            self._evict_oldest()
        if self.bytes + cost > self.max_bytes:
            return  # larger than the whole budget: served, never kept
        slot = self._free_slot()
        while slot is None:  # the slab is at its largest: reuse the oldest entry's row
            self._evict_oldest()
            slot = self._free_slot()
        while self._slots and self.bytes + cost > self.max_bytes:  # the slab may just have grown
            self._evict_oldest()
        if self.bytes + cost > self.max_bytes:
            self._free.append(slot)
            return
        self._slab[slot] = rep
        self._slots[key] = slot
        self.bytes += cost
