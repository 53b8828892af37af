"""Change a teacher's replica count on a running deployment.

    ckd-scale --address HOST:PORT --namespace ckd --teacher unisrec --replicas 3

It writes the target into the directory actor; the process that owns the replicas (launch/serve.py,
or the embedded deployment of launch/distill.py) reconciles within a second. Clients pick up new
replicas on their next refresh; removed replicas are drained first, so no request is lost.
"""
from __future__ import annotations

import argparse
import sys
import time

import ray

from protos.contract import DIRECTORY_NAME


def request_scale(namespace: str, teacher: str, replicas: int, directory: str = DIRECTORY_NAME) -> None:
    """Set the target replica count of ``teacher`` (Ray must already be initialised)."""
    handle = ray.get_actor(directory, namespace=namespace)
    ray.get(handle.set_target.remote(teacher, int(replicas)))


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
    ray.init(address=args.address, namespace=args.namespace, logging_level="WARNING", log_to_driver=False)
    try:
        request_scale(args.namespace, args.teacher, args.replicas, args.directory)
        handle = ray.get_actor(args.directory, namespace=args.namespace)
        end = time.monotonic() + args.wait
        while True:  # at least one look, also with --wait 0
            eps = ray.get(handle.endpoints.remote(args.teacher))
            if len(eps) == args.replicas:
                print(f"{args.teacher}: {len(eps)} replica(s): {', '.join(eps)}")
                return 0
            if time.monotonic() >= end:
                break
            time.sleep(0.5)
        print(f"{args.teacher}: target {args.replicas} set, but the directory still lists "
              f"{len(eps)} replica(s) after {args.wait:.0f} s (is launch/serve.py running?)", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
