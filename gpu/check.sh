#!/usr/bin/env bash
# Proves the GPU paths on a CUDA machine in a few minutes (the same code as on CPU, another device):
#  1. a teacher placed on CUDA behind the real gRPC server, scored through the TeacherPool client;
#  2. the student trained under torchrun/accelerate with the NCCL backend (world size = GPUs here);
#  3. the student trained under accelerate + DeepSpeed ZeRO-2 on CUDA.
# Usage: CKD_DATA_DIR=... bash gpu/check.sh [OUT_DIR]
set -uo pipefail
OUT_DIR=${1:-${OUT:-/tmp/ckd_gpu_check}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
echo "== GPUs: $NGPU"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, grpc, google.protobuf, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| grpc', grpc.__version__, '| protobuf', google.protobuf.__version__, '| accelerate', accelerate.__version__)"
COMMON=(--teachers none --set data.domains=Scientific --set train.progress=false --set train.batch_size=256)
status=0
echo "== 1. teacher on CUDA behind gRPC"
python -m gpu.smoke --out "$OUT_DIR/teacher_cuda.json" ${TEACHER_CKPT:+--checkpoint "$TEACHER_CKPT"} || status=1
echo "== 2. student, NCCL process group ($NGPU process(es))"
torchrun --standalone --nproc_per_node "$NGPU" -m launch.distill --run-dir "$OUT_DIR/nccl" "${COMMON[@]}" \
  --set train.epochs=${EPOCHS:-3} 2>&1 | grep -vE "Warning|warn" | tail -12 || status=1
grep -h . "$OUT_DIR"/nccl/ranks/*.json || status=1
python3 - "$OUT_DIR/nccl" <<'PY' || status=1
import json, sys, pathlib
run = pathlib.Path(sys.argv[1]); log = (run / "train.log").read_text()
print("backend line:", [l for l in log.splitlines() if "world size" in l][:1])
m = json.loads((run / "metrics.json").read_text()); print("nccl run test", m["test"]["Scientific"], "steps/s", round(m["timing"]["steps_per_s"], 1))
PY
echo "== 3. student, accelerate + DeepSpeed ZeRO-2 on CUDA ($NGPU process(es))"
python3 -m accelerate.commands.launch --use_deepspeed --zero_stage 2 --num_processes "$NGPU" --num_machines 1 \
  --mixed_precision no --dynamo_backend no -m launch.distill --run-dir "$OUT_DIR/deepspeed" "${COMMON[@]}" \
  --set train.epochs=2 2>&1 | grep -vE "Warning|warn" | tail -8 || status=1
grep -h . "$OUT_DIR"/deepspeed/ranks/*.json || status=1
echo "== GPU CHECK $([ $status = 0 ] && echo PASSED || echo FAILED)"
exit $status
