#!/usr/bin/env bash
# Long runs outlive a sitting, the machine may not: `save` copies what a run needs to go on (its
# config, last and best checkpoints, TensorBoard events, log) from RUNS into runs-in-progress/ in
# the work tree, to be committed; `restore` puts it back into RUNS on the next machine, where the
# run's own command (scripts/omniglot_paper_runs.sh … RUNS …) resumes it exactly.
#
#   bash scripts/carry_runs.sh save ~/imaml-runs 5w1s_imaml_gd && git add runs-in-progress && git commit …
#   bash scripts/carry_runs.sh restore ~/imaml-runs 5w1s_imaml_gd
set -euo pipefail
usage="usage: bash scripts/carry_runs.sh save|restore RUNS NAME..."
action=${1:?$usage}
runs=${2:?$usage}
shift 2
[ $# -gt 0 ] || { echo "error: name at least one run; $usage" >&2; exit 2; }
kept=$(cd "$(dirname "$0")/.." && pwd)/runs-in-progress
for name in "$@"; do
  case $action in
    save) from=$runs/$name; to=$kept/$name ;;
    restore) from=$kept/$name; to=$runs/$name ;;
    *) echo "error: unknown action '$action'; $usage" >&2; exit 2 ;;
  esac
  [ -f "$from/checkpoints/last.pt" ] || { echo "error: $from/checkpoints/last.pt does not exist; is $name a run of $from?" >&2; exit 2; }
  if [ "$action" = restore ] && [ -f "$to/checkpoints/last.pt" ]; then
    echo "error: $to already holds a run; move it away first, or resume it there as it is" >&2; exit 2
  fi
  # A save is a snapshot: files of an earlier save that the run no longer has do not linger.
  if [ "$action" = save ]; then rm -rf "$to"; fi
  mkdir -p "$to/checkpoints"
  cp -r "$from/.hydra" "$from/tb" "$to/"
  cp "$from/checkpoints/last.pt" "$to/checkpoints/"
  for file in checkpoints/best.pt train.log results.json; do
    if [ -f "$from/$file" ]; then cp "$from/$file" "$to/$file"; fi
  done
  # The meta-step is only reported, so a python without torch on PATH must not fail the copy.
  step=$(python -c "import sys, torch; print(torch.load(sys.argv[1], weights_only=True)['step'])" \
         "$to/checkpoints/last.pt" 2>/dev/null) || step="unknown (no python with torch on PATH)"
  echo "$action: $name ($from -> $to, meta-step $step)"
done
