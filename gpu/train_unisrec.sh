#!/usr/bin/env bash
# UniSRec on a CUDA box: multi-domain pre-training (Scientific + Office14) for $PT_EPOCHS epochs, then
# fine-tuning on Scientific in text+ID and text-only modes. Brings back weights without the frozen
# text table (gpu/restore_teacher.py recomputes it offline). Used for docs/teachers.md:
#   PT_EPOCHS=4 CKD_DATA_DIR=... OUT=... bash gpu/train_unisrec.sh
set -e; PT_EPOCHS=${PT_EPOCHS:-4}
export CKD_CACHE_DIR=${CKD_CACHE_DIR:-.cache/ckd} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
D=${CKD_DATA_DIR:-../shared/data/amazon}; R=${RUNS:-/tmp/unisrec_gpu}; OUT=${OUT:-$R/out}; mkdir -p "$OUT"
C="--data-dir $D --set train.device=cuda --set train.threads=0 --set train.progress=false --set train.eval_batch_size=4096"
nvidia-smi -L
# pre-training on the text domains carried here (Scientific + Office14; Games' embeddings not carried)
ckd-train-teacher --config configs/teachers/unisrec_pretrain.yaml $C --run-dir $R/pretrain \
  --set data.domains=[Scientific,Office14] --set train.stages.pretrain.max_train_rows={} --set train.epochs=$PT_EPOCHS 2>&1 | grep -v Loading
for m in textid text; do
ckd-train-teacher --config configs/teachers/unisrec_$m.yaml $C --run-dir $R/$m \
  --set train.stages.finetune.init_from=$R/pretrain/best 2>&1 | grep -v Loading
mkdir -p $OUT/$m
python3 -c "
import sys; from safetensors.torch import load_file, save_file
s = load_file(sys.argv[1]); s.pop('text_emb'); save_file(s, sys.argv[2])" $R/$m/best/model.safetensors $OUT/$m/weights_no_text.safetensors
cp $R/$m/best/config.json $OUT/$m/config.json; cp $R/$m/metrics.json $OUT/$m/metrics.json
done
cp $R/textid/train.log $OUT/train_textid.log
