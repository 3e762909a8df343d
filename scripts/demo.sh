#!/usr/bin/env bash
# make demo: align the embedded model once (cached in runs/align), then fine-tune it with
# SFT and with SAP on the same data, seed and budget, through the DeepSpeed launcher.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
NPROC=${NPROC:-2}
export PATH="$VENV/bin:$PATH" DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
launch() { deepspeed --num_gpus "$NPROC" --master_port "$(free_port)" sap_ds/train.py "$@"; }

start=$(date +%s)
if [ -f runs/align/export/model/model.safetensors ]; then
    echo "== alignment stage: using runs/align/export/model (delete runs/align to redo it)"
else
    echo "== alignment stage: teach the embedded model to refuse harmful requests (configs/align.yaml)"
    launch --config configs/align.yaml
fi
rm -rf runs/demo/sft runs/demo/sap  # the demo's own previous output
echo "== fine-tuning with SFT (configs/demo.yaml)"
launch --config configs/demo.yaml output_dir=runs/demo/sft
echo "== fine-tuning with SAP (configs/demo.yaml method=sap)"
launch --config configs/demo.yaml method=sap output_dir=runs/demo/sap
python -m sap_ds.report runs/demo/sft runs/demo/sap
echo "demo wall time: $(( $(date +%s) - start )) s"
