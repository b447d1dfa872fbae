#!/bin/bash
# Base-to-new with a meta-learned init, as upstream scripts/<method>/base2new_{train,test}.sh.
# usage: bash base2new.sh DATASET SEED TRAINER CFG INIT
#   bash base2new.sh caltech101 1 IVLP vit_b16_c2_ep5_batch4_2+2ctx_gram inits/IVLP_imagenet_gram/init.safetensors
DATA=${DATA:-/path/to/datasets}
DATASET=$1
SEED=$2
TRAINER=$3
CFG=$4
INIT=$5
SHOTS=16
EP=$(grep -m1 MAX_EPOCH configs/trainers/${TRAINER}/${CFG}.yaml | awk '{print $2}')
TRAIN_DIR=output/base2new/train_base/${DATASET}/shots_${SHOTS}/${TRAINER}/${CFG}/seed${SEED}
TEST_DIR=output/base2new/test_new/${DATASET}/shots_${SHOTS}/${TRAINER}/${CFG}/seed${SEED}
python train.py --root ${DATA} --seed ${SEED} --trainer ${TRAINER} \
    --dataset-config-file configs/datasets/${DATASET}.yaml \
    --config-file configs/trainers/${TRAINER}/${CFG}.yaml \
    --output-dir ${TRAIN_DIR} \
    DATASET.NUM_SHOTS ${SHOTS} DATASET.SUBSAMPLE_CLASSES base GRAM.INIT ${INIT}
python train.py --root ${DATA} --seed ${SEED} --trainer ${TRAINER} \
    --dataset-config-file configs/datasets/${DATASET}.yaml \
    --config-file configs/trainers/${TRAINER}/${CFG}.yaml \
    --output-dir ${TEST_DIR} --model-dir ${TRAIN_DIR} --load-epoch ${EP} --eval-only \
    DATASET.NUM_SHOTS ${SHOTS} DATASET.SUBSAMPLE_CLASSES new GRAM.ENABLED False
