#!/bin/bash
# Meta-train a method's prompts through its own trainer on the base classes of a dataset
# into the run folder inits/NAME (the init: inits/NAME/init.safetensors; checkpoints: inits/NAME/meta)
# (run from the fork's root; gram-plugin meta-train -h lists every option).
# usage: bash meta_train.sh DATASET TRAINER CFG [gram|maml]
#   bash meta_train.sh imagenet IVLP vit_b16_c2_ep5_batch4_2+2ctx_gram                   # UNIGRAM
#   bash meta_train.sh imagenet PromptSRC vit_b16_c2_ep20_batch4_4+4ctx_gram maml           # MP-PromptSRC
#   bash meta_train.sh imagenet VPT vit_b16_c2_ep5_batch4_4_gram                         # GRAM-VPT
DATA=${DATA:-/path/to/datasets}
DATASET=$1
TRAINER=$2
CFG=$3
METHOD=${4:-gram}
SUFFIX=_gram
[ "${METHOD}" = maml ] && SUFFIX=
NAME=${TRAINER}_${DATASET}${SUFFIX}
mkdir -p inits
gram-plugin meta-train --dassl-config configs/trainers/${TRAINER}/${CFG}.yaml \
    --dataset-config configs/datasets/${DATASET}.yaml --trainer ${TRAINER} --root ${DATA} \
    --out inits/${NAME} --method ${METHOD}
