#!/bin/bash
# Meta-train a method's prompts through its own trainer on the base classes of a dataset, into the run
# folder inits/<TRAINER>_<DATASET>_gram/ (inits/<TRAINER>_<DATASET>/ with --method maml); its
# init.safetensors is the file the example configs' GRAM.INIT names. Run from the fork's root.
# usage: DATA=/path/to/datasets bash scripts/gram/meta_train.sh DATASET TRAINER CFG [meta-train options] [KEY VALUE ...]
#   bash scripts/gram/meta_train.sh imagenet IVLP vit_b16_c2_ep5_batch4_2+2ctx_gram                # UNIGRAM
#   bash scripts/gram/meta_train.sh imagenet VPT vit_b16_c2_ep5_batch4_4_gram --meta-steps 100    # GRAM-VPT
#   bash scripts/gram/meta_train.sh imagenet MaPLe vit_b16_c2_ep5_batch4_2ctx_gram --method maml  # MP-MaPLe
# Options (gram-plugin meta-train -h lists them) come first, then KEY VALUE config options.
set -eu
if [ $# -lt 3 ]; then sed -n '2,9p' "$0" >&2; exit 2; fi
: "${DATA:?set DATA to the datasets folder (DATASET.ROOT), e.g. DATA=/data/datasets bash $0 ...}"
DATASET=$1 TRAINER=$2 CFG=$3
shift 3
SUFFIX=_gram
PREVIOUS=
for a in "$@"; do
    if [ "$PREVIOUS" = --method ] || [ "${a%%=*}" = --method ]; then [ "${a#--method=}" = maml ] && SUFFIX=; fi
    PREVIOUS=$a
done
gram-plugin meta-train --dassl-config "configs/trainers/${TRAINER}/${CFG}.yaml" \
    --dataset-config "configs/datasets/${DATASET}.yaml" --trainer "${TRAINER}" --root "${DATA}" \
    --out "inits/${TRAINER}_${DATASET}${SUFFIX}" "$@"
