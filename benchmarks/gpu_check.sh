#!/usr/bin/env bash
# The prepared GPU check (issue 17): set up offline, then run benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh --fetch-wheels   # on a machine with PyPI: the pure-Python wheels a bare
#                                                 # GPU box lacks (open_clip, ftfy, wcwidth, higher, yacs;
#                                                 # 1.7 MB) into .whl/ (git-ignored)
#   bash benchmarks/gpu_check.sh [gpu_check.py args]   # on the GPU box, from any directory
#
# The README's setup is `pip install -c constraints.txt -e ".[clip,chc,proxy,dev]"`; a GPU box with
# no network cannot resolve it (and brings its own torch), so this installs only the carried wheels of
# what is missing there and runs the project from the checkout.
# Everything is bounded by timeouts: the whole script ends within ~9 minutes.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS="open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0 higher==0.2.1 yacs==0.1.8"

if [ "${1:-}" = "--fetch-wheels" ]; then
    exec $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
        --platform any -d .whl $WHEELS
fi

t0=$(date +%s)
missing=$($PY - <<'EOF'
import importlib.util
print(" ".join(m for m in ("open_clip", "ftfy", "higher", "yacs") if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "setup: missing $missing"
    if ls .whl/*.whl >/dev/null 2>&1; then
        timeout 120 $PY -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check .whl/*.whl \
            || echo "setup: installing .whl/*.whl failed"
    else
        echo "setup: no .whl/ folder: parts needing $missing will FAIL (run --fetch-wheels where PyPI is reachable, carry .whl)"
    fi
fi
# The project itself is imported from this checkout (gpu_check.py maps adapters/ to gram_plugin.adapters):
# an editable install cannot be built offline there (setuptools' develop fallback fetches build deps).
echo "setup: $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
exec timeout 500 $PY benchmarks/gpu_check.py "$@"
