"""UniSRec teacher (Hou et al., KDD 2022), re-implemented from the paper.

Item: frozen PLM text embedding -> parametric-whitening mixture-of-experts adaptor (``n_experts``
experts ``(x - b_k) W_k``, softmax gate with learned noise during training) [+ an ID embedding in
"text+id" mode]. Sequence: adapted item embeddings + learned positions -> LayerNorm -> dropout ->
causal post-LN Transformer (SASRec style) -> the state at the last history position. Score: cosine
of sequence and item; ``temperature`` (0.07) is the teacher's own and only the training loss and
``describe()`` use it — ``score`` returns raw cosines.

Objectives (``objective``):
- "pretrain": sequence-item contrastive over in-batch targets plus ``lambda_ss`` x sequence-sequence
  contrastive between each sequence and an augmented copy (item drop: each history item removed
  with ``item_drop``; word drop: each PLM-embedding coordinate zeroed with ``word_drop`` — the text
  embeddings are precomputed, so dropping coordinates stands in for dropping words). Domains mix in
  one batch, so negatives cross domains, as in the paper.
- "finetune": softmax cross-entropy of cosine / temperature over all items of the instance's domain.

Modes (``item_mode``): "text+id" (transductive: text adaptor + ID embedding) or "text" (inductive:
text only). ``freeze_encoder`` freezes positions, input LayerNorm and Transformer (the paper's
fine-tuning fixes the encoder); "text" mode with a frozen encoder trains only the MoE adaptor.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from teachers.base import Teacher, register_teacher
from teachers.losses import domain_cross_entropy, domain_ranges

ITEM_MODES = ("text+id", "text")
OBJECTIVES = ("finetune", "pretrain")


class WhiteningExpert(nn.Module):
    """One parametric-whitening expert: (x - b) W, a bias-free projection of the centred input."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(in_dim))
        self.proj = nn.Linear(in_dim, out_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x - self.bias)


class MoEAdaptor(nn.Module):
    """Mixture of whitening experts with a (noisy, while training) softmax gate."""

    def __init__(self, in_dim: int, out_dim: int, n_experts: int = 8, dropout: float = 0.2,
                 noisy_gating: bool = True):
        super().__init__()
        # One dropout mask shared by the experts (the paper draws one per expert): on CPU the
        # Bernoulli draws over the whole catalogue were a third of a training step.
        self.dropout = nn.Dropout(dropout)
        self.experts = nn.ModuleList(WhiteningExpert(in_dim, out_dim) for _ in range(n_experts))
        self.w_gate = nn.Parameter(torch.zeros(in_dim, n_experts))
        self.w_noise = nn.Parameter(torch.zeros(in_dim, n_experts))
        self.noisy_gating = noisy_gating

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        logits = x @ self.w_gate
        if self.noisy_gating and self.training:
            std = F.softplus(x @ self.w_noise) + 1e-2
            logits = logits + torch.randn_like(logits) * std
        return torch.softmax(logits, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gates(x)  # [..., K]
        x = self.dropout(x)
        outs = torch.stack([e(x) for e in self.experts], dim=-2)  # [..., K, D]
        return (g.unsqueeze(-1) * outs).sum(dim=-2)


@register_teacher
class UniSRecTeacher(Teacher):
    kind = "unisrec"
    version = "1"

    def __init__(self, vocab_hash: str, num_items: int, temperature: float = 0.07, max_history: int = 50,
                 plm_dim: int = 384, plm: str = "all-MiniLM-L6-v2", num_domains: int = 1,
                 hidden: int = 300, layers: int = 2, heads: int = 2, inner: int = 256,
                 dropout: float = 0.5, attn_dropout: float = 0.5, n_experts: int = 8,
                 adaptor_dropout: float = 0.2, noisy_gating: bool = True, item_mode: str = "text+id",
                 objective: str = "finetune", lambda_ss: float = 1e-3, item_drop: float = 0.2,
                 word_drop: float = 0.2, freeze_encoder: bool = False, seed: int = 2022):
        super().__init__(vocab_hash, num_items, temperature, max_history)
        if item_mode not in ITEM_MODES:
            raise ValueError(f"unisrec item_mode {item_mode!r} is not one of {ITEM_MODES}")
        if objective not in OBJECTIVES:
            raise ValueError(f"unisrec objective {objective!r} is not one of {OBJECTIVES}")
        if hidden % heads:
            raise ValueError(f"unisrec hidden {hidden} is not divisible by heads {heads}")
        self._cfg = dict(plm_dim=plm_dim, plm=plm, num_domains=num_domains, hidden=hidden, layers=layers,
                         heads=heads, inner=inner, dropout=dropout, attn_dropout=attn_dropout,
                         n_experts=n_experts, adaptor_dropout=adaptor_dropout, noisy_gating=noisy_gating,
                         item_mode=item_mode, objective=objective, lambda_ss=lambda_ss, item_drop=item_drop,
                         word_drop=word_drop, freeze_encoder=freeze_encoder, seed=seed)
        torch.manual_seed(seed)  # reproducible initialisation
        self.item_mode, self.objective = item_mode, objective
        self.lambda_ss, self.item_drop, self.word_drop = lambda_ss, item_drop, word_drop
        # Frozen PLM embeddings and item domains: buffers, so the checkpoint carries them.
        self.register_buffer("text_emb", torch.zeros(num_items, plm_dim))
        self.register_buffer("item_domain", torch.full((num_items,), -1, dtype=torch.long))
        self.adaptor = MoEAdaptor(plm_dim, hidden, n_experts, adaptor_dropout, noisy_gating)
        self.id_emb = nn.Embedding(num_items, hidden, padding_idx=0) if item_mode == "text+id" else None
        if self.id_emb is not None:
            nn.init.normal_(self.id_emb.weight, std=0.02)
            with torch.no_grad():
                self.id_emb.weight[0].zero_()
        self.pos_emb = nn.Embedding(max_history, hidden)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.input_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.input_drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(hidden, heads, inner, dropout, activation="gelu", batch_first=True,
                                           norm_first=False, layer_norm_eps=1e-12)
        layer.self_attn.dropout = attn_dropout
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        if freeze_encoder:
            for mod in (self.pos_emb, self.input_norm, self.encoder):
                for p in mod.parameters():
                    p.requires_grad_(False)

    # -- construction from data ----------------------------------------------------------------
    @classmethod
    def from_dataset(cls, dataset, plm: str = "all-MiniLM-L6-v2", text_max_length: int = 128,
                     cache_dir: str | None = None, **kwargs) -> "UniSRecTeacher":
        """Build for ``dataset``: PLM embeddings of each item's text (cached per domain, zeros for
        items without text and for PAD), item domains, vocab hash and size."""
        from teachers.text_encoder import item_text_embeddings

        emb = item_text_embeddings(dataset, plm=plm, cache_dir=cache_dir, max_length=text_max_length)
        if emb is None:
            raise ValueError(f"unisrec needs item text; none of {dataset.domain_names} has any")
        model = cls(vocab_hash=dataset.vocab_hash(), num_items=dataset.vocab_size,
                    max_history=dataset.max_len, plm_dim=int(emb.shape[1]), plm=plm,
                    num_domains=dataset.num_domains, **kwargs)
        with torch.no_grad():
            model.text_emb.copy_(torch.from_numpy(emb))
            model.item_domain.copy_(torch.as_tensor(dataset.item_domain))
        return model

    def config_dict(self) -> dict[str, Any]:
        return dict(self._cfg)

    # -- representations -----------------------------------------------------------------------
    def _item_repr(self, ids: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """Adapted item vectors (not normalised); ``text`` overrides the PLM rows (word drop)."""
        x = self.adaptor(self.text_emb[ids] if text is None else text)
        if self.id_emb is not None:
            x = x + self.id_emb(ids)
        return x

    def _encode(self, hist: torch.Tensor, lengths: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
        """Transformer over [B, L, D] input item vectors -> [B, D] state at the last position."""
        L = hist.shape[1]
        pos = self.pos_emb(torch.arange(L, device=hist.device))
        x = self.input_drop(self.input_norm(item_vecs + pos))
        # Right padding + causal attention: a real position never attends to a pad, so no key mask
        # is needed (and no row is ever fully masked).
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=hist.device), diagonal=1)
        h = self.encoder(x, mask=causal, is_causal=True)
        return h[torch.arange(hist.shape[0], device=hist.device), (lengths - 1).clamp(min=0)]

    def _sequence(self, hist: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if not self.training:  # frozen: every item's adaptor output once, then a lookup per position
            return self._encode(hist, lengths, self.eval_table("item_repr", self._item_repr, hist.device)[hist])
        ids, inv = torch.unique(hist, return_inverse=True)
        return self._encode(hist, lengths, self._item_repr(ids)[inv])

    def encode_histories(self, histories: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, L] -> L2-normalised [B, D]. Rows are processed in length-sorted chunks, each trimmed
        to its longest row, so short histories do not pay for the longest one."""
        histories = histories[:, -self.max_history:] if histories.shape[1] > self.max_history else histories
        lengths = lengths.clamp(max=histories.shape[1], min=1)
        if self.training or histories.shape[0] <= 128:
            out = self._sequence(histories[:, : int(lengths.max())], lengths)
        else:
            order = torch.argsort(lengths)
            out = torch.empty(histories.shape[0], self.pos_emb.embedding_dim, device=histories.device)
            for b in range(0, len(order), 128):
                sel = order[b: b + 128]
                Lb = int(lengths[sel].max())
                out[sel] = self._sequence(histories[sel, :Lb], lengths[sel]).to(out.dtype)
        return F.normalize(out, dim=-1)

    def item_embeddings(self, item_ids: torch.Tensor) -> torch.Tensor:
        flat = item_ids.reshape(-1)
        ids, inv = torch.unique(flat, return_inverse=True)
        vecs = F.normalize(self._item_repr(ids), dim=-1)[inv]
        return vecs.reshape(*item_ids.shape, -1)

    # -- training --------------------------------------------------------------------------------
    def training_loss(self, histories: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
                      domains: torch.Tensor) -> torch.Tensor:
        if self.objective == "finetune":
            return self._finetune_loss(histories, lengths, targets, domains)
        return self._pretrain_loss(histories, lengths, targets)

    def _finetune_loss(self, hist, lengths, targets, domains) -> torch.Tensor:
        # One adaptor pass over the whole catalogue serves both the inputs and the logits.
        table = self._item_repr(torch.arange(self.num_items, device=hist.device))
        seq = F.normalize(self._encode(hist, lengths, table[hist]), dim=-1)
        return domain_cross_entropy(seq, F.normalize(table, dim=-1), targets, domains, self._domain_ranges(),
                                    self.temperature)

    def _domain_ranges(self) -> dict[int, tuple[int, int]]:
        if getattr(self, "_ranges", None) is None:
            self._ranges = domain_ranges(self.item_domain.cpu())
        return self._ranges

    def _augment(self, hist: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Item drop: remove each real item with prob ``item_drop`` (at least one kept), re-packed
        to the left so padding stays on the right."""
        B, L = hist.shape
        real = torch.arange(L, device=hist.device).unsqueeze(0) < lengths.unsqueeze(1)
        keep = real & (torch.rand(B, L, device=hist.device) >= self.item_drop)
        last = torch.nn.functional.one_hot(lengths - 1, L).bool()
        keep = keep | (last & ~keep.any(dim=1, keepdim=True))  # never empty: keep the last item
        new_len = keep.sum(dim=1)
        # stable sort on ~keep moves kept positions first, in their original order
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        packed = torch.gather(hist, 1, order)
        packed = packed.masked_fill(torch.arange(L, device=hist.device).unsqueeze(0) >= new_len.unsqueeze(1), 0)
        return packed, new_len

    def _pretrain_loss(self, hist, lengths, targets) -> torch.Tensor:
        B = hist.shape[0]
        ids, inv = torch.unique(torch.cat([hist.reshape(-1), targets]), return_inverse=True)
        vecs = self._item_repr(ids)[inv]
        seq_in, tgt_vec = vecs[: hist.numel()].view(*hist.shape, -1), vecs[hist.numel():]
        seq = F.normalize(self._encode(hist, lengths, seq_in), dim=-1)
        tgt = F.normalize(tgt_vec, dim=-1)
        # Sequence-item: in-batch targets; another row with the same target is not a negative.
        logits = seq @ tgt.T / self.temperature
        same = (targets.unsqueeze(0) == targets.unsqueeze(1)) & ~torch.eye(B, dtype=torch.bool, device=hist.device)
        labels = torch.arange(B, device=hist.device)
        loss_si = F.cross_entropy(logits.masked_fill(same, float("-inf")), labels)
        if self.lambda_ss <= 0:
            return loss_si
        # Sequence-sequence: item drop + word drop view of each history.
        aug, aug_len = self._augment(hist, lengths)
        aug_ids, aug_inv = torch.unique(aug, return_inverse=True)
        text = F.dropout(self.text_emb[aug_ids], p=self.word_drop, training=True) * (1 - self.word_drop)
        aug_vecs = self._item_repr(aug_ids, text=text)[aug_inv]
        aug_seq = F.normalize(self._encode(aug, aug_len, aug_vecs), dim=-1)
        loss_ss = F.cross_entropy(seq @ aug_seq.T / self.temperature, labels)
        return loss_si + self.lambda_ss * loss_ss
