#!/usr/bin/env bash
# The README's results on real Omniglot, 5-way 1-shot, on a CPU: iMAML-GD, MAML and first-order
# MAML with the same budget, one after another (never beside each other: they share the cores),
# then imaml-eval of each best checkpoint on 600 test episodes with 15 queries per class.
#
#   bash scripts/omniglot_cpu_runs.sh ../shared/data/omniglot 600 outputs/omniglot_cpu
#
# Arguments: the Omniglot folder, meta-steps per run, the folder for the runs, then any further
# imaml-train overrides, applied to all three runs. ALGORITHMS="imaml" (say) runs a subset.
set -euo pipefail
root=${1:?Omniglot folder}
steps=${2:-600}
out=${3:-outputs/omniglot_cpu}
common=(experiment=omniglot_5w1s "dataset.root=$root" dataset.download=false device=cpu
        "train.meta_steps=$steps" train.val_every=50 train.val_episodes=100 train.checkpoint_every=50
        train.progress=false eval.episodes=600 "${@:4}")
read -r -a algorithms <<< "${ALGORITHMS:-imaml maml fomaml}"
for algorithm in "${algorithms[@]}"; do
  start=$(date +%s)
  imaml-train "${common[@]}" "algorithm=$algorithm" "hydra.run.dir=$out/$algorithm"
  echo "$algorithm: $(( $(date +%s) - start )) s wall-clock for $steps meta-steps" | tee -a "$out/wall_clock.txt"
done
for algorithm in "${algorithms[@]}"; do
  imaml-eval "checkpoint=$out/$algorithm/checkpoints/best.pt" eval.episodes=600 dataset.queries=15 \
    "hydra.run.dir=$out/$algorithm/eval"
done
