#!/usr/bin/env bash
# One ratio line: a pals training step against PyTorch eager's same step (same model size,
# PALs, batch, seq and AdamW: scripts/torch_train_bench.py), both measured in this run on
# this machine, one after the other.
#
#   scripts/step-ratio.sh [minilm|base|DIR] [BATCH] [SEQ] [cpu|cuda] [fp32|amp]
#
# PALS names the pals binary (default target/release/pals), PALS_ARGS adds flags to its
# bench (e.g. --adapter 1), STEPS sets the timed steps of each side (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-minilm} batch=${2:-8} seq=${3:-128} device=${4:-cpu} precision=${5:-fp32}
pals=${PALS:-target/release/pals}
steps=${STEPS:-3}
[ -x "$pals" ] || { echo "step-ratio: no pals binary at $pals (cargo build --release, or set PALS)" >&2; exit 2; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# AMP fp16 on the PyTorch side is compared with our mixed precision, fp32 with f32.
ours_precision=f32
[ "$precision" = amp ] && ours_precision=mixed
# shellcheck disable=SC2086 # PALS_ARGS is a list of flags
"$pals" bench --train "$model" --batch "$batch" --seq "$seq" --steps "$steps" --precision "$ours_precision" \
  ${PALS_ARGS:-} | tee "$out/pals"
python3 scripts/torch_bench.py --train "$model" --device "$device" --batch "$batch" --seq "$seq" \
  --precision "$precision" --steps "$steps" | tee "$out/torch"
ours=$(sed -n 's/^step time: \([0-9.]*\) ms.*/\1/p' "$out/pals")
theirs=$(sed -n 's/^torch step time: \([0-9.]*\) ms.*/\1/p' "$out/torch")
if [ -z "$ours" ] || [ -z "$theirs" ]; then
  echo "step-ratio: could not read a step time (pals '$ours', torch '$theirs')" >&2
  exit 1
fi
awk -v ours="$ours" -v theirs="$theirs" -v what="$model batch $batch x seq $seq, pals $ours_precision" \
  -v torch="torch $device $precision" \
  'BEGIN { printf "step ratio, %s: pals %.1f ms / %s %.1f ms = %.2fx\n", what, ours, torch, theirs, ours / theirs }'
