"""Ray on loopback: start or join a Ray whose every server listens on 127.0.0.1 only (the
embedded default of ``ckd-distill`` and ``ckd-serve``). Shared by the service (cluster/) and the
student (student/teacher_pool.py), which may import only ``ckd`` and ``protos``."""
from __future__ import annotations

import ipaddress
import os
from typing import Any

# Ray's servers (GCS, raylet, object manager, workers, agents) listen on 127.0.0.1 only when the
# node's IP is 127.0.0.1, and on Linux Ray replaces a loopback IP (given to ray.init, or in an
# address to join) with the host's external one unless it runs in its single-machine mode, the one
# it uses on macOS and Windows: that mode is switched by RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0. It is
# read once, when Ray is imported, into ray._private.ray_constants.ENABLE_RAY_CLUSTER, which
# services.get_node_ip_address reads on every call; so both are set.
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def use_ray_loopback_mode() -> None:
    """Put this process (and processes it starts later) in Ray's single-machine mode: a Ray it
    starts listens on 127.0.0.1 only, and it can join a Ray that does. Call before ``ray.init``.
    Do not call it in a process that must join a multi-node cluster."""
    os.environ[RAY_LOOPBACK_ENV] = "0"
    try:
        from ray._private import ray_constants
    except ImportError:  # no Ray here: nothing to switch
        return
    ray_constants.ENABLE_RAY_CLUSTER = False


def is_loopback_address(address: str) -> bool:
    """True for ``127.x.x.x:port``, ``localhost:port``, ``[::1]:port`` (also with ``ray://``)."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def join_ray(address: str, **init_kwargs: Any) -> Any:
    """``ray.init(address=...)`` that also reaches a Ray listening on loopback only (the embedded
    default): for a loopback address this process switches to Ray's single-machine mode first."""
    if is_loopback_address(address):
        use_ray_loopback_mode()
    import ray

    return ray.init(address=address, **init_kwargs)
