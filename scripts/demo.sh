#!/usr/bin/env bash
# From a bare machine to `pals demo`: install what is missing (see scripts/setup.sh), build
# the release binary, run the demo. Arguments go to `pals demo` (e.g. --epochs 1).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh release
target/release/pals demo "$@"
