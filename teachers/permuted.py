"""A corrupted teacher: a real trained teacher whose item ids are permuted within each domain.

Kind ``permuted``: the wrapped teacher reads the true history, but candidate ``i`` is scored as the
base scores item ``perm[i]`` (a seeded permutation of each domain's own id range; PAD stays 0). Its
score distributions are as sharp as the base's, so it is *confident and wrong*: its top item for a
row is ``perm^-1`` of the base's top item. It is served like any teacher (one checkpoint folder:
the base's weights under ``base.`` plus the permutation, so the checkpoint's sha256 names both),
which is what the integration experiments of issue 22 put in the pool.

    python -m teachers.permuted --base runs/union/teachers/unisrec_textid/best \
        --out runs/union/teachers/unisrec_textid_permuted --seed 7
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from protos.contract import TeacherContractError
from teachers.base import TEACHERS, Teacher, load_teacher, register_teacher, save_teacher


def permutation_within_ranges(num_items: int, ranges: list[tuple[int, int]], seed: int) -> torch.Tensor:
    """int64 [num_items]: a seeded random permutation of each [start, stop) range, identity elsewhere."""
    perm = torch.arange(num_items, dtype=torch.long)
    gen = torch.Generator().manual_seed(int(seed))
    for start, stop in ranges:
        perm[start:stop] = start + torch.randperm(stop - start, generator=gen)
    return perm


def domain_ranges_of(teacher: Teacher) -> list[tuple[int, int]]:
    """The domains' global id ranges from the teacher's ``item_domain`` buffer, or one range of
    every non-PAD id for a teacher without one."""
    item_domain = getattr(teacher, "item_domain", None)
    if item_domain is None:
        return [(1, teacher.num_items)]
    from teachers.losses import domain_ranges

    return sorted(domain_ranges(item_domain.cpu()).values())


@register_teacher
class PermutedTeacher(Teacher):
    kind = "permuted"
    version = "1"

    def __init__(self, vocab_hash: str, num_items: int, temperature: float, max_history: int,
                 base_kind: str = "", base_version: str = "1", base_model: dict[str, Any] | None = None,
                 seed: int = 0):
        super().__init__(vocab_hash, num_items, temperature, max_history)
        import teachers  # noqa: F401  (registers the built-in kinds the base may be)

        cls = TEACHERS.get(base_kind)
        if cls is None or cls is PermutedTeacher:
            raise TeacherContractError(f"permuted teacher: base kind {base_kind!r} is not a registered teacher")
        self.base_kind, self.base_version, self.seed = base_kind, base_version, int(seed)
        self.base_model = dict(base_model or {})
        self.base = cls(vocab_hash=vocab_hash, num_items=num_items, temperature=temperature,
                        max_history=max_history, **self.base_model)
        self.register_buffer("perm", torch.arange(num_items, dtype=torch.long))

    @classmethod
    def wrap(cls, base: Teacher, seed: int, ranges: list[tuple[int, int]] | None = None) -> "PermutedTeacher":
        """A permuted copy of ``base`` (its weights copied; ``ranges`` default: its domains)."""
        model = cls(base.vocab_hash, base.num_items, base.temperature, base.max_history, base_kind=base.kind,
                    base_version=base.version, base_model=base.config_dict(), seed=seed)
        model.base.load_state_dict(base.state_dict(), strict=True)
        model.perm.copy_(permutation_within_ranges(base.num_items, ranges or domain_ranges_of(base), seed))
        return model.eval()

    def config_dict(self) -> dict[str, Any]:
        return {"base_kind": self.base_kind, "base_version": self.base_version, "base_model": self.base_model,
                "seed": self.seed}

    def encode_histories(self, histories: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.base.encode_histories(histories, lengths)  # the true history

    def item_embeddings(self, item_ids: torch.Tensor) -> torch.Tensor:
        return self.base.item_embeddings(self.perm[item_ids])  # candidate i answers as item perm[i]

    def similarity(self, seq: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.base.similarity(seq, items)

    def train(self, mode: bool = True) -> "PermutedTeacher":
        super().train(mode)
        self.base.train(mode)
        return self


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="checkpoint folder of the clean teacher")
    ap.add_argument("--out", required=True, help="checkpoint folder to write")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--evaluate", nargs="+", metavar="DOMAIN", default=None,
                    help="also write <out>/metrics.json: the written teacher's full-ranking valid and test "
                         "metrics on these domains (in the base's order), as ckd-train-teacher writes them")
    ap.add_argument("--data-dir", default=None, help="data root for --evaluate (default $CKD_DATA_DIR)")
    args = ap.parse_args(argv)
    base = load_teacher(args.base)
    out = save_teacher(PermutedTeacher.wrap(base, args.seed), args.out,
                       extra={"base_checkpoint": str(args.base), "base_checkpoint_sha256": base.checkpoint_sha256})
    print(f"permuted teacher (seed {args.seed}) of {args.base} written to {Path(out)}")
    if args.evaluate:
        import json

        from ckd.config import default_data_dir
        from ckd.data.multidomain import load_multidomain
        from ckd.metrics import evaluate_model

        data = load_multidomain(args.data_dir or default_data_dir(), args.evaluate, max_len=int(base.max_history))
        model = load_teacher(out, expected_vocab_hash=data.vocab_hash())
        metrics = {split: evaluate_model(model, data, split) for split in ("valid", "test")}
        metrics.update(kind=model.kind, checkpoint=str(out), checkpoint_sha256=model.checkpoint_sha256)
        (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print("test " + ", ".join(f"{d} NDCG@10 {m['ndcg@10']:.4f}" for d, m in metrics["test"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
