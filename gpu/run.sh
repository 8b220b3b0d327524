#!/usr/bin/env bash
# Runs on the GPU machine, in the repo root, with .whl/ carried along (gpu/fetch_wheels.sh made it).
#   bash gpu/run.sh cases  OUT [harness options]   the e2e cases on CUDA -> OUT/results-cuda/*.json
#   bash gpu/run.sh bench  OUT [bench options]     the side-by-side benchmark -> OUT/bench.json (+ BENCH.md)
#   bash gpu/run.sh depth  OUT [--only a,b]        the full-depth benchmark -> OUT/BENCH-depth.md (+ JSON)
set -euo pipefail
what=$1; out=$2; shift 2
if [ -d .whl/tf457 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site457 .whl/tf457/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/siteextra .whl/extra/*.whl
export PYTHONPATH="$PWD:/tmp/siteextra:$PWD/.whl/site" PYTHONUNBUFFERED=1
if [ -d .whl/tf5 ]; then  # a newer transformers than the image's (gpu/fetch_wheels.sh TF5=...), first on the path
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/sitetf5 .whl/tf5/*.whl
  export PYTHONPATH="$PWD:/tmp/sitetf5:/tmp/siteextra:$PWD/.whl/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__)" | tee -a "$out/gpu.txt"
case "$what" in
  cases) python3 -m harness run-cell --python python3 --results "$out/results-cuda" --work /tmp/e2e -- --device cuda "$@" ;;
  bench) python3 -m harness bench --device cuda --interp tf5=python3 \
           --interp "tf457=env PYTHONPATH=$PWD:/tmp/site457:/tmp/siteextra:$PWD/.whl/site python3" \
           --work /tmp/bench --out "$out/BENCH.md" --json "$out/bench.json" "$@" ;;
  depth) mkdir -p /tmp/sitepeers && for w in .whl/peers/*; do python3 -m zipfile -e "$w" /tmp/sitepeers; done
         python3 -m harness bench-depth --python python3 --device cuda --full --work /tmp/depth \
           --python457 "env PYTHONPATH=$PWD:/tmp/site457:/tmp/siteextra:$PWD/.whl/site python3" \
           --python-peers "env HF_HUB_OFFLINE=1 PYTHONPATH=$PWD:/tmp/siteextra:$PWD/.whl/site:/tmp/sitepeers python3" \
           --out "$out/BENCH-depth.md" --json "$out/bench-depth.json" "$@" ;;
  *) echo "unknown action $what: use cases, bench or depth" >&2; exit 2 ;;
esac
