#!/usr/bin/env bash
# Benchmark: RTN vs GPTQ vs QAD (+ norm fusion) on a trained model, the 135M default teacher itself.
#
# The demo students of bench/quant_ablation.py are too little trained for quantization to hurt them;
# the teacher (SmolLM2-135M-Instruct) is a real LM. QAD's teacher is then the unquantized model itself
# (the paper's first option): its own stored top-k logits over the corpus.
#
# Inputs: the work directory of bench/quant_ablation.py (its data/, logits-train/, logits-val/:
# the demo corpus at seq-len 256 and the teacher's top-64 over its train and val splits).
#
#   bash bench/qad_teacher.sh [ABLATION_WORK=/tmp/famex-ablation] [OUT=/tmp/famex-qad-teacher] [FORMATS="int3"]
#
# Every step is a famex stage (reruns skip what is complete). Prints one Markdown table: validation
# loss (next-token CE on the val split, same chunks for every model) and its increase over BF16.
set -euo pipefail
WORK=${1:-/tmp/famex-ablation}
OUT=${2:-/tmp/famex-qad-teacher}
FORMATS=${3:-int3}
QAD_ITERS=${QAD_ITERS:-20}
QAD_LR=${QAD_LR:-2e-5}
FAMEX=${FAMEX:-.venv/bin/famex}
export FAMEX_QUIET=1
D=$WORK/data
mkdir -p "$OUT"

"$FAMEX" eval --model default --data "$D" --out "$OUT/eval-bf16"
for fmt in $FORMATS; do
  "$FAMEX" quantize --model default --format "$fmt" --method rtn --norm-fusion --out "$OUT/$fmt-rtn-nf"
  "$FAMEX" quantize --model default --format "$fmt" --method gptq --norm-fusion --calib "$D" --calib-tokens 16384 \
    --out "$OUT/$fmt-gptq-nf"
  "$FAMEX" quantize --model default --format "$fmt" --method qad --norm-fusion --init rtn --data "$D" \
    --logits "$WORK/logits-train" --val-logits "$WORK/logits-val" --iters "$QAD_ITERS" --global-batch 4 \
    --micro-batch 2 --lr "$QAD_LR" --eval-every 0 --save-every 10 --out "$OUT/$fmt-qad-nf"
  for m in rtn-nf gptq-nf qad-nf; do
    "$FAMEX" eval --model "$OUT/$fmt-$m" --data "$D" --reference "$OUT/eval-bf16" --out "$OUT/eval-$fmt-$m"
  done
done

.venv/bin/python - "$OUT" "$FORMATS" <<'EOF'
import json, sys
from pathlib import Path
out, formats = Path(sys.argv[1]), sys.argv[2].split()
bf16 = json.loads((out / "eval-bf16" / "metrics.json").read_text())["val_loss"]
print(f"BF16 val loss {bf16:.4f}\n")
print("| format | RTN + NF | GPTQ + NF | QAD + NF (from RTN) |")
print("|---|---:|---:|---:|")
for fmt in formats:
    cells = []
    for m in ("rtn-nf", "gptq-nf", "qad-nf"):
        v = json.loads((out / f"eval-{fmt}-{m}" / "metrics.json").read_text())["val_loss"]
        cells.append(f"{v:.4f} (+{v - bf16:.4f})")
    print(f"| {fmt} | " + " | ".join(cells) + " |")
EOF
