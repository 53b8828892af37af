"""Regenerate the checked-in gRPC code from teacher.proto with grpc_tools.

    python -m protos.generate            # rewrite protos/teacher_pb2*.py in place
    python -m protos.generate --out DIR  # write into DIR (the freshness test compares the two)

The generated ``teacher_pb2_grpc.py`` imports ``teacher_pb2`` as a top-level module; we rewrite
that one import to a package-relative one so the code works as ``protos.teacher_pb2_grpc``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = "teacher.proto"
GENERATED = ("teacher_pb2.py", "teacher_pb2_grpc.py")


def generate(out_dir: str | Path = PROTO_DIR) -> list[Path]:
    """Run protoc (from grpcio-tools) on teacher.proto; returns the written files."""
    from grpc_tools import protoc

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={out}",
                      f"--grpc_python_out={out}", str(PROTO_DIR / PROTO_FILE)])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc} on {PROTO_DIR / PROTO_FILE}")
    grpc_file = out / "teacher_pb2_grpc.py"
    text = grpc_file.read_text()
    text = text.replace("import teacher_pb2 as teacher__pb2", "from . import teacher_pb2 as teacher__pb2")
    grpc_file.write_text(text)
    return [out / name for name in GENERATED]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(PROTO_DIR), help="output folder (default: protos/)")
    args = ap.parse_args(argv)
    for p in generate(args.out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
