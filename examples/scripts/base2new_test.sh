#!/bin/bash
# Base-to-new, step 2: evaluate the base-trained prompts on the NEW classes (as upstream CoOp's
# scripts/cocoop/base2new_test.sh). It loads the model base2new_train.sh wrote for the same DATASET
# SEED TRAINER CFG at its last epoch: OPTIM.MAX_EPOCH from the KEY VALUE options, else the config's.
# usage: DATA=/path/to/datasets bash scripts/gram/base2new_test.sh DATASET SEED TRAINER CFG [KEY VALUE ...]
#   bash scripts/gram/base2new_test.sh caltech101 1 CoOp vit_b16_ctxv1_gram
# Give it the KEY VALUE options the training run had (INPUT.SIZE, GRAM.CLIP_WEIGHTS, ...). The trained
# prompts come from the checkpoint, so the init is not applied again (GRAM.ENABLED False).
set -eu
source "$(dirname "$0")/common.sh"
LOADEP=$(opt OPTIM.MAX_EPOCH "$(awk '$1 == "MAX_EPOCH:" {print $2; exit}' "$CONFIG" 2>/dev/null)")
if [ -z "$LOADEP" ]; then echo "no MAX_EPOCH in $CONFIG: pass OPTIM.MAX_EPOCH N (the epochs it was trained for)" >&2; exit 2; fi
COMMON_DIR=${DATASET}/shots_${SHOTS}/${TRAINER}/${CFG}/seed${SEED}
OPTS+=(GRAM.ENABLED False)
train_py "output/base2new/test_new/${COMMON_DIR}" new \
    --model-dir "output/base2new/train_base/${COMMON_DIR}" --load-epoch "${LOADEP}" --eval-only
