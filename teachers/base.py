"""The interface every teacher implements, and its checkpoint format.

The service calls only ``score`` and ``describe``; evaluation calls ``ranking_scores`` (the
``ckd.metrics.RankingModel`` contract students follow too), i.e. ``full_scores``. Histories are
padded global item ids (oldest first, right-padded with 0) with their lengths; candidates are
global item ids, shared by the batch ([C]) or given per row ([B, C]). Teachers return raw scores:
temperature and distillation math belong to the student side.

Checkpoint = ``<dir>/model.safetensors`` + ``<dir>/config.json`` (teacher kind, its config, the
vocabulary hash and item count it was trained on).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from protos.contract import TeacherContractError, TeacherInfo


class Teacher(torch.nn.Module):
    """Base class: subclasses implement ``encode_histories`` and ``item_embeddings``; scoring is
    ``sim(h, e_c) / 1`` — raw similarity (cosine for the text teachers)."""

    kind: str = "teacher"
    version: str = "1"

    def __init__(self, vocab_hash: str, num_items: int, temperature: float, max_history: int):
        super().__init__()
        self.vocab_hash = vocab_hash
        self.num_items = num_items
        self.temperature = temperature
        self.max_history = max_history
        self.checkpoint_sha256 = ""
        self._item_cache: torch.Tensor | None = None  # item_embeddings of every id, eval mode only

    # -- to implement -------------------------------------------------------------------------
    def encode_histories(self, histories: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, L] ids, [B] lengths -> [B, D] sequence representation."""
        raise NotImplementedError

    def item_embeddings(self, item_ids: torch.Tensor) -> torch.Tensor:
        """[...] global ids -> [..., D] item representations (same space as histories)."""
        raise NotImplementedError

    def config_dict(self) -> dict[str, Any]:
        """Constructor arguments needed to rebuild the model (JSON-serialisable)."""
        raise NotImplementedError

    # -- provided -----------------------------------------------------------------------------
    def similarity(self, seq: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """seq [B, D] against items [C, D] or [B, C, D] -> [B, C]. Default: dot product."""
        if items.dim() == 2:
            return seq @ items.T
        return torch.einsum("bd,bcd->bc", seq, items)

    @torch.no_grad()
    def score(self, histories: torch.Tensor, lengths: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Raw scores float32 [B, C] of each history against the candidates."""
        seq = self.encode_histories(histories, lengths)
        return self.similarity(seq, self.candidate_embeddings(candidates)).float()

    def candidate_embeddings(self, candidates: torch.Tensor) -> torch.Tensor:
        """``item_embeddings(candidates)``; in eval mode read from a table of every item, built once.

        A served teacher is frozen, and an item's representation does not depend on the request
        (text teachers pass every item through an adaptor or a PLM), so a distillation request over
        thousands of candidates costs one lookup instead of a forward pass per candidate. The table
        is dropped by ``train()`` and ``load_state_dict``, so a teacher in training never reads a stale one.
        """
        if self.training:
            return self.item_embeddings(candidates)
        cache = self._item_cache
        if cache is None or cache.device != candidates.device:
            ids = torch.arange(self.num_items, device=candidates.device)
            with torch.no_grad():
                cache = torch.cat([self.item_embeddings(ids[i: i + 4096]) for i in range(0, self.num_items, 4096)])
            self._item_cache = cache
        return cache[candidates]

    def train(self, mode: bool = True) -> "Teacher":
        self._item_cache = None
        return super().train(mode)

    def load_state_dict(self, *args, **kwargs):
        self._item_cache = None
        return super().load_state_dict(*args, **kwargs)

    @torch.no_grad()
    def full_scores(self, histories: torch.Tensor, lengths: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Scores over the global id range [start, stop) (one domain's catalogue)."""
        ids = torch.arange(start, stop, device=histories.device)
        return self.score(histories, lengths, ids)

    def ranking_scores(self, users: torch.Tensor, histories: torch.Tensor, lengths: torch.Tensor,
                       start: int, stop: int) -> torch.Tensor:
        """The ``ckd.metrics.RankingModel`` contract every model follows: ``full_scores`` (a
        teacher reads the histories only, not the user ids)."""
        return self.full_scores(histories, lengths, start, stop)

    def describe(self) -> TeacherInfo:
        return TeacherInfo(self.kind, self.version, self.vocab_hash, self.num_items,
                           float(self.temperature), int(self.max_history), self.checkpoint_sha256, kind=self.kind)


# Registry: kind -> class. Teachers register themselves on import.
TEACHERS: dict[str, type[Teacher]] = {}


def register_teacher(cls: type[Teacher]) -> type[Teacher]:
    TEACHERS[cls.kind] = cls
    return cls


def save_teacher(model: Teacher, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write safetensors weights + JSON config; returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(d / "model.safetensors"))
    cfg = {"kind": model.kind, "version": model.version, "vocab_hash": model.vocab_hash,
           "num_items": model.num_items, "temperature": model.temperature,
           "max_history": model.max_history, "model": model.config_dict(), **(extra or {})}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_teacher(directory: str | Path, expected_vocab_hash: str | None = None,
                 device: str | torch.device = "cpu") -> Teacher:
    """Load a checkpoint strictly; a different vocabulary is a TeacherContractError."""
    d = Path(directory)
    cfg_path, weights = d / "config.json", d / "model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise TeacherContractError(f"teacher checkpoint incomplete: {p} not found")
    cfg = json.loads(cfg_path.read_text())
    if expected_vocab_hash is not None and cfg["vocab_hash"] != expected_vocab_hash:
        raise TeacherContractError(
            f"teacher checkpoint {d} was trained on item vocabulary {cfg['vocab_hash'][:12]}..., "
            f"but the data here has {expected_vocab_hash[:12]}...: different domains or item ids")
    import teachers  # noqa: F401  (registers the built-in teachers)
    cls = TEACHERS.get(cfg["kind"])
    if cls is None:
        raise TeacherContractError(f"unknown teacher kind {cfg['kind']!r} in {cfg_path}; known: {sorted(TEACHERS)} "
                                   "(a kind defined outside the built-ins registers when its module is imported: "
                                   "name that module in the serve spec's teacher_modules)")
    model = cls(vocab_hash=cfg["vocab_hash"], num_items=cfg["num_items"],
                temperature=cfg["temperature"], max_history=cfg["max_history"], **cfg["model"])
    model.load_state_dict(load_file(str(weights)), strict=True)
    model.checkpoint_sha256 = file_sha256(weights)
    return model.to(device).eval()
