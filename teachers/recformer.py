"""Recformer teacher (Li et al., KDD 2023), re-implemented at a CPU-sized budget.

An item is key-value text: ``title <title> brand <brand> category <category>``, parsed from the
dataset's "title. categories. brand. " strings (see ``parse_item_text``). A history becomes one
token sequence, most recent item first: ``[CLS] item_1 item_2 ...`` with, per token, the sum of a
word, token-position, token-type (CLS / key / value) and item-position embedding, fed to a
BERT-style encoder initialised from a PLM (all-MiniLM-L6-v2 by default; ``plm`` may name a local
bert-base or Longformer checkpoint). The first token's final state represents the sequence; an item
is the same encoder on ``[CLS] + its own tokens``. Scores are cosine similarities (raw; the
teacher's temperature, 0.05, is reported in ``describe``).

Training (two stages, as in the paper): the item table is a buffer of encoded items. In stage 1
(``prepare_epoch`` with epoch < ``stage1_epochs``) it is re-encoded at the start of every epoch and
the encoder is trained with softmax cross-entropy of cosine/0.05 over the items of the example's
domain; in stage 2 the table is frozen and only the sequence side keeps learning. The table is
saved with the checkpoint, so inference never re-encodes the catalogue.

Pre-training (``objective="pretrain"``, the paper's Section 3.3): the item-item contrastive loss
(the sequence's representation against its next item's, both from the encoder, cosine / 0.05 with
in-batch negatives) plus ``mlm_weight`` (0.1) times masked language modelling over the sequence's
tokens (15% of the non-[CLS] tokens; 80% [MASK], 10% a random word piece, 10% kept), predicted by
a BERT-style head whose decoder is the (tied) word-piece table. The MLM forward is a separate pass
over the masked tokens, as in the authors' code. A fine-tuning stage starts from the pre-trained
encoder with ``init_from: previous`` (the MLM head is dropped).

Cut versus the paper for CPU training (all are settings): pre-training on the run's own domains
(not the paper's 7 others) for as many steps as the config gives, ``num_layers`` of the PLM's
layers kept (default 2 of 6), ``item_tokens`` tokens per item (default 32), ``max_seq_tokens`` per
sequence (default 256) and the last ``max_seq_items`` items (default 12).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from protos.contract import TeacherContractError
from teachers.base import Teacher, register_teacher
from teachers.text_encoder import mean_pool

TYPE_VALUE, TYPE_KEY, TYPE_CLS = 0, 1, 2  # value = BERT's segment 0, so PLM behaviour is kept on text
ATTRIBUTES = ("title", "brand", "category")
OBJECTIVES = ("finetune", "pretrain")
IGNORE_INDEX = -100  # label of a token the MLM loss skips (torch's cross_entropy default)
# Value-token caps per attribute (keys add one word piece each): with item_tokens=24 the title
# keeps its first 14 pieces, the brand 3, the category its last 4 (its most specific level).
DEFAULT_ATTR_TOKENS = {"title": 14, "brand": 3, "category": 4}


def parse_item_text(text: str) -> dict[str, str]:
    """Split a UniSRec item text "title. categories. brand. " into its three fields.

    Titles may themselves contain ". " ("No. 2", "0.05mm. Bought by ..."), categories and brands
    rarely do, so the split is taken from the right: the last field is the brand, the one before it
    the categories, everything earlier the title. Empty fields (". . ") come out as "". A text with
    fewer than three fields is treated as a title only.
    """
    body = text.strip()
    if body.endswith("."):
        body = body[:-1]
    parts = body.split(". ")
    if len(parts) < 3:
        return {"title": body.strip(" ."), "brand": "", "category": ""}
    brand, category, title = parts[-1], parts[-2], ". ".join(parts[:-2])
    return {"title": title.strip(" ."), "brand": brand.strip(" ."), "category": category.strip(" .")}


def tokenize_items(tokenizer, texts: list[str], item_tokens: int, attr_tokens: dict[str, int]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key-value token ids, token types and lengths of each item ([V, T], [V, T], [V]).

    Per attribute: the key's word pieces (type KEY) then at most ``attr_tokens[attr]`` value pieces
    (type VALUE); the title keeps its head, the category its tail (its most specific levels); an
    empty attribute is left out. The item is cut at ``item_tokens``. An empty text (PAD) has length 0.
    """
    n = len(texts)
    ids = torch.zeros(n, item_tokens, dtype=torch.long)
    types = torch.zeros(n, item_tokens, dtype=torch.long)
    lens = torch.zeros(n, dtype=torch.long)
    key_ids = {a: tokenizer(a, add_special_tokens=False)["input_ids"] for a in ATTRIBUTES}
    fields = [parse_item_text(t) if t else {} for t in texts]
    values = {a: tokenizer([f.get(a, "") for f in fields], add_special_tokens=False)["input_ids"]
              for a in ATTRIBUTES}
    for i in range(n):
        tok, typ = [], []
        for a in ATTRIBUTES:
            v = values[a][i]
            if not v:
                continue
            cap = int(attr_tokens.get(a, item_tokens))
            v = v[-cap:] if a == "category" else v[:cap]
            tok += key_ids[a] + v
            typ += [TYPE_KEY] * len(key_ids[a]) + [TYPE_VALUE] * len(v)
        tok, typ = tok[:item_tokens], typ[:item_tokens]
        ids[i, : len(tok)] = torch.tensor(tok, dtype=torch.long)
        types[i, : len(typ)] = torch.tensor(typ, dtype=torch.long)
        lens[i] = len(tok)
    return ids, types, lens


def mask_tokens(ids: torch.Tensor, maskable: torch.Tensor, probability: float, mask_token_id: int,
                vocab_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of ``ids`` [N, S] where ``maskable``: each maskable token is chosen with
    ``probability``; a chosen token becomes [MASK] (80%), a random word piece (10%) or stays (10%).
    Returns (masked ids, labels): labels are the original ids at chosen tokens, IGNORE_INDEX elsewhere."""
    dev = ids.device
    chosen = (torch.rand(ids.shape, generator=generator, device=dev) < probability) & maskable
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    roll = torch.rand(ids.shape, generator=generator, device=dev)
    random_ids = torch.randint(0, vocab_size, ids.shape, generator=generator, device=dev)
    out = torch.where(chosen & (roll < 0.8), torch.full_like(ids, mask_token_id), ids)
    out = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, out)
    return out, labels


def contrastive_loss(sequences: torch.Tensor, items: torch.Tensor, temperature: float) -> torch.Tensor:
    """Item-item contrastive loss: row i of ``sequences`` [B, H] against row i of ``items`` [B, H]
    (its next item), the other rows being in-batch negatives; cosine / ``temperature``, softmax CE."""
    logits = F.normalize(sequences, dim=-1) @ F.normalize(items, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


class MaskedLMHead(torch.nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then the word-piece table (tied, passed in
    at call time so it is not a second copy in the checkpoint) plus a per-word bias."""

    def __init__(self, hidden: int, vocab_size: int, eps: float = 1e-12):
        super().__init__()
        self.dense = torch.nn.Linear(hidden, hidden)
        self.norm = torch.nn.LayerNorm(hidden, eps=eps)
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(hidden))) @ word_embeddings.T + self.bias


def _encoder_config(config_dict: dict[str, Any]):
    from transformers import AutoConfig

    d = dict(config_dict)
    return AutoConfig.for_model(d.pop("model_type"), **d)


@register_teacher
class RecformerTeacher(Teacher):
    kind = "recformer"
    version = "1"

    def __init__(self, vocab_hash: str, num_items: int, temperature: float = 0.05, max_history: int = 50,
                 encoder_config: dict[str, Any] | None = None, plm: str = "all-MiniLM-L6-v2",
                 item_tokens: int = 24, attr_tokens: dict[str, int] | None = None,
                 max_seq_tokens: int = 128, max_seq_items: int = 8, pooling: str = "mean",
                 stage1_epochs: int = 2, cls_token_id: int = 101, encode_batch_size: int = 256,
                 freeze_word_embeddings: bool = True, objective: str = "finetune", mlm_weight: float = 0.1,
                 mlm_probability: float = 0.15, mask_token_id: int = 103):
        super().__init__(vocab_hash, num_items, temperature, max_history)
        if objective not in OBJECTIVES:
            raise ValueError(f"recformer objective {objective!r} is not one of {OBJECTIVES}")
        from transformers import AutoModel

        if encoder_config is None:
            raise TeacherContractError("RecformerTeacher needs encoder_config: build it with from_dataset")
        self.encoder_config = dict(encoder_config)
        cfg = _encoder_config(self.encoder_config)
        if max_seq_tokens > cfg.max_position_embeddings - self._position_offset(cfg):
            raise ValueError(f"max_seq_tokens={max_seq_tokens} exceeds the PLM's "
                             f"{cfg.max_position_embeddings} positions")
        if pooling not in ("first", "mean"):
            raise ValueError(f"pooling must be 'first' or 'mean', not {pooling!r}")
        self.plm, self.item_tokens, self.pooling = plm, int(item_tokens), pooling
        self.attr_tokens = {a: int(n) for a, n in (attr_tokens or DEFAULT_ATTR_TOKENS).items()}
        self.max_seq_tokens, self.max_seq_items = int(max_seq_tokens), int(max_seq_items)
        self.stage1_epochs, self.cls_token_id = int(stage1_epochs), int(cls_token_id)
        self.encode_batch_size = int(encode_batch_size)
        self.model_type = cfg.model_type
        self.encoder = AutoModel.from_config(cfg, add_pooling_layer=False)
        self.objective, self.mlm_weight = objective, float(mlm_weight)
        self.mlm_probability, self.mask_token_id = float(mlm_probability), int(mask_token_id)
        # Only a pre-training model carries the MLM head; fine-tuning drops it (transfer skips it).
        self.mlm_head = (MaskedLMHead(cfg.hidden_size, cfg.vocab_size, cfg.layer_norm_eps)
                         if objective == "pretrain" else None)
        # The word-piece table is 2/3 of a 2-layer MiniLM's weights; frozen, it keeps the PLM's
        # lexical space shared by items never seen in training, and makes steps cheaper.
        self.freeze_word_embeddings = bool(freeze_word_embeddings)
        self.encoder.get_input_embeddings().weight.requires_grad_(not self.freeze_word_embeddings)
        # Item position 0 = [CLS], 1 = most recent item, ...; zero-initialised so the encoder starts
        # out exactly as the PLM on the concatenated text.
        self.item_position = torch.nn.Embedding(self.max_seq_items + 1, cfg.hidden_size)
        torch.nn.init.zeros_(self.item_position.weight)
        self.register_buffer("item_token_ids", torch.zeros(num_items, self.item_tokens, dtype=torch.long))
        self.register_buffer("item_token_types", torch.zeros(num_items, self.item_tokens, dtype=torch.long))
        self.register_buffer("item_token_len", torch.zeros(num_items, dtype=torch.long))
        self.register_buffer("item_domain", torch.full((num_items,), -1, dtype=torch.long))
        self.register_buffer("item_table", torch.zeros(num_items, cfg.hidden_size))

    # -- construction -----------------------------------------------------------------------------
    @staticmethod
    def _position_offset(cfg) -> int:
        # RoBERTa-family models (Longformer) number positions from padding_idx + 1.
        return cfg.pad_token_id + 1 if cfg.model_type in ("roberta", "longformer", "xlm-roberta") else 0

    @classmethod
    def from_dataset(cls, dataset, plm: str = "all-MiniLM-L6-v2", num_layers: int = 2,
                     temperature: float = 0.05, encode_table: bool = True, **kwargs) -> "RecformerTeacher":
        """A teacher for ``dataset``: PLM weights (first ``num_layers`` layers), tokenised items,
        and (unless ``encode_table`` is False) the initial item table."""
        from teachers.text_encoder import load_plm

        tok, plm_model = load_plm(plm)
        cfg = copy.deepcopy(plm_model.config)
        if num_layers > cfg.num_hidden_layers:
            raise ValueError(f"num_layers={num_layers} but the PLM {plm!r} has {cfg.num_hidden_layers}")
        cfg.num_hidden_layers = int(num_layers)
        pretrained_types = cfg.type_vocab_size
        cfg.type_vocab_size = 3
        enc_cfg = cfg.to_dict()
        for k in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
            enc_cfg.pop(k, None)
        model = cls(vocab_hash=dataset.vocab_hash(), num_items=dataset.vocab_size, temperature=temperature,
                    max_history=dataset.max_len, encoder_config=enc_cfg, plm=plm,
                    cls_token_id=tok.cls_token_id, mask_token_id=tok.mask_token_id, **kwargs)
        # PLM weights: keep the first num_layers layers; the 3-row token-type table starts from the
        # PLM's segment-0 row for every type it does not have.
        src = {k: v for k, v in plm_model.state_dict().items() if not k.startswith("pooler.")}
        tt_key = next(k for k in src if k.endswith("token_type_embeddings.weight"))
        tt = src[tt_key]
        src[tt_key] = torch.cat([tt, tt[:1].expand(3 - pretrained_types, -1)]) if pretrained_types < 3 else tt[:3]
        own = model.encoder.state_dict()
        missing = [k for k in own if k not in src]
        if missing:
            raise TeacherContractError(f"PLM {plm!r} lacks encoder weights {missing[:5]}")
        model.encoder.load_state_dict({k: src[k] for k in own}, strict=True)
        ids, types, lens = tokenize_items(tok, dataset.item_texts, model.item_tokens, model.attr_tokens)
        model.item_token_ids.copy_(ids)
        model.item_token_types.copy_(types)
        model.item_token_len.copy_(lens)
        model.item_domain.copy_(torch.as_tensor(dataset.item_domain))
        if encode_table:
            model.refresh_item_table()
        return model

    def config_dict(self) -> dict[str, Any]:
        return {"encoder_config": self.encoder_config, "plm": self.plm, "item_tokens": self.item_tokens,
                "attr_tokens": self.attr_tokens, "max_seq_tokens": self.max_seq_tokens, "pooling": self.pooling,
                "max_seq_items": self.max_seq_items, "stage1_epochs": self.stage1_epochs,
                "cls_token_id": self.cls_token_id, "encode_batch_size": self.encode_batch_size,
                "freeze_word_embeddings": self.freeze_word_embeddings, "objective": self.objective,
                "mlm_weight": self.mlm_weight, "mlm_probability": self.mlm_probability,
                "mask_token_id": self.mask_token_id}

    # -- encoder ----------------------------------------------------------------------------------
    def _encode(self, ids: torch.Tensor, types: torch.Tensor, item_pos: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """Pooled encoder state (first token or masked mean) over [N, S] token ids / types / item
        positions / mask."""
        hidden = self._hidden_states(ids, types, item_pos, mask)
        if self.pooling == "first":
            return hidden[:, 0]
        return mean_pool(hidden, mask)

    def _hidden_states(self, ids: torch.Tensor, types: torch.Tensor, item_pos: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
        """Final token states [N, S, H] of the encoder."""
        cfg = self.encoder.config
        pos = torch.arange(ids.shape[1], device=ids.device) + self._position_offset(cfg)
        embeds = self.encoder.get_input_embeddings()(ids) + self.item_position(item_pos)
        kwargs = {}
        if self.model_type == "longformer":
            kwargs["global_attention_mask"] = (torch.arange(ids.shape[1], device=ids.device) == 0
                                               ).long().expand_as(ids)
        out = self.encoder(inputs_embeds=embeds, attention_mask=mask.long(), token_type_ids=types,
                           position_ids=pos.unsqueeze(0).expand_as(ids), **kwargs)
        return out.last_hidden_state

    def flatten_histories(self, histories: torch.Tensor, lengths: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """[CLS] + the last ``max_seq_items`` items' tokens, most recent first, cut at
        ``max_seq_tokens``: (ids, types, item positions, mask), each [B, S]."""
        B, L = histories.shape
        k = min(self.max_seq_items, L)
        dev = histories.device
        j = torch.arange(k, device=dev)
        src = lengths.view(-1, 1) - 1 - j.view(1, -1)  # history position of the j-th most recent
        item_ids = torch.where(src >= 0, histories.gather(1, src.clamp(min=0)), torch.zeros_like(src))
        T = self.item_tokens
        tok = self.item_token_ids[item_ids].view(B, k * T)
        typ = self.item_token_types[item_ids].view(B, k * T)
        valid = (torch.arange(T, device=dev).view(1, 1, T) < self.item_token_len[item_ids].unsqueeze(-1)
                 ).view(B, k * T)
        ipos = (j + 1).view(1, k, 1).expand(B, k, T).reshape(B, k * T)
        slot = valid.long().cumsum(1)  # 1-based: slot 0 is [CLS]
        S = int(min(self.max_seq_tokens, 1 + int(valid.sum(1).max().item()) if B else 1))
        keep = valid & (slot < S)
        idx = torch.where(keep, slot, torch.full_like(slot, S))  # column S collects the dropped tokens
        out = []
        for val, first in ((tok, self.cls_token_id), (typ, TYPE_CLS), (ipos, 0), (keep.long(), 1)):
            buf = torch.zeros(B, S + 1, dtype=torch.long, device=dev)
            buf.scatter_(1, idx, val * keep)
            buf[:, 0] = first
            out.append(buf[:, :S])
        ids, types, item_pos, mask = out
        return ids, types, item_pos, mask.bool()

    def encode_histories(self, histories: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self._encode(*self.flatten_histories(histories, lengths))

    def encode_items(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Encoder over ``[CLS] + item tokens`` (item position 1) -> [N, H]; no table lookup."""
        n = item_ids.shape[0]
        lens = self.item_token_len[item_ids]
        S = 1 + int(lens.max().item()) if n else 1
        dev = item_ids.device
        cls = torch.full((n, 1), self.cls_token_id, dtype=torch.long, device=dev)
        ids = torch.cat([cls, self.item_token_ids[item_ids]], 1)[:, :S]
        types = torch.cat([torch.full_like(cls, TYPE_CLS), self.item_token_types[item_ids]], 1)[:, :S]
        mask = torch.arange(S, device=dev).view(1, -1) <= lens.view(-1, 1)
        item_pos = mask.long()
        item_pos[:, 0] = 0
        return self._encode(ids * mask, types * mask, item_pos, mask)

    @torch.no_grad()
    def refresh_item_table(self, batch_size: int | None = None) -> None:
        """Re-encode every item into ``item_table`` (eval mode: no dropout), longest texts batched
        together so padding stays small."""
        was_training = self.training
        self.eval()
        bs = batch_size or self.encode_batch_size
        order = torch.argsort(self.item_token_len, descending=True)
        order = order[self.item_token_len[order] > 0]
        table = torch.zeros_like(self.item_table)
        for b in range(0, order.numel(), bs):
            ids = order[b: b + bs]
            table[ids] = self.encode_items(ids).to(table.dtype)
        self.item_table.copy_(table)
        self.train(was_training)

    # -- Teacher interface --------------------------------------------------------------------------
    def item_embeddings(self, item_ids: torch.Tensor) -> torch.Tensor:
        return self.item_table[item_ids]

    def similarity(self, seq: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return super().similarity(F.normalize(seq, dim=-1), F.normalize(items, dim=-1))

    def prepare_epoch(self, epoch: int) -> None:
        """Stage 1 (epoch < stage1_epochs): re-encode the item table; stage 2: keep it frozen.
        Pre-training encodes items on the fly and needs no table."""
        if self.objective == "pretrain":
            return
        if epoch < self.stage1_epochs or not bool(self.item_table.abs().sum() > 0):
            self.refresh_item_table()

    def training_loss(self, histories: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
                      domains: torch.Tensor) -> torch.Tensor:
        """Fine-tuning: softmax CE of cosine/temperature over all items of each example's domain
        (table fixed). Pre-training: ``pretraining_loss``."""
        if self.objective == "pretrain":
            return self.pretraining_loss(histories, lengths, targets)
        seq = F.normalize(self.encode_histories(histories, lengths), dim=-1)
        table = F.normalize(self.item_table, dim=-1)
        logits = seq @ table.T / self.temperature
        logits = logits.masked_fill(self.item_domain.view(1, -1) != domains.view(-1, 1), float("-inf"))
        return F.cross_entropy(logits, targets)

    # -- pre-training -------------------------------------------------------------------------------
    def mlm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the MLM head's word-piece prediction at every labelled token
        (labels != IGNORE_INDEX) of ``hidden`` [N, S, H]; 0 when no token is labelled."""
        if self.mlm_head is None:
            raise TeacherContractError("mlm_loss needs a model built with objective='pretrain'")
        chosen = labels != IGNORE_INDEX
        if not bool(chosen.any()):
            return hidden.sum() * 0.0
        logits = self.mlm_head(hidden[chosen], self.encoder.get_input_embeddings().weight)
        return F.cross_entropy(logits, labels[chosen])

    def pretraining_loss(self, histories: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Item-item contrastive loss of (history, next item) + ``mlm_weight`` x MLM on the history."""
        ids, types, item_pos, mask = self.flatten_histories(histories, lengths)
        seq = self._encode(ids, types, item_pos, mask)
        items = self.encode_items(targets)
        loss = contrastive_loss(seq, items, self.temperature)
        if self.mlm_weight > 0:
            maskable = mask.clone()
            maskable[:, 0] = False  # never the [CLS] token
            mlm_ids, labels = mask_tokens(ids, maskable, self.mlm_probability, self.mask_token_id,
                                          self.encoder.config.vocab_size, generator)
            hidden = self._hidden_states(mlm_ids, types, item_pos, mask)
            loss = loss + self.mlm_weight * self.mlm_loss(hidden, labels)
        return loss
