#!/bin/sh
# Malicious participants, measured (docs/reliability.md): one of 8 SST-2 clients (client 0) attacks — update x10,
# sign flip, Gaussian noise of the update's shape and norm, or honest training on flipped labels — against FedAvg's
# mean, the coordinate-wise median, the trimmed mean (one client trimmed per end) and a norm bound; FedIT and
# FFA-LoRA, IID and Dirichlet(0.5) clients, seeds 1-3, examples/attack_sst2.toml (about 2 CPU-minutes a cell).
# Re-running resumes: finished cells are kept.  `python examples/attack_study_table.py` tabulates what finished.
#   sh examples/attack_study.sh [OUT=runs/attack-study]
set -e
OUT=${1:-runs/attack-study}
JOBS=${JOBS:-2}
SEEDS=${SEEDS:-3}
NORM_BOUND=${NORM_BOUND:-8}  # about the median honest update norm of round 1 (docs/reliability.md)
# cells finished before are kept in the repository (docs/data/attack_study/cells, as <folder>__<cell>): start from them
for d in docs/data/attack_study/cells/*/; do
    [ -d "$d" ] || continue
    name=$(basename "$d"); folder=${name%%__*}; cell=${name#*__}
    [ -e "$OUT/$folder/cells/$cell" ] || { mkdir -p "$OUT/$folder/cells"; cp -r "$d" "$OUT/$folder/cells/$cell"; }
done
# seed by seed, so that an interrupted study holds complete attack x defence tables for the seeds it finished
for SEED in $(seq 1 "$SEEDS"); do
  for PART in dirichlet iid; do
    fedlora compare --config examples/attack_sst2.toml --methods fedit,ffa --seeds 1 --set seed="$SEED" \
        --set 'attack.clients=[0]' --set clients.partition=$PART --set robust.trim_fraction=0.125 \
        --grid "attack.kind=none,scale,sign_flip,gaussian,label_flip" \
        --grid "robust.aggregation=mean,median,trimmed_mean" --out "$OUT/$PART" --jobs "$JOBS" --quiet
    fedlora compare --config examples/attack_sst2.toml --methods fedit,ffa --seeds 1 --set seed="$SEED" \
        --set 'attack.clients=[0]' --set clients.partition=$PART --set robust.norm_bound=$NORM_BOUND \
        --grid "attack.kind=none,scale,sign_flip,gaussian,label_flip" --out "$OUT/$PART-normbound" \
        --jobs "$JOBS" --quiet
  done
done
python examples/attack_study_table.py "$OUT" --write docs/reliability.md
