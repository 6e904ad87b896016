#!/usr/bin/env bash
# The runs behind the README's results table: Omniglot in the paper's protocol (the presets), one
# row at a time, on a CPU or a GPU. A run is made in chunks: the same command with the same RUNS
# folder continues it from its last checkpoint (every 50 meta-steps), so keep RUNS outside the work
# tree, where a later sitting finds it. Run one at a time on an otherwise idle machine.
#
#   bash scripts/omniglot_paper_runs.sh 5w1s_imaml_gd ~/imaml-runs
#   python scripts/publish_pretrained.py ~/imaml-runs/5w1s_imaml_gd --name omniglot_5w1s_imaml_gd
#
# Further arguments are imaml-train overrides; the data root is $OMNIGLOT (default: ../shared's copy).
set -euo pipefail
row=${1:?"row: one of 5w1s_imaml_gd 5w1s_imaml_hf 5w1s_maml 5w1s_fomaml 5w1s_reptile 5w5s_imaml_gd 20w1s_imaml_gd 20w5s_imaml_gd"}
runs=${2:-$HOME/imaml-runs}
case $row in
  5w1s_imaml_gd)  args=(experiment=omniglot_5w1s  algorithm=imaml   inner_solver=gd train.meta_steps=5000) ;;
  5w1s_imaml_hf)  args=(experiment=omniglot_5w1s  algorithm=imaml   inner_solver=hf train.meta_steps=1000) ;;
  5w1s_maml)      args=(experiment=omniglot_5w1s  algorithm=maml    inner_solver=gd train.meta_steps=1000) ;;
  5w1s_fomaml)    args=(experiment=omniglot_5w1s  algorithm=fomaml  inner_solver=gd train.meta_steps=1000) ;;
  5w1s_reptile)   args=(experiment=omniglot_5w1s  algorithm=reptile inner_solver=gd train.meta_steps=1000) ;;
  5w5s_imaml_gd)  args=(experiment=omniglot_5w5s  algorithm=imaml   inner_solver=gd train.meta_steps=1000) ;;
  20w1s_imaml_gd) args=(experiment=omniglot_20w1s algorithm=imaml   inner_solver=gd train.meta_steps=500) ;;
  20w5s_imaml_gd) args=(experiment=omniglot_20w5s algorithm=imaml   inner_solver=gd train.meta_steps=500) ;;
  *) echo "error: unknown row '$row'; choose one of 5w1s_imaml_gd 5w1s_imaml_hf 5w1s_maml 5w1s_fomaml 5w1s_reptile 5w5s_imaml_gd 20w1s_imaml_gd 20w5s_imaml_gd" >&2
     exit 2 ;;
esac
exec imaml-train "${args[@]}" "dataset.root=${OMNIGLOT:-../shared/data/omniglot}" dataset.download=false \
  train.val_every=250 train.val_episodes=400 train.checkpoint_every=50 train.progress=false \
  "hydra.run.dir=$runs/$row" "${@:3}"
