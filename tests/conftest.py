"""Shared fixtures: the real data root (CKD_DATA_DIR) and cached loads of real domains."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray's loopback mode (ckd.ray_loopback.use_ray_loopback_mode), set before Ray is imported: the
# embedded default listens on 127.0.0.1 only, and a test process that joins it must agree.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CKD_CACHE_DIR", str(REPO_ROOT / ".cache" / "ckd"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".torch_extensions"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real Amazon data root; the run fails loudly if it is not there."""
    root = Path(os.environ.get("CKD_DATA_DIR", REPO_ROOT.parent / "shared" / "data" / "amazon"))
    if not (root / "Scientific" / "Scientific.test.inter").is_file():
        pytest.fail(f"real data not found under {root}: set CKD_DATA_DIR to the amazon data folder")
    return root


@pytest.fixture(scope="session")
def scientific(data_dir):
    """The real Scientific domain merged on its own (global ids 1..4385)."""
    from ckd.data.multidomain import load_multidomain

    return load_multidomain(data_dir, ["Scientific"], max_len=50)


@pytest.fixture(scope="session")
def scientific_mm(data_dir):
    """The real ScientificMM domain with its text and image feature matrices."""
    from ckd.data.multidomain import load_multidomain

    return load_multidomain(data_dir, ["ScientificMM"], max_len=50)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (use with ``pytest.mark.usefixtures``): on the shared
    2-core machine more threads than cores makes every step many times slower."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture
def two_teacher_spec(tmp_path) -> Path:
    """A deploy spec with two fixture teachers (a: 2 replicas, b: 1) whose checkpoints exist, for
    tests of how a run builds the spec it starts; a clean checkout has no trained teachers."""
    from benchmarks.fixture_teacher import make_fixture_checkpoint

    for name in ("a", "b"):
        make_fixture_checkpoint(tmp_path / name, num_items=10, dim=4)
    spec = tmp_path / "serve.yaml"
    spec.write_text("teacher_modules: [benchmarks.fixture_teacher]\nteachers:\n"
                    f"  - {{name: a, checkpoint: {tmp_path / 'a'}, replicas: 2}}\n"
                    f"  - {{name: b, checkpoint: {tmp_path / 'b'}, replicas: 1}}\n")
    return spec
