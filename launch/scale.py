"""Change a teacher's replica count on a running deployment.

    ckd-scale --address HOST:PORT --namespace ckd --teacher unisrec --replicas 3

It writes the target into the directory actor (which persists it in Ray's GCS key-value store, so it
survives a directory restart). Only a process that runs the reconcile loop applies it: ``ckd-serve``
(launch/serve.py) reconciles every second. The embedded deployment that ``ckd-distill``
(launch/distill.py) starts does not reconcile: its replica count is fixed for the run, and this
command refuses to wait on it (no owner has read the targets recently). Clients pick up new replicas
on their next refresh; removed replicas are drained first, so no request is lost.
"""
from __future__ import annotations

import argparse
import sys
import time

import ray

from ckd.ray_loopback import join_ray
from protos.contract import DIRECTORY_NAME

# An owner that reconciles reads the targets every ``--reconcile-every`` (1 s) between rounds; a round
# that starts replicas can take a while, so only a long silence means nobody reconciles.
RECONCILE_SILENCE_S = 60.0


class ScaleError(ValueError):
    """A scale request the deployment cannot apply (unknown teacher, bad count)."""


def request_scale(namespace: str, teacher: str, replicas: int, directory: str = DIRECTORY_NAME) -> None:
    """Set the target replica count of ``teacher`` (Ray must already be initialised). A teacher the
    deployment does not serve is refused with a ScaleError naming the ones it does."""
    if int(replicas) < 0:
        raise ScaleError(f"replica count must be >= 0, got {replicas}")
    handle = ray.get_actor(directory, namespace=namespace)
    known = ray.get(handle.teachers.remote(), timeout=30)
    if teacher not in known:
        raise ScaleError(f"no teacher {teacher!r} in this deployment (namespace {namespace!r}); "
                         f"known teachers: {', '.join(known) or 'none'}")
    ray.get(handle.set_target.remote(teacher, int(replicas)), timeout=30)


def reconciler_problem(handle: "ray.actor.ActorHandle", silence_s: float = RECONCILE_SILENCE_S) -> str | None:
    """Why a target set in this directory would never be applied (no owner has read the targets in
    ``silence_s``), or None when some process reconciles it."""
    age = ray.get(handle.reconciled_age.remote(), timeout=30)
    if age is not None and age <= silence_s:
        return None
    since = "since its directory started" if age is None else f"for {age:.0f} s"
    return (f"no process has reconciled this deployment {since}. Only ckd-serve applies targets; the embedded "
            f"service of ckd-distill keeps its replica count for the run")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", required=True, help="Ray GCS address printed by launch/serve.py")
    ap.add_argument("--namespace", default="ckd")
    ap.add_argument("--directory", default=DIRECTORY_NAME)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--replicas", type=int, required=True)
    ap.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the directory to show it")
    args = ap.parse_args(argv)
    if args.replicas < 0:
        ap.error("--replicas must be >= 0")
    # join_ray: an embedded ckd-serve listens on loopback only, which needs Ray's loopback mode.
    join_ray(args.address, namespace=args.namespace, logging_level="WARNING", log_to_driver=False)
    try:
        try:
            request_scale(args.namespace, args.teacher, args.replicas, args.directory)
        except ScaleError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except ValueError:  # ray.get_actor: no such actor
            print(f"error: no teacher directory {args.directory!r} in namespace {args.namespace!r} at "
                  f"{args.address} (is ckd-serve running?)", file=sys.stderr)
            return 2
        handle = ray.get_actor(args.directory, namespace=args.namespace)
        problem = reconciler_problem(handle)
        if problem:
            print(f"error: target {args.replicas} for {args.teacher} is set, but {problem}.", file=sys.stderr)
            return 1
        end = time.monotonic() + args.wait
        while True:  # at least one look, also with --wait 0
            eps = ray.get(handle.endpoints.remote(args.teacher), timeout=30)
            if len(eps) == args.replicas:
                print(f"{args.teacher}: {len(eps)} replica(s): {', '.join(eps)}")
                return 0
            if time.monotonic() >= end:
                break
            time.sleep(0.5)
        print(f"{args.teacher}: target {args.replicas} set, but the directory still lists "
              f"{len(eps)} replica(s) after {args.wait:.0f} s (is ckd-serve running? only it reconciles)",
              file=sys.stderr)
        return 1
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
