#!/bin/bash
# Evaluate a base-trained model on the NEW classes, as upstream scripts/cocoop/base2new_test.sh.
# usage: bash base2new_test.sh DATASET SEED [TRAINER] [CFG] [LOADEP]

DATA=${DATA:-/path/to/datasets}

DATASET=$1
SEED=$2
TRAINER=${3:-CoOp}
CFG=${4:-vit_b16_ctxv1_gram}
LOADEP=${5:-200}
SHOTS=16
SUB=new

COMMON_DIR=${DATASET}/shots_${SHOTS}/${TRAINER}/${CFG}/seed${SEED}
MODEL_DIR=output/base2new/train_base/${COMMON_DIR}
DIR=output/base2new/test_${SUB}/${COMMON_DIR}
if [ -d "$DIR" ]; then
    echo "Oops! The results exist at ${DIR} (so skip this job)"
else
    # GRAM.ENABLED False: the trained prompts come from the checkpoint (load_model), not from an init
    python train.py \
    --root ${DATA} \
    --seed ${SEED} \
    --trainer ${TRAINER} \
    --dataset-config-file configs/datasets/${DATASET}.yaml \
    --config-file configs/trainers/${TRAINER}/${CFG}.yaml \
    --output-dir ${DIR} \
    --model-dir ${MODEL_DIR} \
    --load-epoch ${LOADEP} \
    --eval-only \
    DATASET.NUM_SHOTS ${SHOTS} \
    DATASET.SUBSAMPLE_CLASSES ${SUB} \
    GRAM.ENABLED False
fi
