"""Turn weights shipped without their frozen text table back into a servable teacher checkpoint.

Teachers whose item table is a frozen PLM embedding of item text (UniSRec) can be trained on a
remote GPU and brought back without that table (it is recomputed here, offline, from the same
item texts and PLM, and cached by content hash):

    python -m gpu.restore_teacher --weights W.safetensors --config config.json \
        --out runs/teachers/unisrec_text/best [--metrics metrics.json] [--data-dir D]

The restored model is loaded strictly (every tensor must match) and saved with teachers.base.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--config", required=True, help="the checkpoint's config.json")
    ap.add_argument("--out", required=True, help="checkpoint folder to write (e.g. runs/teachers/X/best)")
    ap.add_argument("--metrics", default="", help="the training run's metrics.json, copied next to --out")
    ap.add_argument("--domains", default="", help="comma list (default: the domain list in the config's run)")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)

    from safetensors.torch import load_file

    import teachers  # noqa: F401  (registers the teacher kinds)
    from ckd.config import default_data_dir
    from ckd.data.multidomain import load_multidomain
    from protos.contract import TeacherContractError
    from teachers.base import TEACHERS, save_teacher

    cfg = json.loads(Path(args.config).read_text())
    domains = [d for d in args.domains.split(",") if d] or cfg.get("domains") or ["Scientific"]
    ds = load_multidomain(args.data_dir or default_data_dir(), domains, max_len=cfg["max_history"])
    if ds.vocab_hash() != cfg["vocab_hash"]:
        raise TeacherContractError(f"{args.config} was trained on vocabulary {cfg['vocab_hash'][:12]}..., "
                                   f"domains {domains} here give {ds.vocab_hash()[:12]}...")
    kwargs = {k: v for k, v in cfg["model"].items() if k not in ("plm_dim", "num_domains")}
    model = TEACHERS[cfg["kind"]].from_dataset(ds, **kwargs)
    state = load_file(args.weights)
    rebuilt = {k: v for k, v in model.state_dict().items() if k not in state}
    print(f"recomputed here: {sorted(rebuilt)}")
    model.load_state_dict({**state, **rebuilt}, strict=True)
    model.temperature = cfg["temperature"]
    extra = {k: v for k, v in cfg.items() if k not in ("kind", "version", "vocab_hash", "num_items", "temperature",
                                                       "max_history", "model")}
    out = save_teacher(model, args.out, extra=extra)
    if args.metrics:
        shutil.copy(args.metrics, Path(args.out).parent / "metrics.json")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
