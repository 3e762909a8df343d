#!/usr/bin/env bash
# make demo: align the embedded model once (cached in runs/align; 2 ranks through the
# DeepSpeed launcher), then fine-tune it with SFT, SFT at the learning rate of SAP's task
# loss, and SAP's recommended preset on the same data, seed and budget (one rank each,
# $NPROC at a time: faster on CPU than one run on $NPROC ranks, docs/results.md).
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
rm -rf runs/demo  # the demo's own previous output
echo "== SFT vs SAP: fine-tune from the aligned model (SFT, SFT at lr 6e-4, SAP), evaluate all four (configs/compare_demo.yaml)"
# $NPROC runs at once, one rank and one thread each (compare sets OMP_NUM_THREADS=1 for them),
# each evaluated in a process of its own as soon as it finishes.
OMP_NUM_THREADS="$NPROC" python -m sap_ds.experiments.compare --config configs/compare_demo.yaml parallel="$NPROC"
echo "== training cost per phase"
python -m sap_ds.experiments.report runs/demo/poisoned/sft/seed42 runs/demo/poisoned/sft_lr6e-4/seed42 runs/demo/poisoned/sap/seed42
echo "demo wall time: $(( $(date +%s) - start )) s"
