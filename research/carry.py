"""Results that outlive their run directories.

Run directories (runs/, git-ignored) live on the machine that trained them; the committed results
JSON is the durable record. A session may start on a fresh machine, where a collect would find no
run directory and turn every finished row back into "pending". So a collect reads the JSON it is
about to replace (``load_previous``) and keeps a finished entry whose run directory is not finished
here (``carry``), marked with where it came from, as long as every committed file it depends on is
unchanged since it was first recorded (``config_unchanged``; a YAML config compares by its parsed
content, so comments may change). A finished run directory here always wins.
"""
from __future__ import annotations

import copy
import functools
import json
import re
import subprocess
from pathlib import Path
from typing import Any, Callable

from ckd.config import content_key, read_file_bytes
from research.plan_schema import PlanError


def load_previous(path: Path) -> dict[str, Any] | None:
    """The results JSON at ``path`` that a collect is about to replace, or None when there is none.
    A file that is not a JSON object is an error: it would silently drop every carried result."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path}: not valid JSON ({exc}); fix or remove it before collecting") from exc
    if not isinstance(data, dict):
        raise PlanError(f"{path}: not a results JSON object")
    return data


def config_unchanged(root: Path, commit: str | None, paths: list[str]) -> tuple[bool, str]:
    """Whether every file of ``paths`` (relative to ``root``) is the same in the work tree as at
    ``commit``; with the reason when not (unknown or dirty commit, changed file, no git)."""
    if not commit or not re.fullmatch(r"[0-9a-f]{40}", commit):
        return False, f"the recorded results came from commit {commit!r}, which is not a clean commit"
    if _git(str(root), "cat-file", "-e", f"{commit}^{{commit}}") is None:
        return False, f"commit {commit[:12]} is not in this clone (a shallow clone?): cannot compare the configs"

    def read_here(rel: str) -> bytes | None:
        return read_file_bytes(str(root / rel))

    def read_at(rel: str) -> bytes | None:
        return _git(str(root), "cat-file", "blob", f"{commit}:{rel}")

    for rel in paths:
        at = read_at(rel)
        if at is None:
            return False, f"{rel} is not in commit {commit[:12]}"
        here = read_here(rel)
        if here is None or not same_content(rel, here, at, read_here, read_at):
            return False, f"{rel} changed since commit {commit[:12]}"
    return True, ""


def same_content(rel: str, here: bytes, at: bytes, read_here: Callable[[str], bytes | None] | None = None,
                 read_at: Callable[[str], bytes | None] | None = None) -> bool:
    """Whether a committed input is unchanged: for a YAML file the same parsed document
    (ckd.config.content_key), so that a comment or layout edit of a config (what it is for, which
    file supersedes it) does not throw away the results it produced; any other file, the same bytes.
    With the readers (a file's bytes by path, here and at the recorded commit) a config's ``base:``
    is resolved on each side, so moving settings into a base keeps the results, and editing the
    base is a change of every config over it."""
    return content_key(rel, here, read_here) == content_key(rel, at, read_at)


@functools.lru_cache(maxsize=1024)
def _git(root: str, *args: str) -> bytes | None:
    """A git command's stdout, None when it fails; cached, since a collect asks for the same blobs of
    the same commit once per entry (commits are immutable)."""
    try:
        got = subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return got.stdout if got.returncode == 0 else None


def carry(entry: dict[str, Any], previous: dict[str, Any], root: Path, configs: list[str]) -> dict[str, Any] | str:
    """A deep copy of ``entry`` (a finished entry of the ``previous`` results JSON) marked with
    ``carried`` = {from_commit, collected}: where the result was recorded. An entry carried before
    keeps its first origin. Returns the reason instead when ``configs`` (every committed file the
    result depends on) changed since that origin."""
    origin = entry.get("carried") or {"from_commit": previous.get("commit"), "collected": previous.get("created")}
    # an entry carried before is checked against where it was first recorded: a later collect from a
    # dirty tree does not make it unverifiable
    ok, why = config_unchanged(root, origin.get("from_commit"), configs)
    if not ok:
        return why
    out = copy.deepcopy(entry)
    out["carried"] = origin
    return out
