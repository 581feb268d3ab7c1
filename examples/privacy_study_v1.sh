#!/bin/sh
# The OLD-regime FFA-LoRA privacy study of docs/results.md (issue 7; no private cell learned there), end to end (about 3.7 hours on 2 CPU cores).  Re-running resumes:
# finished cells are kept.  Learning rates come from the grid in docs/results.md (tuned on SST-2, label skew, seed 0).
#   sh examples/privacy_study_v1.sh [OUT=runs/study]
set -e
OUT=${1:-runs/study}
JOBS=${JOBS:-2}
FEDIT_LR=${FEDIT_LR:-3e-3}        # best of 3e-4, 1e-3, 3e-3, 1e-2 both private (eps 3) and non-private
FFA_LR=${FFA_LR:-1e-2}            # best non-private of 3e-3, 1e-2, 3e-2
FFA_DP_LR=${FFA_DP_LR:-3e-3}      # best private (eps 3) of 1e-3, 3e-3, 1e-2, 3e-2
PARTS="clients.partition=label_skew,iid"
# the learning-rate grid (SST-2, label skew, seed 0, private at epsilon 3 and non-private)
fedlora compare --config examples/ffa_dp_glue.toml --methods fedit --grid "train.lr=3e-4,1e-3,3e-3,1e-2" \
    --grid "dp.epsilon=3,inf" --out $OUT/lr_sst2_fedit --jobs $JOBS --quiet
fedlora compare --config examples/ffa_dp_glue.toml --methods ffa --grid "train.lr=1e-3,3e-3,1e-2,3e-2" \
    --grid "dp.epsilon=3,inf" --out $OUT/lr_sst2_ffa --jobs $JOBS --quiet
for data in glue qnli; do
  name=$([ $data = glue ] && echo sst2 || echo qnli)
  fedlora compare --config examples/ffa_dp_$data.toml --methods fedit,ffa --seeds 3 --grid "$PARTS" \
      --grid "dp.epsilon=inf" --set-for fedit:train.lr=$FEDIT_LR --set-for ffa:train.lr=$FFA_LR \
      --out $OUT/${name}_nodp --jobs $JOBS --quiet
  fedlora compare --config examples/ffa_dp_$data.toml --methods fedit,ffa --seeds 3 --grid "$PARTS" \
      --grid "dp.epsilon=1,3,6" --set-for fedit:train.lr=$FEDIT_LR --set-for ffa:train.lr=$FFA_DP_LR \
      --out $OUT/${name}_dp --jobs $JOBS --quiet
done
# alpha sensitivity at fixed learning rates (alpha = 16 is the sst2_nodp label-skew cells)
fedlora compare --config examples/ffa_dp_glue.toml --methods fedit,ffa --seeds 2 --grid "lora.alpha=4,64" \
    --grid "dp.epsilon=inf" --set-for fedit:train.lr=$FEDIT_LR --set-for ffa:train.lr=$FFA_LR \
    --out $OUT/sst2_alpha --jobs $JOBS --quiet
# the DP path with clipping but (almost) no noise: does it learn when the noise is gone?
fedlora compare --config examples/ffa_dp_glue.toml --methods fedit,ffa --seeds 1 --set dp.epsilon=0 \
    --set dp.noise_multiplier=0.01 --set-for fedit:train.lr=$FEDIT_LR --set-for ffa:train.lr=$FFA_DP_LR \
    --out $OUT/sst2_dp_sigma0 --jobs $JOBS --quiet
# larger batches on the full training split, same 20 steps (IID, epsilon 3, seeds 0-1; about 70 minutes with --jobs 2)
fedlora compare --config examples/ffa_dp_glue.toml --methods fedit,ffa --seeds 2 --set clients.partition=iid \
    --set dp.epsilon=3 --set data.max_train_examples=0 --set train.batch_size=512 --set train.lr=$FFA_DP_LR \
    --out $OUT/sst2_dp_b512 --jobs $JOBS --quiet
