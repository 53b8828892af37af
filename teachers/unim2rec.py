"""UniM2Rec teacher: multi-modal item fusion + a multi-domain Transformer user encoder.

Items. Each item has up to M modality vectors, stored with the checkpoint as buffers
(``feat_<name>`` [V, d_m] with an availability mask ``has_<name>`` [V]):
  - ``plm_text``: the MiniLM mean-pooled embedding of the item text (every item with text);
  - ``clip_text`` / ``image``: ScientificMM's 512-d CLIP-style text (``feat1CLS``) and image
    (``feat3CLS``) vectors, where the dataset has them (an all-zero row counts as missing).
Each modality is projected to the hidden size (learned whitening shift, linear, LayerNorm); the
present ones are fused by a per-item gated sum (softmax over a learned score of each projection,
missing modalities masked out), a learned "missing" embedding per absent modality is added so the
user encoder knows what the item lacks, and an optional ID embedding is added. An item with no
image is thus scored from its text alone. Training drops each present modality of an item with
probability ``modality_dropout`` (never all of them), so the model stays robust when one is missing.
With ``shared_clip_projection`` the image goes through the CLIP text's projection instead of one of
its own: the two are vectors of one CLIP space, so one map keeps them aligned instead of giving the
image a private subspace in which it can fit noise.

Users. A SASRec-style causal Transformer over the fused history (+ position and + domain
embedding); the state at the last position is the sequence representation. Scores are cosine
similarities (raw; temperature 0.07 in ``describe``); training is softmax cross-entropy of
cosine/temperature over all items of the example's domain.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from protos.contract import TeacherContractError
from teachers.base import Teacher, register_teacher
from teachers.losses import domain_cross_entropy, domain_ranges

# Dataset feature name -> modality name used by this teacher.
DATASET_FEATURES = {"clip_text": "feat1CLS", "image": "feat3CLS"}


class ModalityProjection(nn.Module):
    """Parametric whitening of one modality: (x - b) W, then LayerNorm and dropout."""

    def __init__(self, in_dim: int, hidden: int, dropout: float):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(in_dim))
        self.linear = nn.Linear(in_dim, hidden, bias=False)
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.norm(self.linear(x - self.shift)))


@register_teacher
class UniM2RecTeacher(Teacher):
    kind = "unim2rec"
    version = "1"

    def __init__(self, vocab_hash: str, num_items: int, temperature: float = 0.07, max_history: int = 50,
                 modalities: dict[str, int] | None = None, num_domains: int = 1, hidden: int = 300,
                 num_layers: int = 2, num_heads: int = 2, dropout: float = 0.2,
                 modality_dropout: float = 0.2, use_id: bool = True, id_dropout: float = 0.0,
                 shared_clip_projection: bool = False):
        super().__init__(vocab_hash, num_items, temperature, max_history)
        if not modalities:
            raise TeacherContractError("UniM2RecTeacher needs at least one modality: build it with from_dataset")
        self.modalities = {str(k): int(v) for k, v in modalities.items()}
        self.shared_clip_projection = bool(shared_clip_projection)
        if self.shared_clip_projection and (
                not {"clip_text", "image"} <= set(self.modalities)
                or self.modalities["clip_text"] != self.modalities["image"]):
            raise TeacherContractError("shared_clip_projection needs the clip_text and image modalities, of one "
                                       f"dimension; this teacher has {self.modalities}")
        self.num_domains, self.hidden = int(num_domains), int(hidden)
        self.num_layers, self.num_heads, self.dropout_p = int(num_layers), int(num_heads), float(dropout)
        self.modality_dropout, self.use_id, self.id_dropout = float(modality_dropout), bool(use_id), float(id_dropout)
        for name, dim in self.modalities.items():
            self.register_buffer(f"feat_{name}", torch.zeros(num_items, dim))
            self.register_buffer(f"has_{name}", torch.zeros(num_items, dtype=torch.bool))
        self.register_buffer("item_domain", torch.full((num_items,), -1, dtype=torch.long))
        self.proj = nn.ModuleDict({n: ModalityProjection(d, self.hidden, self.dropout_p)
                                   for n, d in self.modalities.items() if self.projection_of(n) == n})
        self.gate = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 1))
        self.missing = nn.Parameter(torch.zeros(len(self.modalities), self.hidden))
        nn.init.normal_(self.missing, std=0.02)
        self.item_id = nn.Embedding(num_items, self.hidden, padding_idx=0) if self.use_id else None
        if self.item_id is not None:
            nn.init.normal_(self.item_id.weight, std=0.02)
            with torch.no_grad():
                self.item_id.weight[0].zero_()
        self.item_norm = nn.LayerNorm(self.hidden)
        self.position = nn.Embedding(max_history, self.hidden)
        self.domain = nn.Embedding(max(self.num_domains, 1), self.hidden)
        self.input_norm = nn.LayerNorm(self.hidden)
        self.input_dropout = nn.Dropout(self.dropout_p)
        layer = nn.TransformerEncoderLayer(self.hidden, self.num_heads, dim_feedforward=self.hidden * 2,
                                           dropout=self.dropout_p, activation="gelu", batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, self.num_layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(self.hidden)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_dataset(cls, dataset, modalities: list[str] | tuple[str, ...] = ("plm_text",),
                     plm: str = "all-MiniLM-L6-v2", temperature: float = 0.07, **kwargs) -> "UniM2RecTeacher":
        """A teacher over ``dataset`` using the named modalities (plm_text, clip_text, image)."""
        feats: dict[str, np.ndarray] = {}
        masks: dict[str, np.ndarray] = {}
        for name in modalities:
            if name == "plm_text":
                from teachers.text_encoder import item_text_embeddings

                # Per domain, as UniSRec reads them: both teachers share the cached encodings.
                emb = item_text_embeddings(dataset, plm=plm)
                if emb is None:
                    raise TeacherContractError(
                        f"modality plm_text needs item text; none of {dataset.domain_names} has any")
                feats[name] = emb
                masks[name] = np.asarray(dataset.has_text, dtype=bool)
            elif name in DATASET_FEATURES:
                key = DATASET_FEATURES[name]
                if key not in dataset.features:
                    raise TeacherContractError(
                        f"modality {name!r} needs feature {key!r}, which domains {dataset.domain_names} lack")
                feats[name] = np.asarray(dataset.features[key], dtype=np.float32)
                masks[name] = np.asarray(dataset.feature_mask[key], dtype=bool) & (np.abs(feats[name]).sum(1) > 0)
            else:
                raise TeacherContractError(f"unknown modality {name!r}; known: plm_text, {', '.join(DATASET_FEATURES)}")
        model = cls(vocab_hash=dataset.vocab_hash(), num_items=dataset.vocab_size, temperature=temperature,
                    max_history=dataset.max_len, modalities={n: f.shape[1] for n, f in feats.items()},
                    num_domains=dataset.num_domains, **kwargs)
        with torch.no_grad():
            for name in feats:
                mask = torch.as_tensor(masks[name])
                mask[0] = False
                getattr(model, f"feat_{name}").copy_(torch.as_tensor(feats[name]))
                getattr(model, f"has_{name}").copy_(mask)
                # Start the whitening shift at the mean over present items of every modality it projects.
                shared = [n for n in feats if model.projection_of(n) == model.projection_of(name)]
                rows = np.concatenate([feats[n][masks[n]] for n in shared])
                model.proj[model.projection_of(name)].shift.copy_(torch.as_tensor(rows.mean(0)))
            model.item_domain.copy_(torch.as_tensor(dataset.item_domain))
        return model

    def config_dict(self) -> dict[str, Any]:
        return {"modalities": self.modalities, "num_domains": self.num_domains, "hidden": self.hidden,
                "num_layers": self.num_layers, "num_heads": self.num_heads, "dropout": self.dropout_p,
                "modality_dropout": self.modality_dropout, "use_id": self.use_id, "id_dropout": self.id_dropout,
                "shared_clip_projection": self.shared_clip_projection}

    def projection_of(self, modality: str) -> str:
        """The name of the projection ``modality`` goes through (its own, or clip_text's when shared)."""
        return "clip_text" if self.shared_clip_projection and modality == "image" else modality

    # -- items ----------------------------------------------------------------------------------------
    def presence(self, item_ids: torch.Tensor) -> torch.Tensor:
        """[..., M] bool: which modalities each item has."""
        return torch.stack([getattr(self, f"has_{n}")[item_ids] for n in self.modalities], dim=-1)

    def _drop_modalities(self, present: torch.Tensor) -> torch.Tensor:
        """Modality dropout: drop each present modality with prob p, keeping at least one."""
        if not self.training or self.modality_dropout <= 0 or present.shape[-1] < 2:
            return present
        keep = present & (torch.rand(present.shape, device=present.device) >= self.modality_dropout)
        # Where everything got dropped, restore one present modality chosen at random.
        none = ~keep.any(-1, keepdim=True)
        pick = torch.where(present, torch.rand(present.shape, device=present.device), torch.full_like(
            present, -1.0, dtype=torch.float))
        restore = F.one_hot(pick.argmax(-1), present.shape[-1]).bool() & present
        return torch.where(none, restore, keep)

    def fuse(self, item_ids: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """Fused item representations [..., H] for global ids [...] (``present`` [..., M] overrides
        which modalities are used; by default the item's own availability)."""
        if present is None:
            present = self._drop_modalities(self.presence(item_ids))
        z = torch.stack([self.proj[self.projection_of(n)](getattr(self, f"feat_{n}")[item_ids])
                         for n in self.modalities], dim=-2)
        logits = self.gate(z).squeeze(-1).masked_fill(~present, float("-inf"))
        # An item with no modality at all (PAD) gets zero weights instead of NaN.
        weights = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
        fused = (weights.unsqueeze(-1) * z).sum(-2)
        fused = fused + ((~present).to(z.dtype).unsqueeze(-1) * self.missing).sum(-2)
        if self.item_id is not None:
            idv = self.item_id(item_ids)
            if self.training and self.id_dropout > 0:
                idv = idv * (torch.rand(idv.shape[:-1] + (1,), device=idv.device) >= self.id_dropout)
            fused = fused + idv
        return self.item_norm(fused)

    def item_embeddings(self, item_ids: torch.Tensor) -> torch.Tensor:
        return self.fuse(item_ids)

    # -- users --------------------------------------------------------------------------------------
    def _encode_fused(self, items: torch.Tensor, histories: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, L = histories.shape
        dev = histories.device
        domains = self.item_domain[histories[torch.arange(B, device=dev), (lengths - 1).clamp(min=0)]].clamp(min=0)
        x = items + self.position(torch.arange(L, device=dev)).unsqueeze(0) + self.domain(domains).unsqueeze(1)
        x = self.input_dropout(self.input_norm(x))
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=dev), diagonal=1)
        pad = torch.arange(L, device=dev).view(1, -1) >= lengths.view(-1, 1)
        h = self.transformer(x, mask=causal, src_key_padding_mask=pad)
        last = h[torch.arange(B, device=dev), (lengths - 1).clamp(min=0)]
        return self.out_norm(last)

    def encode_histories(self, histories: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if histories.shape[1] > self.max_history:
            raise TeacherContractError(f"history length {histories.shape[1]} > max_history {self.max_history}")
        if self.training:
            return self._encode_fused(self.fuse(histories), histories, lengths)
        # Frozen: each item's fused representation once (the table candidates are read from too),
        # then a lookup per history position instead of projecting every position's features.
        return self._encode_fused(self._item_table(histories.device)[histories], histories, lengths)

    def similarity(self, seq: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return super().similarity(F.normalize(seq, dim=-1), F.normalize(items, dim=-1))

    def training_loss(self, histories: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
                      domains: torch.Tensor) -> torch.Tensor:
        """Softmax CE of cosine/temperature over all items of each example's domain. The whole item
        table is fused once per step (with one modality-dropout draw) and the history is read from it."""
        all_ids = torch.arange(self.num_items, device=histories.device)
        table = self.fuse(all_ids)
        seq = self._encode_fused(table[histories], histories, lengths)
        if getattr(self, "_ranges", None) is None:
            self._ranges = domain_ranges(self.item_domain.cpu())
        return domain_cross_entropy(F.normalize(seq, dim=-1), F.normalize(table, dim=-1), targets, domains,
                                    self._ranges, self.temperature)
