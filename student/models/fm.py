"""FM student (Rendle, 2010) over four fields of a (user, candidate) pair.

Fields: the history as one pooled field (mean of its items' embeddings), the user's domain, the
candidate's item id and the candidate's domain. Each field has its own embedding table and
first-order weight. Split into a user side U = {history, user domain} and an item side
I = {item, candidate domain}, the FM second-order sum over field pairs is

    sum_{f<g} <e_f, e_g> = <e_hist, e_udom> + <e_item, e_cdom> + <e_hist + e_udom, e_item + e_cdom>

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


class FieldEmbeddings(nn.Module):
    """Embedding tables and first-order weights of the four fields (shared by FM and DeepFM)."""

    def __init__(self, vocab_size: int, num_domains: int, hidden: int,
                 item_domain: np.ndarray | torch.Tensor | None, init_std: float):
        super().__init__()
        self.hist = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.item = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.udom = nn.Embedding(num_domains + 1, hidden)
        self.cdom = nn.Embedding(num_domains + 1, hidden)
        self.hist_w = nn.Embedding(vocab_size, 1, padding_idx=0)
        self.item_w = nn.Embedding(vocab_size, 1, padding_idx=0)
        self.udom_w = nn.Embedding(num_domains + 1, 1)
        self.cdom_w = nn.Embedding(num_domains + 1, 1)
        self.bias = nn.Parameter(torch.zeros(()))
        for emb in (self.hist, self.item, self.udom, self.cdom):
            nn.init.normal_(emb.weight, std=init_std)
        for emb in (self.hist_w, self.item_w, self.udom_w, self.cdom_w):
            nn.init.zeros_(emb.weight)
        with torch.no_grad():
            self.hist.weight[0].zero_()
            self.item.weight[0].zero_()
        # Derived from the dataset, rebuilt by the builder: not part of the checkpoint.
        self.register_buffer("item_domain", item_domain_buffer(vocab_size, num_domains, item_domain),
                             persistent=False)

    def user_side(self, batch: StudentBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(e_hist [B, D], e_udom [B, D], first-order user terms + bias [B])."""
        h = batch.histories
        # Mask PAD explicitly rather than trusting its embedding row to stay zero.
        mask = (h != 0).unsqueeze(-1).to(self.hist.weight.dtype)  # [B, L, 1]
        n = mask.sum(1).clamp(min=1)  # [B, 1]
        e_hist = (self.hist(h) * mask).sum(1) / n
        w_hist = ((self.hist_w(h) * mask).sum(1) / n).squeeze(-1)
        udom = self.item_domain[h[:, 0]]
        return e_hist, self.udom(udom), w_hist + self.udom_w(udom).squeeze(-1) + self.bias

    def item_side(self, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(e_item [..., D], e_cdom [..., D], first-order item terms [...]) for any id shape."""
        cdom = self.item_domain[candidates]
        return (self.item(candidates), self.cdom(cdom),
                (self.item_w(candidates) + self.cdom_w(cdom)).squeeze(-1))


def fm_scores(user: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
              item: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """FM logits [B, C] from user_side() and item_side() outputs (items [C, D] or [B, C, D])."""
    e_hist, e_udom, w_user = user
    e_item, e_cdom, w_item = item
    s_u = e_hist + e_udom
    s_i = e_item + e_cdom
    row = w_user + (e_hist * e_udom).sum(-1)  # [B]
    col = w_item + (e_item * e_cdom).sum(-1)  # [C] or [B, C]
    cross = s_u @ s_i.T if s_i.dim() == 2 else torch.einsum("bd,bcd->bc", s_u, s_i)
    return cross + row[:, None] + (col[None, :] if col.dim() == 1 else col)


@register_student
class FM(StudentModel):
    kind = "fm"

    def __init__(self, vocab_size: int, num_domains: int = 1, hidden: int = 64,
                 item_domain: np.ndarray | torch.Tensor | None = None, dropout: float = 0.0,
                 init_std: float = 0.05):
        super().__init__()
        self.vocab_size = vocab_size
        self.num_domains = num_domains
        self.fields = FieldEmbeddings(vocab_size, num_domains, hidden, item_domain, init_std)
        self.drop = nn.Dropout(dropout)

    def user_side(self, batch: StudentBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        e_hist, e_udom, w = self.fields.user_side(batch)
        return self.drop(e_hist), e_udom, w

    def score(self, batch: StudentBatch, candidates: torch.Tensor) -> torch.Tensor:
        return fm_scores(self.user_side(batch), self.fields.item_side(candidates))
