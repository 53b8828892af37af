"""Mechanics both training loops share (``teachers.training`` and ``student.trainer``).

- :func:`epoch_batches`: an epoch's row order cut into batches, optionally length-bucketed.
- :func:`write_dir_atomically` (or :func:`staging_dir`, :func:`fresh_dir`, :func:`commit_dir`):
  folders such as ``last/`` replaced only once completely written.
- :func:`rng_state`, :func:`set_rng_state`: the random state an exact resume needs.
- :func:`count_parameters`, :func:`peak_memory_mb`: a run's size, for metrics.json.

What a run directory holds (config.yaml, run.json, train.log, metrics.json) lives in
``ckd.run_dir``; evaluation (the ``RankingModel`` contract every model follows, and
``evaluate_model``) in ``ckd.metrics``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

# n -> a permutation of range(n). Each loop passes its own seeded source (a torch.Generator for
# teachers, a numpy Generator for the student) so both keep drawing exactly the stream they always did.
Permutation = Callable[[int], np.ndarray]


def torch_permutation(gen: torch.Generator) -> Permutation:
    """A :data:`Permutation` drawn from ``torch.randperm`` with ``gen``."""
    return lambda n: torch.randperm(n, generator=gen).numpy()


def epoch_batches(order: np.ndarray, lengths: np.ndarray, batch_size: int, bucket_batches: int,
                  permutation: Permutation, drop_last: bool = False) -> list[np.ndarray]:
    """Row indices of one epoch's batches, taken from ``order`` (the epoch's rows, already shuffled).

    ``bucket_batches`` > 0: rows are sorted by ``lengths`` (stable) inside consecutive pools of that
    many batches, cut into batches, and the batch order is shuffled with ``permutation``, so a batch
    holds rows of similar length (little padding) while the epoch still visits them in random order.
    0: consecutive slices of ``order`` and ``permutation`` is not called.
    ``drop_last``: drop a trailing partial batch, unless it is the only one.
    """
    if drop_last and len(order) >= batch_size:
        order = order[: len(order) // batch_size * batch_size]
    if bucket_batches <= 0:
        return [order[b: b + batch_size] for b in range(0, len(order), batch_size)]
    pool = bucket_batches * batch_size
    batches = []
    for p in range(0, len(order), pool):
        chunk = order[p: p + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[b: b + batch_size] for b in range(0, len(chunk), batch_size))
    return [batches[i] for i in permutation(len(batches))]


# -- folders written all or nothing ----------------------------------------------------------------

def staging_dir(final: Path) -> Path:
    """Where the next copy of ``final`` is written before :func:`commit_dir`: ``<final>.tmp``."""
    return final.with_name(final.name + ".tmp")


def fresh_dir(final: Path) -> Path:
    """The :func:`staging_dir` of ``final``, emptied (a half-written copy from an interrupted run
    is dropped) and created."""
    tmp = staging_dir(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """Put the finished ``tmp`` in place of ``final``. The previous copy is moved aside (not
    deleted) until the new one is in place, so an interruption never leaves neither."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_dir_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """``write(folder)`` into a fresh temporary folder, then swap it in for ``final``: an
    interruption mid-write leaves the previous ``final`` intact. (A multi-process writer calls
    :func:`fresh_dir`, writes into :func:`staging_dir` and calls :func:`commit_dir` itself, with
    barriers between.)"""
    tmp = fresh_dir(final)
    write(tmp)
    commit_dir(tmp, final)


# -- random state ----------------------------------------------------------------------------------

def rng_state(generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """torch's global CPU state (plus the current CUDA device's when there is one) and, when given,
    ``generator``'s under "shuffle": tensors, so safetensors can store them."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        out["shuffle"] = generator.get_state()
    return out


def set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_state` saved (a CUDA state only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if generator is not None:
        generator.set_state(state["shuffle"])


# -- size ------------------------------------------------------------------------------------------

def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``model`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def peak_memory_mb(device: torch.device | str) -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA allocation when on a GPU), in MB."""
    import resource

    device = torch.device(device)
    out = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
