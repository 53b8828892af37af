"""CPU core affinity of a whole process: the CPU form of "one device per teacher".

A teacher replica (cluster/replica.py, TeacherSpec.cpus) and the student (launch/distill.py --cpus)
each pin themselves to a core set, so that on one machine the student's step and the teachers'
scoring do not compete for the same cores. Linux only (os.sched_setaffinity).

``os.sched_setaffinity(0, ...)`` pins only the calling thread (and the threads it starts later);
a process that already runs threads (torch's pool, gRPC, Ray's core worker) must pin each of them,
which ``pin_process`` does through /proc/<pid>/task.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


class AffinityError(ValueError):
    """A core set that cannot be applied (bad syntax, or cores this process may not use)."""


def parse_cpus(spec: str | Iterable[int]) -> list[int]:
    """Sorted distinct core ids from "0,2-3" or an iterable of ints; AffinityError when empty or bad."""
    if isinstance(spec, str):
        out: set[int] = set()
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            try:
                if "-" in part:
                    lo, hi = (int(x) for x in part.split("-", 1))
                    if hi < lo:
                        raise ValueError
                    out.update(range(lo, hi + 1))
                else:
                    out.add(int(part))
            except ValueError:
                raise AffinityError(f"bad core list {spec!r}: {part!r} is not a core id or a range a-b") from None
        cpus = out
    else:
        try:
            cpus = {int(c) for c in spec}
        except (TypeError, ValueError):
            raise AffinityError(f"bad core list {spec!r}: core ids must be integers") from None
    if not cpus:
        raise AffinityError(f"empty core list {spec!r}")
    if min(cpus) < 0:
        raise AffinityError(f"bad core list {spec!r}: core ids must be >= 0")
    return sorted(cpus)


def format_cpus(cpus: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (the Cpus_allowed_list form)."""
    xs = sorted(set(cpus))
    parts, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(parts)


def available_cpus() -> set[int]:
    """The cores this process may run on now (its cgroup / container limit included)."""
    return set(os.sched_getaffinity(0))


def process_cpus(pid: int) -> set[int]:
    """The cores process ``pid`` may run on, read back from /proc/<pid>/status (Cpus_allowed_list):
    the view of the OS, not of the process's own bookkeeping."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return set(parse_cpus(line.split(":", 1)[1].strip()))
    raise AffinityError(f"/proc/{pid}/status has no Cpus_allowed_list")


def thread_cpus(pid: int) -> dict[int, set[int]]:
    """{thread id: its cores} for every thread of process ``pid``."""
    out: dict[int, set[int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = set(os.sched_getaffinity(int(task.name)))
        except (ProcessLookupError, FileNotFoundError):
            pass  # the thread ended meanwhile
    return out


PIN_PASSES = 20  # passes over a process's threads before pin_process gives up on late-starting ones


def pin_process(cpus: str | Iterable[int], pid: int | None = None) -> list[int]:
    """Restrict every thread of process ``pid`` (default: this one) to ``cpus``; threads it starts
    later inherit the set. Returns the core list. AffinityError names cores beyond the machine or
    outside what the kernel lets this process use (a container's cpuset), not a bare EINVAL."""
    wanted = parse_cpus(cpus)
    ncpu = os.cpu_count() or 1
    beyond = [c for c in wanted if c >= ncpu]
    if beyond:
        raise AffinityError(f"cores {format_cpus(beyond)} do not exist: this machine has {ncpu} "
                            f"(cores 0-{ncpu - 1})")
    target = os.getpid() if pid is None else int(pid)
    # A thread that an unpinned thread starts while this loop runs inherits the old set, so pass over
    # the threads again until none is left outside (seen under load: a Ray worker's gRPC threads).
    want = set(wanted)
    for _ in range(PIN_PASSES):
        stray = sorted(tid for tid, cores in thread_cpus(target).items() if cores != want)
        if not stray:
            break
        for tid in stray:
            try:
                os.sched_setaffinity(tid, wanted)
            except ProcessLookupError:
                pass  # the thread ended meanwhile
            except OSError as exc:
                raise AffinityError(f"cannot pin to cores {format_cpus(wanted)}: {exc.strerror} (this process "
                                    f"may use {format_cpus(available_cpus())}; a container's cpuset can forbid "
                                    f"the rest)") from None
    return wanted


def pin_thread(cpus: str | Iterable[int]) -> list[int]:
    """Restrict the calling thread alone to ``cpus`` (on Linux, sched_setaffinity of pid 0 is the
    calling thread); the rest of the process keeps its cores. For a process's helper threads, e.g.
    the student's label prefetch, which can then work on cores of their own. Returns the core list."""
    wanted = parse_cpus(cpus)
    try:
        os.sched_setaffinity(0, wanted)
    except OSError as exc:
        raise AffinityError(f"cannot pin a thread to cores {format_cpus(wanted)}: {exc.strerror} (this process "
                            f"may use {format_cpus(available_cpus())})") from None
    return wanted
