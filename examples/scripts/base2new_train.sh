#!/bin/bash
# Base-to-new, step 1: train on the BASE classes (as upstream CoOp's scripts/cocoop/base2new_train.sh).
# Run from the fork's root, with train.py patched (examples/coop_fork/README.md, step 3), these scripts
# in scripts/gram/ and the example configs in configs/trainers/.
# usage: DATA=/path/to/datasets bash scripts/gram/base2new_train.sh DATASET SEED TRAINER CFG [KEY VALUE ...]
#   bash scripts/gram/base2new_train.sh caltech101 1 CoOp vit_b16_ctxv1_gram
#   bash scripts/gram/base2new_train.sh caltech101 1 CoOp vit_b16_ctxv1_gram GRAM.INIT other.safetensors OPTIM.MAX_EPOCH 10
# KEY VALUE options go to train.py after the script's own (the last value of a key wins); give
# base2new_test.sh the same ones. Output: output/base2new/train_base/DATASET/shots_N/TRAINER/CFG/seedSEED
# (N: DATASET.NUM_SHOTS, 16 unless given); an existing output folder is skipped (delete it to run again).
set -eu
source "$(dirname "$0")/common.sh"
train_py "output/base2new/train_base/${DATASET}/shots_${SHOTS}/${TRAINER}/${CFG}/seed${SEED}" base
