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

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from protos.contract import ServiceLimits, TeacherContractError, TeacherInfo

log = logging.getLogger(__name__)

# Default bound on the candidate embeddings gathered at once (the service's own default).
DEFAULT_GATHER_BYTES = ServiceLimits.max_gather_bytes

# Inference precisions a served teacher may run in (TeacherSpec.precision). Reduced ones run the
# model's matrix products under torch.autocast; scores always leave as float32.
INFERENCE_PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16,
                                                       "float16": torch.float16}


def native_precision(precision: str, device: torch.device | str) -> bool:
    """Whether ``device`` runs ``precision``'s matrix products in hardware. On a CPU without it
    autocast emulates them: bfloat16 teacher inference measured 7-8x slower than float32 on an AVX2-only
    AMD EPYC, against 2.25x faster on an Intel Xeon with AMX (docs/benchmarks.md §8.1, §8.4)."""
    dev = torch.device(device)
    if precision == "float32":
        return True
    if dev.type == "cuda":
        return precision == "float16" or torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return True  # no check known: assume the device's own kernels
    cpu = torch.cpu
    if precision == "bfloat16":
        return cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported()
    return cpu._is_amx_fp16_supported()


@dataclass(frozen=True)
class GatherPlan:
    """How a [rows, cols] score matrix is filled block by block so that the candidate embeddings
    gathered for one block stay within a byte budget.

    Per-row candidates ([B, C]) gather [block_rows, block_cols, D] per block: whole rows while one row
    fits the budget, else one row cut into column blocks. Shared candidates ([C]) gather
    [block_cols, D] per block, for every row at once. A block always holds at least one embedding,
    so a budget below one embedding gathers exactly one.
    """

    rows: int
    cols: int
    per_row: bool
    embedding_bytes: int  # D * itemsize
    block_rows: int
    block_cols: int

    @classmethod
    def make(cls, rows: int, cols: int, per_row: bool, embedding_bytes: int, budget: int) -> "GatherPlan":
        """The plan for a [rows, cols] matrix under ``budget`` bytes per gathered block."""
        if min(rows, cols, embedding_bytes, budget) < 1:
            raise ValueError(f"gather plan needs positive sizes, got rows={rows} cols={cols} "
                             f"embedding_bytes={embedding_bytes} budget={budget}")
        fit = max(1, budget // embedding_bytes)  # embeddings one block may hold
        if not per_row:
            return cls(rows, cols, False, embedding_bytes, rows, min(cols, fit))
        if cols <= fit:
            return cls(rows, cols, True, embedding_bytes, min(rows, fit // cols), cols)
        return cls(rows, cols, True, embedding_bytes, 1, fit)

    @property
    def block_embeddings(self) -> int:
        """Embeddings gathered for one (full) block."""
        return self.block_rows * self.block_cols if self.per_row else self.block_cols

    @property
    def block_bytes(self) -> int:
        """Bytes of one (full) gathered block: the most the plan ever gathers at once."""
        return self.block_embeddings * self.embedding_bytes

    @property
    def num_blocks(self) -> int:
        return -(-self.rows // self.block_rows) * -(-self.cols // self.block_cols)

    def blocks(self) -> Iterator[tuple[slice, slice]]:
        """(row slice, column slice) of every block, row-major; together they tile the matrix once."""
        for r in range(0, self.rows, self.block_rows):
            for c in range(0, self.cols, self.block_cols):
                yield slice(r, min(self.rows, r + self.block_rows)), slice(c, min(self.cols, c + self.block_cols))


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
        self._eval_tables: dict[str, torch.Tensor] = {}  # other per-item tables (eval_table)
        self._tables_version: tuple | None = None  # _state_version() the tables were built at
        self.inference_precision = "float32"
        self._invalidations = 0  # invalidate_tables() calls, part of inference_version()

    def set_inference_precision(self, precision: str) -> "Teacher":
        """Run inference (``score``, the service's batches) in ``precision``: float32 (exact),
        bfloat16 or float16 (autocast: products in reduced precision, which CPUs with AMX/AVX512-BF16
        and GPUs run faster; tests/test_teacher_precision.py checks the rankings they keep)."""
        if precision not in INFERENCE_PRECISIONS:
            raise ValueError(f"teacher inference precision must be one of {sorted(INFERENCE_PRECISIONS)}, "
                             f"got {precision!r}")
        self.inference_precision = precision
        device = next(iter(self.parameters()), torch.empty(0)).device
        if not native_precision(precision, device):
            log.warning("teacher %s serves in %s on %s without hardware support for it (CPU: no AVX512-BF16/AMX): "
                        "autocast emulates it, which can be several times slower than float32", self.kind,
                        precision, device)
        return self

    def precision_context(self) -> contextlib.AbstractContextManager:
        """The autocast context inference runs in (a no-op in float32)."""
        dtype = INFERENCE_PRECISIONS[self.inference_precision]
        if dtype is None:
            return contextlib.nullcontext()
        device = next(iter(self.parameters()), torch.empty(0)).device.type
        return torch.autocast(device_type=device, dtype=dtype)

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
        """Raw scores float32 [B, C] of each history against the candidates (computed in
        ``inference_precision``)."""
        with self.precision_context():
            seq = self.encode_histories(histories, lengths)
            return self.score_candidates(seq, candidates)

    def gather_plan(self, seq: torch.Tensor, candidates: torch.Tensor,
                    max_gather_bytes: int = DEFAULT_GATHER_BYTES) -> GatherPlan:
        """The blocks ``score_candidates`` fills for these sequence representations and candidates."""
        b, c = int(seq.shape[0]), int(candidates.shape[-1])
        return GatherPlan.make(b, c, candidates.dim() == 2, self.embedding_bytes(seq), max_gather_bytes)

    def embedding_bytes(self, seq: torch.Tensor) -> int:
        """Bytes of one gathered item embedding: a row of the item table (eval mode), and never
        less than a row of ``seq`` (item and sequence representations share D)."""
        per_seq = int(seq.shape[-1]) * seq.element_size()
        cache = self._item_cache
        if cache is not None and cache.dim() == 2:
            return max(1, per_seq, int(cache.shape[1]) * cache.element_size())
        return max(1, per_seq)

    @torch.no_grad()
    def score_candidates(self, seq: torch.Tensor, candidates: torch.Tensor,
                         max_gather_bytes: int = DEFAULT_GATHER_BYTES) -> torch.Tensor:
        """``similarity(seq, candidate_embeddings(candidates))`` as float32 [B, C], gathering at most
        ``max_gather_bytes`` of candidate embeddings at once (see ``GatherPlan``).

        Gathering per-row candidates [B, C] in one go would hold a [B, C, D] tensor (a 16 MB request
        to a 32-d teacher needed over 1 GiB); block by block it holds one block. Each score is the
        same product of the same two vectors, so the result equals the one-block product (the tests
        check it)."""
        if candidates.dim() not in (1, 2) or seq.dim() != 2 or (candidates.dim() == 2
                                                                and candidates.shape[0] != seq.shape[0]):
            raise ValueError(f"score_candidates: seq [B, D] and candidates [C] or [B, C], got "
                             f"{list(seq.shape)} and {list(candidates.shape)}")
        b, c = int(seq.shape[0]), int(candidates.shape[-1])
        if b == 0 or c == 0:
            return torch.zeros(b, c, dtype=torch.float32, device=seq.device)
        if not self.training:
            self._item_table(candidates.device)  # its row size is what one gathered embedding takes
        plan = self.gather_plan(seq, candidates, max_gather_bytes)
        if plan.num_blocks == 1:
            return self.similarity(seq, self.candidate_embeddings(candidates)).float()
        out = torch.empty(b, c, dtype=torch.float32, device=seq.device)
        for rows, cols in plan.blocks():
            block = candidates[rows, cols] if plan.per_row else candidates[cols]
            out[rows, cols] = self.similarity(seq[rows], self.candidate_embeddings(block)).float()
        return out

    def candidate_embeddings(self, candidates: torch.Tensor) -> torch.Tensor:
        """``item_embeddings(candidates)``; in eval mode read from a table of every item, built once.

        A served teacher is frozen, and an item's representation does not depend on the request
        (text teachers pass every item through an adaptor or a PLM), so a distillation request over
        thousands of candidates costs one lookup instead of a forward pass per candidate. The table
        is dropped by ``train()`` and ``load_state_dict``, so a teacher in training never reads a stale one.
        """
        if self.training:
            return self.item_embeddings(candidates)
        return self._item_table(candidates.device)[candidates]

    def _state_version(self) -> tuple[tuple[int, torch.dtype, int], ...]:
        """Per parameter and buffer: its storage address, dtype and in-place version counter. An
        in-place write (an optimizer step, ``has_image[...] = False``) bumps the counter; replacing a
        tensor (``m.text_emb = new``, ``.to(dtype)``) changes the address or dtype, even when the new
        tensor's counter happens to equal the old one's. Not seen: writes through ``.data`` (they
        bypass the counter) and changes to inference-mode tensors (no counter): call
        ``invalidate_tables()`` after those."""
        def key(t: torch.Tensor) -> tuple[int, torch.dtype, int]:
            try:
                version = t._version
            except RuntimeError:  # an inference-mode tensor tracks no version
                version = -1
            return (t.data_ptr(), t.dtype, version)

        return tuple(key(t) for t in (*self.parameters(), *self.buffers()))

    def invalidate_tables(self) -> None:
        """Drop every eval-mode table now (they are rebuilt on next use); for weight changes the
        automatic check cannot see (see ``_state_version``)."""
        self._item_cache, self._eval_tables, self._tables_version = None, {}, None
        self._invalidations += 1

    def inference_version(self) -> tuple:
        """What an eval-mode result of this teacher depends on besides its input: the weight state
        (``_state_version``), the inference precision and the ``invalidate_tables()`` calls. A
        cache of its outputs (the service's history memo) is valid while this stays equal."""
        return (self._state_version(), self.inference_precision, self._invalidations)

    def _drop_stale_tables(self) -> None:
        version = self._state_version()
        if version != self._tables_version:
            self._item_cache, self._eval_tables, self._tables_version = None, {}, version

    def _item_table(self, device: torch.device) -> torch.Tensor:
        """The eval-mode table of every item's embedding on ``device``, built on first use (and
        again after the weights or buffers it was built from change)."""
        self._drop_stale_tables()
        cache = self._item_cache
        if cache is None or cache.device != device:
            cache = self._build_table(self.item_embeddings, device)
            self._item_cache = cache
        return cache

    def eval_table(self, name: str, per_item: Callable[[torch.Tensor], torch.Tensor],
                   device: torch.device) -> torch.Tensor:
        """``per_item`` over every item id, built once on ``device`` and kept until ``train()``,
        ``load_state_dict``, ``invalidate_tables()`` or a change to a weight or buffer (written in place,
        or replaced). For an item-level computation a frozen teacher repeats for every
        history position of every request (e.g. UniSRec's MoE adaptor, UniM2Rec's modality fusion);
        callers use it in eval mode only, where ``per_item`` is deterministic."""
        self._drop_stale_tables()
        table = self._eval_tables.get(name)
        if table is None or table.device != device:
            table = self._eval_tables[name] = self._build_table(per_item, device)
        return table

    def _build_table(self, per_item: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> torch.Tensor:
        ids = torch.arange(self.num_items, device=device)
        # Built once in float32 whatever the inference precision: autocast casts its rows per
        # product, so the table itself never loses precision.
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            return torch.cat([per_item(ids[i: i + 4096]) for i in range(0, self.num_items, 4096)])

    def train(self, mode: bool = True) -> "Teacher":
        self._item_cache = None
        self._eval_tables = {}
        return super().train(mode)

    def load_state_dict(self, *args, **kwargs):
        self._item_cache = None
        self._eval_tables = {}
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
