"""DeepFM's per-pair MLP: step time against the candidate chunk size (``model.extra.chunk``).

    python -m benchmarks.deepfm_chunk                          # prints a table, writes runs/bench_deepfm_chunk.json
    taskset -c 1 python -m benchmarks.deepfm_chunk --out results/throughput/deepfm_chunk.json

DeepFM scores every candidate of a row's domain for the full-softmax CE, and its MLP runs once per
(row, candidate) pair: a [B, chunk, H] block per chunk, under activation checkpointing when
training. The cost depends on the shapes only, so the batch is synthetic (random histories of the
union's max length, random targets) at the union recipe's sizes: B = 1024 rows, hidden 64, MLP
(32,), and by default the Games catalogue (16,859 candidates), the largest domain. Every chunk size
is timed on the same model weights and batch: a training step (scores, CE, backward; best of
``--repeats``) and a scoring pass under inference mode. The table also shows the largest
difference from the first chunk size in the scores (the chunks only split the candidate axis:
expect 0) and in the parameter gradients (summed in another order: expect float rounding).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HIDDEN, MLP = 64, (32,)  # the union recipe's DeepFM (configs/union/deepfm_joint_*.yaml, the DeepFM default MLP)

def _batch(vocab: int, rows: int, max_len: int, seed: int):
    from student.models.base import StudentBatch

    g = torch.Generator().manual_seed(seed)
    histories = torch.randint(1, vocab, (rows, max_len), generator=g)
    return StudentBatch(users=torch.arange(rows), domains=torch.zeros(rows, dtype=torch.long),
                        histories=histories, lengths=torch.full((rows,), max_len),
                        targets=torch.randint(1, vocab, (rows,), generator=g))


def measure(model, batch, candidates: torch.Tensor, repeats: int) -> tuple[dict[str, Any], torch.Tensor,
                                                                        dict[str, torch.Tensor]]:
    """Best-of-``repeats`` training step and one inference pass of ``model`` at its current chunk
    size: (the record, the scores, the parameter gradients), the last two for the comparison."""
    steps = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model.score(batch, candidates), batch.targets - 1)
        loss.backward()
        steps.append(time.perf_counter() - t)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.inference_mode():
        t = time.perf_counter()
        scores = model.score(batch, candidates)
        infer = time.perf_counter() - t
    record = {"chunk": model.chunk, "train_step_s": min(steps), "train_steps_s": steps, "inference_s": infer,
              "loss": loss.item()}
    return record, scores, grads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", default="1024,256,64,32,16", help="comma-separated chunk sizes; the first is the reference")
    p.add_argument("--candidates", type=int, default=16_859, help="catalogue size (Games: 16,859)")
    p.add_argument("--rows", type=int, default=1024, help="batch rows (the union recipe: 1024)")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_deepfm_chunk.json")
    args = p.parse_args(argv)
    chunks = [int(c) for c in args.chunks.split(",") if c.strip()]
    if not chunks or min(chunks) < 1:
        p.error(f"--chunks needs positive sizes, got {args.chunks!r}")
    torch.set_num_threads(args.threads)

    from ckd.run_dir import git_sha
    from research.experiments import machine_description
    from student.models.deepfm import DeepFM

    vocab = args.candidates + 1  # id 0 is PAD
    torch.manual_seed(args.seed)
    # One model, its chunk size changed between measurements: the same weights for every size.
    model = DeepFM(vocab, 1, hidden=HIDDEN, mlp=MLP)
    batch = _batch(vocab, args.rows, args.max_len, args.seed)
    candidates = torch.arange(1, vocab)
    rows, ref = [], None
    for chunk in chunks:
        model.chunk = chunk
        r, scores, grads = measure(model, batch, candidates, args.repeats)
        if ref is None:
            ref = (scores, grads, r["train_step_s"])
        r["scores_max_abs_diff"] = float((scores - ref[0]).abs().max())
        r["grads_max_abs_diff"] = max(float((g - ref[1][n]).abs().max()) for n, g in grads.items())
        r["speedup"] = ref[2] / r["train_step_s"]
        rows.append(r)
        print(f"chunk {chunk}: step {r['train_step_s']:.2f} s", file=sys.stderr, flush=True)

    hdr = (f"{'chunk':>6} {'train step s':>12} {'speed-up':>8} {'inference s':>11} "
           f"{'max |d score|':>13} {'max |d grad|':>12}")
    print(hdr + "\n" + "-" * len(hdr))
    for r in rows:
        print(f"{r['chunk']:>6} {r['train_step_s']:>12.2f} {r['speedup']:>7.2f}x {r['inference_s']:>11.2f} "
              f"{r['scores_max_abs_diff']:>13.2e} {r['grads_max_abs_diff']:>12.2e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "kind": "bench_deepfm_chunk", "git_sha": git_sha(), "machine": machine_description("cpu"),
        "command": " ".join(["python -m benchmarks.deepfm_chunk", *(argv if argv is not None else sys.argv[1:])]),
        "shapes": {"rows": args.rows, "candidates": args.candidates, "max_len": args.max_len, "hidden": HIDDEN,
                   "mlp": list(MLP)}, "threads": args.threads, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
