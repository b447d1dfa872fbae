#!/bin/bash
# Meta-train a method's prompts on the base classes of a dataset (run from the fork's root).
# usage: bash meta_train.sh DATASET TRAINER CFG [--regulator]
#   bash meta_train.sh imagenet IVLP vit_b16_c2_ep5_batch4_2+2ctx_gram --regulator     # UNIGRAM
#   bash meta_train.sh imagenet PromptSRC vit_b16_c2_ep20_batch4_4+4ctx_gram          # MP-PromptSRC
#   bash meta_train.sh imagenet VPT vit_b16_c2_ep5_batch4_4_gram --regulator           # GRAM-VPT
DATA=${DATA:-/path/to/datasets}
DATASET=$1
TRAINER=$2
CFG=$3
REG=$4
mkdir -p inits
python meta_train.py --root ${DATA} --trainer ${TRAINER} \
    --dataset-config-file configs/datasets/${DATASET}.yaml \
    --config-file configs/trainers/${TRAINER}/${CFG}.yaml \
    --out inits/${TRAINER}_${DATASET}${REG:+_gram}.safetensors \
    --run-dir output/meta/${TRAINER}_${DATASET}${REG:+_gram} ${REG}
