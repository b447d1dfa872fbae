#!/bin/bash
# Base-to-new training with GRAM, as upstream scripts/cocoop/base2new_train.sh.
# Run from the root of your CoOp fork (train.py patched as in examples/coop_fork/README.md),
# with this folder's configs copied to configs/trainers/.
# usage: bash base2new_train.sh DATASET SEED [TRAINER] [CFG] [INIT]
#   bash base2new_train.sh caltech101 1 CoOp vit_b16_ctxv1_gram inits/coop_vit_b16_nctx4/init.safetensors
#   bash base2new_train.sh caltech101 1 CoCoOp vit_b16_c4_ep10_batch1_ctxv1_gram
#   bash base2new_train.sh caltech101 1 CoOp vit_b16_ctxv1_prograd

# custom config
DATA=${DATA:-/path/to/datasets}

DATASET=$1
SEED=$2
TRAINER=${3:-CoOp}
CFG=${4:-vit_b16_ctxv1_gram}
INIT=$5
SHOTS=16

EXTRA=()
if [ -n "${INIT}" ]; then
    EXTRA+=(GRAM.INIT "${INIT}")
fi

DIR=output/base2new/train_base/${DATASET}/shots_${SHOTS}/${TRAINER}/${CFG}/seed${SEED}
if [ -d "$DIR" ]; then
    echo "Oops! The results exist at ${DIR} (so skip this job)"
else
    python train.py \
    --root ${DATA} \
    --seed ${SEED} \
    --trainer ${TRAINER} \
    --dataset-config-file configs/datasets/${DATASET}.yaml \
    --config-file configs/trainers/${TRAINER}/${CFG}.yaml \
    --output-dir ${DIR} \
    DATASET.NUM_SHOTS ${SHOTS} \
    DATASET.SUBSAMPLE_CLASSES base \
    "${EXTRA[@]}"
fi
