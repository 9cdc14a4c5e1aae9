#!/usr/bin/env bash
# Builds here what scripts/device-check.sh runs on a lent GPU machine (it has no package
# registries) and packs it into devrun/devrun.tar.xz, under the device tool's 64 MiB carry
# limit. Two packs, one a device call:
#   scripts/device-pack.sh            pals, the GPU test binaries in $TESTS, Debian's Vulkan
#                                     loader: for PHASES="speed tests"
#   scripts/device-pack.sh train      pals, the loader, all-MiniLM-L6-v2 stored as F16 (from
#                                     $PALS_MODEL_DIR) and five GLUE tasks (from $PALS_GLUE_DIR):
#                                     for PHASES=train
# Then, through the device tool: carry ["devrun"], command `PHASES=speed scripts/device-check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-speed}"
case "$mode" in speed|train) ;; *) echo "usage: $0 [speed|train]" >&2; exit 2 ;; esac
TESTS="${TESTS:-matmul attention layernorm bert_gpu train tasks_gpu elementwise optimizer cast reduce loss embedding bench}"
loader=/usr/lib/x86_64-linux-gnu/libvulkan.so.1
[ -e "$loader" ] || { echo "no $loader here: install libvulkan1 (scripts/setup.sh does)" >&2; exit 1; }

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/devrun/tests"
cargo build --release
cp target/release/pals "$stage/devrun/"
cp -L "$loader" "$stage/devrun/"

if [ "$mode" = speed ]; then
  args=()
  for t in $TESTS; do args+=(--test "$t"); done
  # The executables cargo built, by target name, from its own report.
  cargo test --release --no-run --message-format=json "${args[@]}" |
    python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        shutil.copy(m["executable"], sys.argv[1] + "/" + m["target"]["name"])
' "$stage/devrun/tests"
  for t in $TESTS; do
    [ -x "$stage/devrun/tests/$t" ] || { echo "test binary '$t' was not built" >&2; exit 1; }
  done
else
  model="${PALS_MODEL_DIR:-models/all-MiniLM-L6-v2}"
  glue="${PALS_GLUE_DIR:-../shared/data/glue}"
  [ -f "$model/model.safetensors" ] || { echo "no $model/model.safetensors (scripts/fetch-minilm.sh)" >&2; exit 1; }
  [ -d "$glue" ] || { echo "no GLUE directory $glue (set PALS_GLUE_DIR)" >&2; exit 1; }
  mkdir -p "$stage/devrun/minilm-f16" "$stage/devrun/glue"
  cp "$model"/config.json "$model"/tokenizer.json "$model"/vocab.txt "$stage/devrun/minilm-f16/" 2>/dev/null || true
  # F32 tensors rewritten as F16 (half the bytes); the loader widens them back.
  python3 - "$model/model.safetensors" "$stage/devrun/minilm-f16/model.safetensors" <<'PY'
import json, struct, sys
from array import array
src, dst = sys.argv[1], sys.argv[2]
with open(src, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
    data = f.read()
out, blobs, offset = {}, [], 0
for name, info in header.items():
    if name == "__metadata__":
        out[name] = info
        continue
    start, end = info["data_offsets"]
    raw = data[start:end]
    if info["dtype"] == "F32":
        values = array("f", raw)
        raw = struct.pack("<%de" % len(values), *values)
        info = dict(info, dtype="F16")
    out[name] = dict(info, data_offsets=[offset, offset + len(raw)])
    blobs.append(raw)
    offset += len(raw)
head = json.dumps(out).encode()
head += b" " * (-len(head) % 8)
with open(dst, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head)
    for raw in blobs:
        f.write(raw)
PY
  for task in RTE MRPC STS-B CoLA SST-2; do
    cp -r "$glue/$task" "$stage/devrun/glue/"
  done
fi

mkdir -p devrun
tar -C "$stage" -cJf devrun/devrun.tar.xz devrun
size=$(stat -c %s devrun/devrun.tar.xz)
echo "devrun/devrun.tar.xz: $((size / 1048576)) MiB ($mode)"
[ "$size" -lt $((60 * 1048576)) ] || { echo "over the carry limit: pack fewer TESTS" >&2; exit 1; }
