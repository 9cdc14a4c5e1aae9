#!/usr/bin/env bash
# One short check on a machine with a real GPU and no package registries. Built elsewhere
# and carried in devrun/devrun.tar.xz (scripts/device-pack.sh makes it): the pals binary,
# the Vulkan loader, and the GPU test binaries, or all-MiniLM-L6-v2 stored as F16 (to fit
# the carry limit) and five GLUE tasks.
# It finds NVIDIA's Vulkan driver, runs the GPU tests, `pals bench`, a real multi-task
# PALs run, and PyTorch on the same card as the yardstick. Results land in $OUT.
# A session gets about 15 device minutes and 10 a command: PHASES picks what runs, in this
# order (default all): speed (pals bench and the step ratios against PyTorch, what issue
# 8 measures), tests (every carried GPU test binary, 120 s each), train (a real GLUE run).
# e.g. `PHASES=speed scripts/device-check.sh`, then `PHASES="tests train"` in a second call.
set -u
PHASES="${PHASES:-speed tests train}"
phase() { case " $PHASES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
cd "$(dirname "$0")/.."
[ -f devrun/devrun.tar.xz ] && tar xJf devrun/devrun.tar.xz
OUT="${OUT:-/tmp/pals-out}"
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/devrun${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PALS_CACHE_DIR="$OUT/pals-cache" XDG_RUNTIME_DIR=/tmp
nvidia-smi -L
ls /usr/share/vulkan/icd.d /etc/vulkan/icd.d 2>&1
# In containers libGLX_nvidia's Vulkan entry often fails ("Could not get vkCreateInstance");
# the same driver answers through libEGL_nvidia, headless. Point the loader there if needed.
if ! devrun/pals devices 2>/dev/null | grep -qi nvidia; then
  printf '{"file_format_version":"1.0.1","ICD":{"library_path":"libEGL_nvidia.so.0","api_version":"1.4.312"}}' \
    > /tmp/nvidia_egl_icd.json
  export VK_DRIVER_FILES=/tmp/nvidia_egl_icd.json VK_ICD_FILENAMES=/tmp/nvidia_egl_icd.json
fi
devrun/pals devices
devrun/pals devices | grep -qi nvidia || { echo "no NVIDIA Vulkan adapter"; exit 1; }
if phase speed; then
  timeout 120 devrun/pals bench
  # pals bench --train beside PyTorch's same step on this card: one ratio line each.
  for size in minilm base; do
    PALS=devrun/pals STEPS=5 timeout 300 scripts/step-ratio.sh $size 32 128 cuda fp32
  done
  PALS=devrun/pals STEPS=5 timeout 300 scripts/step-ratio.sh base 32 128 cuda amp
  timeout 120 python3 scripts/torch_bench.py
fi
if phase tests; then
  for test in devrun/tests/*; do
    echo "== $test: $(timeout 120 "$test" 2>&1 | grep -E '^test result|FAILED|panicked' | tr '\n' ' ')"
  done
fi
if phase train && [ -d devrun/glue ] && [ -d devrun/minilm-f16 ]; then
  time timeout "${TRAIN_SECONDS:-240}" devrun/pals train --model devrun/minilm-f16 --glue-dir devrun/glue \
    --tasks rte,mrpc,sts-b,cola,sst-2 --output /tmp/glue-run ${TRAIN_ARGS:---epochs 3 --steps-per-epoch 500 --lr 5e-5}
  cp /tmp/glue-run/metrics.jsonl /tmp/glue-run/training.svg "$OUT/" 2>/dev/null
  timeout 60 devrun/pals eval --checkpoint /tmp/glue-run --glue-dir devrun/glue
fi
