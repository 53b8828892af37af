"""Serve teachers from a YAML spec on a Ray cluster, or on an embedded local Ray; Ctrl-C stops.

    ckd-serve --spec configs/serve_example.yaml                 # embedded local Ray
    ckd-serve --spec configs/serve_example.yaml --address HOST:6379

Prints the Ray address and namespace students connect to (TeacherPool.from_ray) and each replica's
endpoint. Replica counts follow targets set by launch/scale.py (reconciled every second). The loop
rides out a restart of the directory actor (it retries with backoff and logs); only Ctrl-C or
SIGTERM stops it and takes the replicas down.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

import ray

from ckd.config import ConfigError
from cluster.deploy import TeacherDeployment, load_spec, start_embedded
from ckd.ray_loopback import join_ray


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True, help="YAML naming each teacher, its checkpoint and replica count")
    ap.add_argument("--address", default="", help="Ray GCS address of a running cluster; empty = embedded")
    ap.add_argument("--num-cpus", type=int, default=None, help="embedded Ray only: CPUs to offer")
    ap.add_argument("--reconcile-every", type=float, default=1.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = load_spec(args.spec)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.address:
        join_ray(args.address, namespace=spec.namespace, logging_level="WARNING")
        dep = TeacherDeployment(spec)
        dep.deploy()
        address = args.address
    else:
        address, dep = start_embedded(spec, num_cpus=args.num_cpus)
    stop = {"now": False}
    # Handle both explicitly: a shell starts background jobs with SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.update(now=True))
    print(json.dumps({"ray_address": address, "namespace": spec.namespace, "endpoints": dep.endpoints()}),
          flush=True)
    try:
        # Transient failures (a directory restart, a replica that will not start) are retried inside;
        # the finally below runs only when we are asked to stop.
        dep.serve_forever(lambda: stop["now"], every=args.reconcile_every,
                          on_change=lambda eps: print(json.dumps({"endpoints": eps}), flush=True))
    finally:
        dep.shutdown()
        if ray.is_initialized():
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
