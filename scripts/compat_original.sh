#!/bin/bash
# The original contract, side by side with the original service: one command.
#
#   SEED_SERVER=../shared/bench/seed_server.py [FACES_DIR=../shared/faces] scripts/compat_original.sh
#
# Runs the original (seed_server.py: FastAPI + insightface 2.1 + pymongo) and facerec on one
# SecantusDB (MongoDB wire protocol), sends both the same requests and compares statuses, bodies
# (similarities within 1e-3), logs.txt, /metadata, crop files and MongoDB documents
# (scripts/compat_original.py says how). Exit status 0 when nothing but the README's documented
# differences differs. The first run installs the original's stack and SecantusDB into
# $CACHE (target/compat) with pip; facerec is the binary in FACEREC_BIN (default target/release,
# else target/debug: build it first), its models fetched by `facerec fetch`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CACHE=${CACHE:-$PWD/target/compat}
mkdir -p "$CACHE"
: "${SEED_SERVER:?set SEED_SERVER to the original service, seed_server.py}"
[[ -f $SEED_SERVER ]] || { echo "no such file: $SEED_SERVER" >&2; exit 2; }
BIN=${FACEREC_BIN:-}
if [[ -z $BIN ]]; then
  for b in target/release/facerec target/debug/facerec; do [[ -x $b ]] && { BIN=$PWD/$b; break; }; done
fi
[[ -n $BIN && -x $BIN ]] || { echo "no facerec binary: cargo build first (or set FACEREC_BIN)" >&2; exit 2; }
MODELS=${MODEL_CACHE_DIR:-$PWD/models}
MODEL_CACHE_DIR=$MODELS "$BIN" fetch >/dev/null || { echo "facerec fetch failed" >&2; exit 2; }
if [[ ! -x $CACHE/ref/bin/uvicorn ]]; then
  echo "installing the original's stack into $CACHE/ref ..."
  python3 -m venv "$CACHE/ref"
  "$CACHE/ref/bin/pip" install -q insightface==2.1 onnxruntime==1.31.1 fastapi uvicorn python-multipart \
    opencv-python-headless pymongo requests
fi
if [[ ! -x $CACHE/sdb/bin/secantusd-py ]]; then
  echo "installing SecantusDB into $CACHE/sdb ..."
  python3 -m venv "$CACHE/sdb"
  "$CACHE/sdb/bin/pip" install -q SecantusDB==0.7.0b3 pymongo
fi
SEED_SERVER=$(realpath "$SEED_SERVER") FACEREC_BIN=$BIN PACK=$MODELS/buffalo_sc SECANTUSD=$CACHE/sdb/bin/secantusd-py \
  WORK=$CACHE/run exec "$CACHE/ref/bin/python" scripts/compat_original.py
