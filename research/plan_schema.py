"""Validation shared by the research plans (configs/union/plan.yaml, configs/mechanisms/*.yaml):
one error type and the checks every entry of a plan's YAML goes through, each naming the entry."""
from __future__ import annotations

from typing import Any


class PlanError(ValueError):
    """The plan is malformed, or a run directory contradicts it."""


def need(entry: Any, key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    """``entry[key]``, which must exist and be a ``kind`` (a string must not be blank)."""
    if not isinstance(entry, dict) or key not in entry:
        raise PlanError(f"{where}: missing key {key!r}")
    value = entry[key]
    if not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
        raise PlanError(f"{where}: {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def entry_mapping(raw: Any, keys: set[str] | frozenset[str], where: str) -> dict[str, Any]:
    """``raw`` as a plan entry: a mapping whose keys are all among ``keys``."""
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: expected a mapping")
    if set(raw) - set(keys):
        raise PlanError(f"{where}: unknown keys {sorted(set(raw) - set(keys))}")
    return raw


def distinct_ints(value: Any, key: str, where: str) -> list[int]:
    """A non-empty list of distinct integers (seeds)."""
    if not isinstance(value, list) or not value or len(set(value)) != len(value) or \
            not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise PlanError(f"{where}: {key!r} must be a non-empty list of distinct integers, got {value!r}")
    return value
