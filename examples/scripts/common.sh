# Shared by base2new_train.sh and base2new_test.sh (sourced, not run): their arguments and the train.py call.
# Sets DATASET SEED TRAINER CFG CONFIG SHOTS and OPTS (the trailing KEY VALUE options) from "$@".
if [ $# -lt 4 ] || [ $(( ($# - 4) % 2 )) -ne 0 ]; then sed -n '2,12p' "$0" >&2; exit 2; fi
: "${DATA:?set DATA to the datasets folder (DATASET.ROOT), e.g. DATA=/data/datasets bash $0 ...}"
DATASET=$1 SEED=$2 TRAINER=$3 CFG=$4
shift 4
OPTS=("$@")
CONFIG=configs/trainers/${TRAINER}/${CFG}.yaml

# the value of a KEY among the KEY VALUE options, else a default
opt() { local key=$1 value=$2 i; for ((i = 0; i + 1 < ${#OPTS[@]}; i += 2)); do [ "${OPTS[i]}" = "$key" ] && value=${OPTS[i + 1]}; done; echo "$value"; }
SHOTS=$(opt DATASET.NUM_SHOTS 16)

# train_py OUTPUT_DIR CLASSES [train.py arguments ...]: the fork's train.py on DATASET / TRAINER / CFG, with the
# script's options first and the user's KEY VALUE options after them (the last value of a key wins)
train_py() {
    local dir=$1 classes=$2
    shift 2
    if [ -d "$dir" ]; then
        echo "Oops! The results exist at ${dir} (so skip this job)"
        return 0
    fi
    python train.py --root "${DATA}" --seed "${SEED}" --trainer "${TRAINER}" \
        --dataset-config-file "configs/datasets/${DATASET}.yaml" --config-file "${CONFIG}" \
        --output-dir "${dir}" "$@" DATASET.NUM_SHOTS "${SHOTS}" DATASET.SUBSAMPLE_CLASSES "${classes}" "${OPTS[@]}"
}
