#!/bin/bash
# Base-to-new in one call: base2new_train.sh, then base2new_test.sh, with the same arguments.
# usage: DATA=/path/to/datasets bash scripts/gram/base2new.sh DATASET SEED TRAINER CFG [KEY VALUE ...]
#   bash scripts/gram/base2new.sh caltech101 1 IVLP vit_b16_c2_ep5_batch4_2+2ctx_gram
# Then compare two configurations over the seeds you ran (gram-plugin compare -h):
#   gram-plugin compare output/base2new/train_base/caltech101/shots_16/IVLP/vit_b16_c2_ep5_batch4_2+2ctx \
#                       output/base2new/train_base/caltech101/shots_16/IVLP/vit_b16_c2_ep5_batch4_2+2ctx_gram
set -eu
HERE=$(dirname "$0")
bash "$HERE/base2new_train.sh" "$@"
bash "$HERE/base2new_test.sh" "$@"
