"""FM student (Rendle, 2010) over the fields of a (user, candidate) pair.

User-side fields: the history as one pooled field (mean of its items' embeddings), the most recent
history item (on by default; FM with a last-item field is FPMC, Rendle et al. 2010, the classic way
to give a factorization model the order that a mean pool throws away), and the user's domain.
Item-side fields: the candidate's item id and the candidate's domain. Each field has its own
embedding table and first-order weight. With s_U and s_I the sums of the user-side and item-side
embeddings, the FM second-order sum over all field pairs splits as

    sum_{f<g} <e_f, e_g> = pairs(U) + pairs(I) + <s_U, s_I>,   pairs(S) = (|s_S|^2 - sum_S |e_f|^2) / 2

so scoring C candidates is one [B, D] x [D, C] matmul plus per-row and per-candidate terms.

The user's domain is read from the domain of the first history item (not from ``batch.domains``),
so a batch built with placeholder domains (as full-ranking evaluation does) still scores right.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from student.models.base import StudentBatch, StudentModel, register_student


def item_domain_buffer(vocab_size: int, num_domains: int,
                       item_domain: np.ndarray | torch.Tensor | None) -> torch.Tensor:
    """int64 [vocab] domain of each item, with PAD (-1) mapped to the extra row ``num_domains``."""
    if item_domain is None:
        dom = torch.zeros(vocab_size, dtype=torch.long)
        dom[0] = -1
    else:
        dom = torch.as_tensor(np.asarray(item_domain), dtype=torch.long).clone()
    if dom.shape != (vocab_size,):
        raise ValueError(f"item_domain has shape {tuple(dom.shape)}, expected ({vocab_size},)")
    if int(dom.max()) >= num_domains:
        raise ValueError(f"item_domain names domain {int(dom.max())} but num_domains={num_domains}")
    return torch.where(dom < 0, torch.full_like(dom, num_domains), dom)


# Embeddings of one side's fields ([..., D] each) and that side's first-order terms [...].
Side = tuple[list[torch.Tensor], torch.Tensor]


class FieldEmbeddings(nn.Module):
    """Embedding tables and first-order weights of the fields (shared by FM and DeepFM)."""

    def __init__(self, vocab_size: int, num_domains: int, hidden: int,
                 item_domain: np.ndarray | torch.Tensor | None, init_std: float, last_item: bool = True):
        super().__init__()
        self.last_item = bool(last_item)
        self.hist = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.item = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.udom = nn.Embedding(num_domains + 1, hidden)
        self.cdom = nn.Embedding(num_domains + 1, hidden)
        self.hist_w = nn.Embedding(vocab_size, 1, padding_idx=0)
        self.item_w = nn.Embedding(vocab_size, 1, padding_idx=0)
        self.udom_w = nn.Embedding(num_domains + 1, 1)
        self.cdom_w = nn.Embedding(num_domains + 1, 1)
        tables, weights = [self.hist, self.item, self.udom, self.cdom], [self.hist_w, self.item_w,
                                                                          self.udom_w, self.cdom_w]
        if self.last_item:
            self.last = nn.Embedding(vocab_size, hidden, padding_idx=0)
            self.last_w = nn.Embedding(vocab_size, 1, padding_idx=0)
            tables.append(self.last)
            weights.append(self.last_w)
        self.bias = nn.Parameter(torch.zeros(()))
        for emb in tables:
            nn.init.normal_(emb.weight, std=init_std)
        for emb in weights:
            nn.init.zeros_(emb.weight)
        with torch.no_grad():
            for emb in tables:
                if emb.padding_idx is not None:
                    emb.weight[0].zero_()
        # Derived from the dataset, rebuilt by the builder: not part of the checkpoint.
        self.register_buffer("item_domain", item_domain_buffer(vocab_size, num_domains, item_domain),
                             persistent=False)

    @property
    def num_user_fields(self) -> int:
        return 3 if self.last_item else 2

    def user_side(self, batch: StudentBatch, drop: nn.Module | None = None) -> Side:
        """([e_hist, (e_last,) e_udom] each [B, D], first-order user terms + bias [B]); ``drop``
        (dropout) applies to the item-derived fields, the history pool and the last item."""
        h = batch.histories
        # Mask PAD explicitly rather than trusting its embedding row to stay zero.
        mask = (h != 0).unsqueeze(-1).to(self.hist.weight.dtype)  # [B, L, 1]
        n = mask.sum(1).clamp(min=1)  # [B, 1]
        e_hist = (self.hist(h) * mask).sum(1) / n
        first = ((self.hist_w(h) * mask).sum(1) / n).squeeze(-1) + self.bias
        udom = self.item_domain[h[:, 0]]
        fields = [e_hist]
        if self.last_item:
            last = h.gather(1, (batch.lengths - 1).clamp(min=0)[:, None]).squeeze(1)
            fields.append(self.last(last))
            first = first + self.last_w(last).squeeze(-1)
        if drop is not None:
            fields = [drop(e) for e in fields]
        fields.append(self.udom(udom))
        return fields, first + self.udom_w(udom).squeeze(-1)

    def item_side(self, candidates: torch.Tensor) -> Side:
        """([e_item, e_cdom] each [..., D], first-order item terms [...]) for any id shape."""
        cdom = self.item_domain[candidates]
        return ([self.item(candidates), self.cdom(cdom)],
                (self.item_w(candidates) + self.cdom_w(cdom)).squeeze(-1))


def _within(fields: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the fields, sum over their pairs of <e_f, e_g>)."""
    total = sum(fields[1:], fields[0])  # no [F, ..., D] stack: item sides can be [B, C, D]
    squares = sum((e * e).sum(-1) for e in fields)
    return total, 0.5 * ((total * total).sum(-1) - squares)


def fm_scores(user: Side, item: Side) -> torch.Tensor:
    """FM logits [B, C] from user_side() and item_side() outputs (items [C, D] or [B, C, D])."""
    s_u, pairs_u = _within(user[0])
    s_i, pairs_i = _within(item[0])
    row = user[1] + pairs_u  # [B]
    col = item[1] + pairs_i  # [C] or [B, C]
    cross = s_u @ s_i.T if s_i.dim() == 2 else torch.einsum("bd,bcd->bc", s_u, s_i)
    return cross + row[:, None] + (col[None, :] if col.dim() == 1 else col)


@register_student
class FM(StudentModel):
    kind = "fm"

    def __init__(self, vocab_size: int, num_domains: int = 1, hidden: int = 64,
                 item_domain: np.ndarray | torch.Tensor | None = None, dropout: float = 0.0,
                 init_std: float = 0.05, last_item: bool = True):
        super().__init__()
        self.vocab_size = vocab_size
        self.num_domains = num_domains
        self.fields = FieldEmbeddings(vocab_size, num_domains, hidden, item_domain, init_std, last_item)
        self.drop = nn.Dropout(dropout)

    @classmethod
    def from_dataset(cls, dataset, **kwargs) -> "FM":
        return cls(dataset.vocab_size, dataset.num_domains, item_domain=dataset.item_domain, **kwargs)

    def score(self, batch: StudentBatch, candidates: torch.Tensor) -> torch.Tensor:
        return fm_scores(self.fields.user_side(batch, self.drop), self.fields.item_side(candidates))
