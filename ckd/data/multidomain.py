"""Several domains merged into one global item-id space (id 0 = padding).

Global item id of domain d's local item i is ``offset_d + i + 1``; users likewise get global ids.
Every item and every user carries a domain id, and each domain owns a contiguous id range, so full
ranking over "all items of the user's domain" is a slice of the catalogue.
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ckd.data.unisrec import DomainData, Split, load_domain

PAD = 0


@dataclass
class SeqExamples:
    """One split of the merged data as padded arrays (histories oldest first, right-padded)."""

    users: np.ndarray  # int64 [N] global user ids
    domains: np.ndarray  # int64 [N]
    histories: np.ndarray  # int64 [N, L], PAD after `lengths`
    lengths: np.ndarray  # int64 [N], 1..L
    targets: np.ndarray  # int64 [N] global item ids
    # int64 [N, L] or None: the item each position should predict (PAD = no loss there), for
    # training at every position (student.sequence_targets); None = the last position only.
    position_targets: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def subset(self, idx: np.ndarray) -> "SeqExamples":
        pos = None if self.position_targets is None else self.position_targets[idx]
        return SeqExamples(self.users[idx], self.domains[idx], self.histories[idx],
                           self.lengths[idx], self.targets[idx], pos)


@dataclass
class MultiDomainDataset:
    """Merged domains: global ids, per-item domain, text and features aligned to global ids."""

    domain_names: list[str]
    domains: list[DomainData]
    max_len: int
    item_offsets: list[int]  # global id = offset + local + 1
    user_offsets: list[int]
    splits: dict[str, SeqExamples]
    item_domain: np.ndarray  # int64 [vocab_size], -1 at PAD
    item_texts: list[str]  # [vocab_size], "" where a domain has no text
    has_text: np.ndarray  # bool [vocab_size]
    features: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float32 [vocab, d]
    feature_mask: dict[str, np.ndarray] = field(default_factory=dict)  # name -> bool [vocab]

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    @property
    def vocab_size(self) -> int:
        """Number of item ids including PAD."""
        return int(self.item_domain.shape[0])

    @property
    def num_users(self) -> int:
        return self.user_offsets[-1] + self.domains[-1].num_users

    def domain_range(self, d: int) -> tuple[int, int]:
        """Global item ids [start, stop) of domain d."""
        start = self.item_offsets[d] + 1
        return start, start + self.domains[d].num_items

    def domain_index(self, name: str) -> int:
        return self.domain_names.index(name)

    def vocab_hash(self) -> str:
        """Item-id-space version: sha256 over domain names and item tokens in global order."""
        return self.prefix_vocabularies()[-1][0]

    def prefix_vocabularies(self) -> list[tuple[str, int]]:
        """(vocab_hash, vocab_size with PAD) of the dataset built from the first k domains, for
        k = 1..num_domains, in one pass. Domains are laid out in order, so such a dataset's global
        ids are the same as here: a teacher of a prefix can score this dataset's rows of it."""
        h = hashlib.sha256()
        out = []
        for d in range(self.num_domains):
            self._hash_domain(h, d)
            out.append((h.copy().hexdigest(), self.domain_range(d)[1]))
        return out

    def _hash_domain(self, h: "hashlib._Hash", d: int) -> None:
        """Feed domain ``d`` (its name, then its item tokens in local order) to the vocabulary hash."""
        h.update(self.domain_names[d].encode())
        h.update(b"\0")
        h.update("\n".join(self.domains[d].item_tokens).encode())
        h.update(b"\0")

    def domain_order_of(self, vocab_hash: str, max_domains: int = 5) -> list[str] | None:
        """The ordered domains, among this dataset's, whose merged id space has ``vocab_hash``
        (e.g. a teacher trained on the same domains in another order); None when no ordering of
        any subset matches. Tries every ordered subset, so only for up to ``max_domains`` domains."""
        if self.num_domains > max_domains:
            return None
        for k in range(1, self.num_domains + 1):
            for order in itertools.permutations(range(self.num_domains), k):
                h = hashlib.sha256()
                for d in order:
                    self._hash_domain(h, d)
                if h.hexdigest() == vocab_hash:
                    return [self.domain_names[d] for d in order]
        return None

    def item_popularity(self) -> np.ndarray:
        """Training-split frequency of each global item (histories' last item and targets)."""
        tr = self.splits["train"]
        counts = np.bincount(tr.targets, minlength=self.vocab_size)
        # Each user's first training item is never a target; count it from the shortest rows.
        first = tr.histories[tr.lengths == 1, 0]
        counts += np.bincount(first, minlength=self.vocab_size)
        counts[PAD] = 0
        return counts


def _to_examples(split: Split, item_off: int, user_off: int, domain: int, max_len: int) -> SeqExamples:
    n = len(split)
    hist = np.zeros((n, max_len), dtype=np.int64)
    lens = np.zeros(n, dtype=np.int64)
    for r, h in enumerate(split.histories):
        h = h[-max_len:]
        hist[r, : len(h)] = h + item_off + 1
        lens[r] = len(h)
    return SeqExamples(split.users + user_off, np.full(n, domain, dtype=np.int64), hist, lens,
                       split.targets + item_off + 1)


def _concat(parts: list[SeqExamples]) -> SeqExamples:
    return SeqExamples(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                         ("users", "domains", "histories", "lengths", "targets")))


def build_multidomain(domains: list[DomainData], max_len: int = 50) -> MultiDomainDataset:
    """Merge loaded domains (order defines global ids)."""
    if not domains:
        raise ValueError("no domains given")
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate domain names: {names}")
    if "Scientific" in names and "ScientificMM" in names:
        raise ValueError("ScientificMM's items are a subset of Scientific's: do not merge both")
    item_offsets, user_offsets, io, uo = [], [], 0, 0
    for d in domains:
        item_offsets.append(io)
        user_offsets.append(uo)
        io += d.num_items
        uo += d.num_users
    vocab = io + 1
    item_domain = np.full(vocab, -1, dtype=np.int64)
    texts = [""] * vocab
    has_text = np.zeros(vocab, dtype=bool)
    feat_dims = {k: v.shape[1] for d in domains for k, v in d.features.items()}
    features = {k: np.zeros((vocab, dim), dtype=np.float32) for k, dim in feat_dims.items()}
    fmask = {k: np.zeros(vocab, dtype=bool) for k in feat_dims}
    for di, (d, off) in enumerate(zip(domains, item_offsets)):
        item_domain[off + 1: off + 1 + d.num_items] = di
        if d.texts is not None:
            for i, t in enumerate(d.texts):
                texts[off + 1 + i] = t
                has_text[off + 1 + i] = bool(t)
        for k, mat in d.features.items():
            features[k][off + 1: off + 1 + d.num_items] = mat
            fmask[k][off + 1: off + 1 + d.num_items] = True
    splits = {
        s: _concat([_to_examples(getattr(d, s), io_, uo_, di, max_len)
                    for di, (d, io_, uo_) in enumerate(zip(domains, item_offsets, user_offsets))])
        for s in ("train", "valid", "test")
    }
    return MultiDomainDataset(names, domains, max_len, item_offsets, user_offsets, splits,
                              item_domain, texts, has_text, features, fmask)


def load_multidomain(root: str | Path, names: list[str], max_len: int = 50) -> MultiDomainDataset:
    """Load and merge domains ``names`` from data root ``root``."""
    return build_multidomain([load_domain(root, n) for n in names], max_len=max_len)
