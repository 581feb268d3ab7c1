#!/usr/bin/env bash
# Bit-identity of two commits on one machine: record every golden case with each commit's src/ and compare the
# files byte for byte.   bash tests/golden/compare_commits.sh OLD NEW   (NEW defaults to the working tree)
set -euo pipefail
cd "$(dirname "$0")/../.."
OLD=$1; NEW=${2:-}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
record() {  # $1 = commit ('' = working tree), $2 = output folder
    local src=$PWD/src
    if [ -n "$1" ]; then mkdir -p "$WORK/src-$1"; git archive "$1" src | tar -x -C "$WORK/src-$1"; src=$WORK/src-$1/src; fi
    PYTHONPATH=$src .venv/bin/python tests/golden/record.py --out "$2" > /dev/null 2>&1
}
record "$OLD" "$WORK/old"
record "$NEW" "$WORK/new"
status=0
for f in $(cd "$WORK/old" && find . -type f | sort); do
    if cmp -s "$WORK/old/$f" "$WORK/new/$f"; then echo "identical  $f"; else echo "DIFFERENT  $f"; status=1; fi
done
echo "old=$(git rev-parse --short "$OLD") new=${NEW:-working tree} $([ $status = 0 ] && echo bit-identical || echo differ)"
exit $status
