#!/usr/bin/env bash
# The real upstream trainers for the integration tests (tests/test_dassl_integration*.py).
#
# Unpacks the snapshots in ../shared/upstream (Dassl.pytorch, CoOp, multimodal-prompt-learning,
# PromptSRC; GRAM_UPSTREAM_SNAPSHOTS overrides the folder) into a cache folder outside the repo,
# installs Dassl into this python the way examples/coop_fork/README.md tells users to (torch pinned
# by constraints.txt in the same command), and prints the GRAM_*_ROOT exports for the tests:
#
#   eval "$(bash .ci/upstream.sh)" && python3 -m pytest -m integration -rA
#
# Without the snapshots it prints nothing and the integration tests skip with a reason.
# PYTHON picks the interpreter (default python3); GRAM_UPSTREAM_CACHE the cache folder.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
snapshots=${GRAM_UPSTREAM_SNAPSHOTS:-$repo/../shared/upstream}
if [ ! -d "$snapshots" ]; then
  echo "upstream.sh: no snapshots at $snapshots; the integration tests will skip" >&2
  exit 0
fi
cache=${GRAM_UPSTREAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gram-plugin-tests/upstream}
python=${PYTHON:-python3}

# one folder per snapshot content, so a changed archive is unpacked afresh
unpack() {
  local tar=$snapshots/$1.tar
  [ -f "$tar" ] || { echo "upstream.sh: $tar is missing" >&2; exit 1; }
  local dest
  dest=$cache/$1-$(sha256sum "$tar" | cut -c1-12)
  if [ ! -f "$dest/.unpacked" ]; then
    rm -rf "$dest" && mkdir -p "$dest" && tar -xf "$tar" -C "$dest" && touch "$dest/.unpacked"
  fi
  [ -d "$dest/$1" ] || { echo "upstream.sh: $tar did not unpack to a folder $1" >&2; exit 1; }
  echo "$dest/$1"
}
dassl=$(unpack Dassl.pytorch)
coop=$(unpack CoOp)
mpl=$(unpack multimodal-prompt-learning)
promptsrc=$(unpack PromptSRC)

# What Dassl's and the repositories' code imports (Dassl's requirements.txt minus its pinned
# linters; numpy first: Dassl's setup.py imports it, hence --no-build-isolation), then Dassl itself
# without its requirements. pip's output goes to stderr: stdout carries only the exports.
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$python" -m pip install -q -c "$repo/constraints.txt" torch numpy yacs gdown tabulate future \
  "wilds==1.2.2" tensorboard ftfy regex scipy scikit-learn tqdm >&2
# --use-pep517: pip 23.0 would run setup.py develop, which setuptools 84 hands back to pip with build isolation
"$python" -m pip install -q -c "$repo/constraints.txt" --no-build-isolation --use-pep517 --no-deps -e "$dassl" >&2
OUTDATED_IGNORE=1 "$python" -c "import dassl.engine, dassl.data" >&2 \
  || { echo "upstream.sh: Dassl installed but does not import" >&2; exit 1; }

printf 'export GRAM_COOP_ROOT=%q\nexport GRAM_MPL_ROOT=%q\nexport GRAM_PROMPTSRC_ROOT=%q\n' "$coop" "$mpl" "$promptsrc"
# wilds (a Dassl dependency) asks PyPI for a newer version of itself on import
echo "export OUTDATED_IGNORE=1"
