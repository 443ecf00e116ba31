#!/usr/bin/env bash
# The GPU scale check (issue 29, item 7): benchmarks/scale_check.py on this machine, from the repository root, with no
# network. The Python packages it needs and this machine lacks come from a dir of wheels: a wheel is installed (pip,
# no index, no dependencies, into a private dir put first on PYTHONPATH) only where its package is missing here or
# installed at another version; everything else is what is installed.
#
#   scripts/scale-check.sh --fetch-wheels .gpu       # where there is network: scripts/scale-check-wheels.txt's wheels
#   scripts/scale-check.sh --wheels .gpu --out DIR   # on the GPU machine (~5 minutes on an H100, estimated)
#   scripts/scale-check.sh --tiny --out DIR          # the same code on the CPU, 2-layer models (under a minute)
#   scripts/scale-check.sh --out DIR -- --parts train --steps 10     # after --: benchmarks/scale_check.py's options
#
# Writes DIR/scale-check.json (rewritten after each part, so a run cut short keeps what it measured) and
# DIR/scale-check.log; `make docs-numbers DOCS_RUNS="--scale DIR/scale-check.json"` writes the docs' block from it.
# Exit status: scale_check.py's (2 for a usage error here).
set -euo pipefail
cd "$(dirname "$0")/.."

# the checkout's venv (make test / make demo create it) where there is one, else the python3 on PATH
DEFAULT_PYTHON=python3
[ -x .venv/bin/python ] && DEFAULT_PYTHON=.venv/bin/python
PYTHON=${PYTHON:-$DEFAULT_PYTHON}
OUT=scale-check
WHEELS=""
FETCH=""
SITE=${SCALE_CHECK_SITE:-/tmp/knowstack-scale-site}
ARGS=()

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --fetch-wheels) FETCH=$2; shift 2 ;;
    --site) SITE=$2; shift 2 ;;
    --tiny) ARGS+=(--tiny); shift ;;
    --) shift; ARGS+=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "scale-check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

if [ -n "$FETCH" ]; then
  # The GPU machine's Python (3.12) and platform, whatever this machine's are
  mkdir -p "$FETCH"
  grep -v '^#' scripts/scale-check-wheels.txt | grep . > "$FETCH/.requirements.txt"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$FETCH" -r "$FETCH/.requirements.txt"
  rm -f "$FETCH/.requirements.txt"
  echo "wheels in $FETCH: $(ls "$FETCH"/*.whl | wc -l) files, $(du -sh "$FETCH" | cut -f1)"
  exit 0
fi

if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || { echo "scale-check.sh: no wheel dir '$WHEELS'" >&2; exit 2; }
  # A wheel's file name is NAME-VERSION-...; install it where NAME is missing or at another VERSION
  mapfile -t INSTALL < <("$PYTHON" - "$WHEELS" <<'EOF'
import sys
from importlib import metadata
from pathlib import Path

for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        installed = None
    if installed != version:
        print(wheel)
        print(f"  {name} {version} (here: {installed or 'missing'})", file=sys.stderr)
EOF
  )
  if [ ${#INSTALL[@]} -gt 0 ]; then
    echo "installing ${#INSTALL[@]} wheels from $WHEELS into $SITE"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${INSTALL[@]}"
  else
    echo "every wheel in $WHEELS is installed here at its version"
  fi
  export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi

# No progress bars in a log; nothing from a hub (everything is built here)
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
"$PYTHON" benchmarks/scale_check.py --json "$OUT/scale-check.json" ${ARGS[@]+"${ARGS[@]}"} 2>&1 \
  | tee "$OUT/scale-check.log"
