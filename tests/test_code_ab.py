"""benchmarks/code_ab.py: the same benchmark on two checkouts, alternating; each tree runs its own code."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import code_ab

pytestmark = pytest.mark.unit

# A stand-in for benchmarks.inference in each tree: it reports the tree's own constant, so the driver
# is shown to run each tree's code (the real benchmark has its own tests).
FAKE = '''import json, sys
from pathlib import Path
args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
ckpt = args[args.index("--student") + 1].partition("=")[2]
assert Path(ckpt).is_absolute() and Path(ckpt).is_file(), ckpt
out.write_text(json.dumps({"models": {"m": {"infer_ms_per_1000_users": MS, "peak_memory_mb": MB}}}))
'''


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def fake_tree(root: Path, ms: float, mb: float) -> Path:
    (root / "benchmarks").mkdir(parents=True)
    (root / "benchmarks" / "__init__.py").write_text("")
    (root / "benchmarks" / "inference.py").write_text(FAKE.replace("MS", str(ms)).replace("MB", str(mb)))
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "tree")
    return root


def test_each_tree_runs_its_own_code_alternating_and_the_ratio_is_computed(tmp_path, monkeypatch, capsys):
    before, after = fake_tree(tmp_path / "before", 200.0, 500.0), fake_tree(tmp_path / "after", 150.0, 120.0)
    work = tmp_path / "work"
    (work / "ckpt").mkdir(parents=True)
    (work / "ckpt" / "model.safetensors").write_text("x")
    monkeypatch.chdir(work)
    argv = ["--tree", f"before={before}", "--tree", f"after={after}", "--rounds", "3", "--out", "ab.json",
            "--", "--student", "m=ckpt/model.safetensors", "--domain", "Games"]
    assert code_ab.main(argv) == 0
    data = json.loads((work / "ab.json").read_text())
    assert [r["order"] for r in data["rounds"]] == [["before", "after"], ["after", "before"], ["before", "after"]]
    s = data["summary"]["m"]
    assert s["trees"]["before"]["infer_ms_median"] == 200.0 and s["trees"]["after"]["peak_mb_max"] == 120.0
    assert s["ratio_to_first"]["after"] == [0.75, 0.75, 0.75] and s["ratio_to_first_median"]["after"] == 0.75
    assert data["trees"]["after"]["commit"] and data["benchmark_args"][1] == f"m={work / 'ckpt/model.safetensors'}"
    assert "0.75x" in capsys.readouterr().out


def test_a_dirty_tree_or_a_missing_tree_is_refused(tmp_path, monkeypatch, capsys):
    before = fake_tree(tmp_path / "before", 1.0, 1.0)
    monkeypatch.chdir(tmp_path)
    argv = ["--tree", f"before={before}", "--tree", f"after={tmp_path / 'none'}", "--", "--domain", "Games"]
    assert code_ab.main(argv) == 2
    assert f"{tmp_path / 'none'}: not a git checkout" in capsys.readouterr().err
    (before / "benchmarks" / "inference.py").write_text("# edited\n")
    assert code_ab.main(["--tree", f"before={before}", "--tree", f"after={before}", "--", "--domain", "G"]) == 2
    assert "before: has uncommitted changes to tracked files" in capsys.readouterr().err
    assert code_ab.main(["--tree", f"before={before}", "--", "--domain", "G"]) == 2
    assert "give two or more --tree NAME=CHECKOUT" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing written on a refusal
