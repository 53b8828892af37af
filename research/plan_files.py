"""Reading a research plan file (configs/union/plan.yaml, configs/mechanisms/*.yaml): one place for
the not-found and not-YAML errors every plan reader reports the same way."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def read_plan_yaml(path: str | os.PathLike[str], label: str | None, error: type[Exception]) -> Any:
    """The parsed YAML of the plan at ``path``; ``error`` (the reader's PlanError) names the file
    (as ``label`` when given) when it is missing or not valid YAML."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise error(f"plan not found: {p}")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise error(f"{label or p}: not valid YAML ({exc})") from exc
