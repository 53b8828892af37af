"""LightGCN student (He et al., 2020) on the user-item graph of the training split.

Nodes are the global users [0, num_users) followed by the global item ids [0, vocab) (PAD stays
an isolated node). An edge joins a user and every item in that user's training rows (histories
and targets of ``splits["train"]``; valid/test targets never enter the graph). Global ids of
different domains are disjoint, so the per-domain graphs merge into one block-diagonal
adjacency, normalised symmetrically: A_hat = D^-1/2 A D^-1/2 (isolated nodes get 0).
The final embedding of a node is the mean of its layer embeddings E_0..E_K with
E_k = A_hat E_{k-1}; a (user, item) score is their dot product. Scoring needs ``batch.users``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from student.models.base import StudentBatch, StudentModel, register_student


def normalized_adjacency(num_users: int, vocab_size: int, users: np.ndarray, items: np.ndarray
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Coalesced COO parts (indices int64 [2, nnz] sorted row-major, values float32 [nnz]) of
    D^-1/2 A D^-1/2 over users + items, from (user, item) edge lists (duplicates count once)."""
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    if users.shape != items.shape:
        raise ValueError(f"users {users.shape} and items {items.shape} differ in shape")
    if users.size and (users.min() < 0 or users.max() >= num_users):
        raise ValueError(f"a user id is outside 0..{num_users - 1}")
    if items.size and (items.min() < 1 or items.max() >= vocab_size):
        raise ValueError(f"an item id is outside 1..{vocab_size - 1} (0 is PAD)")
    key = np.unique(users * vocab_size + items)
    u, i = key // vocab_size, key % vocab_size + num_users
    n = num_users + vocab_size
    rows = np.concatenate([u, i])
    cols = np.concatenate([i, u])
    deg = np.bincount(rows, minlength=n).astype(np.float64)
    inv = np.zeros(n)
    inv[deg > 0] = deg[deg > 0] ** -0.5
    vals = inv[rows] * inv[cols]
    order = np.lexsort((cols, rows))
    indices = np.stack([rows[order], cols[order]]).astype(np.int64)
    return torch.from_numpy(indices), torch.from_numpy(vals[order].astype(np.float32))


def training_edges(users: np.ndarray, histories: np.ndarray, targets: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(user, item) pairs from training rows: every non-PAD history item and every target."""
    hu = np.repeat(users, histories.shape[1]).reshape(histories.shape)
    mask = histories != 0
    return (np.concatenate([hu[mask], users]), np.concatenate([histories[mask], targets]))


@register_student
class LightGCN(StudentModel):
    kind = "lightgcn"

    def __init__(self, vocab_size: int, num_domains: int = 1, hidden: int = 64, *, num_users: int,
                 edge_users: np.ndarray, edge_items: np.ndarray, layers: int = 2, init_std: float = 0.1):
        super().__init__()
        if layers < 0:
            raise ValueError(f"layers must be >= 0, got {layers}")
        self.vocab_size = vocab_size
        self.num_domains = num_domains
        self.num_users = num_users
        self.layers = layers
        self.user_emb = nn.Embedding(num_users, hidden)
        self.item_emb = nn.Embedding(vocab_size, hidden)
        nn.init.normal_(self.user_emb.weight, std=init_std)
        nn.init.normal_(self.item_emb.weight, std=init_std)
        # Plain attributes, not buffers: the graph is data (rebuilt from the dataset), and DDP
        # would otherwise broadcast it every step. Moved to the embeddings' device on use.
        self._adj_parts = normalized_adjacency(num_users, vocab_size, edge_users, edge_items)
        self._adj: torch.Tensor | None = None
        self._cache: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def from_dataset(cls, dataset, **kwargs) -> "LightGCN":
        """The graph is built from the training split's interactions only."""
        tr = dataset.splits["train"]
        users, items = training_edges(tr.users, tr.histories, tr.targets)
        return cls(dataset.vocab_size, dataset.num_domains, num_users=dataset.num_users,
                   edge_users=users, edge_items=items, **kwargs)

    @property
    def num_edges(self) -> int:
        return int(self._adj_parts[1].numel()) // 2  # each edge is stored in both directions

    def adjacency(self) -> torch.Tensor:
        device = self.user_emb.weight.device
        if self._adj is None or self._adj.device != device:
            idx, val = (t.to(device) for t in self._adj_parts)
            n = self.num_users + self.vocab_size
            self._adj = torch.sparse_coo_tensor(idx, val, (n, n), is_coalesced=True, check_invariants=False)
        return self._adj

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Final (user [num_users, D], item [vocab, D]) embeddings. Without autograd the result
        is cached until a parameter changes (in-place updates bump the tensors' versions)."""
        key = (self.user_emb.weight._version, self.item_emb.weight._version,
               self.user_emb.weight.data_ptr(), self.item_emb.weight.data_ptr())
        if not torch.is_grad_enabled() and self._cache is not None and self._cache[0] == key:
            out = self._cache[1]
        else:
            e = torch.cat([self.user_emb.weight, self.item_emb.weight])
            acc = e
            if self.layers:
                adj = self.adjacency()
                for _ in range(self.layers):
                    e = torch.sparse.mm(adj, e)
                    acc = acc + e
            out = acc / (self.layers + 1)
            self._cache = None if torch.is_grad_enabled() else (key, out)
        return out[: self.num_users], out[self.num_users:]

    def score(self, batch: StudentBatch, candidates: torch.Tensor) -> torch.Tensor:
        users, items = self.propagate()
        u = users[batch.users]
        c = items[candidates]
        return u @ c.T if c.dim() == 2 else torch.einsum("bd,bcd->bc", u, c)

    def full_scores(self, batch: StudentBatch, start: int, stop: int) -> torch.Tensor:
        users, items = self.propagate()
        return users[batch.users] @ items[start:stop].T
