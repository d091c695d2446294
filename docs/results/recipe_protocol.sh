#!/bin/bash
# The default-recipe protocol of docs/results.md ("The default learning rate"): every run, then the two merged grids.
#
#   bash docs/results/recipe_protocol.sh OUT [SHARD]     # train (SHARD: 0/2 and 1/2 in two processes)
#   bash docs/results/recipe_protocol.sh OUT merge       # once every process has finished
#
# OUT: a folder for the grids (one per task under OUT/tasks, then OUT/recipe-dev and OUT/recipe-eval). On a 2-core
# machine run the two shards side by side with OMP_NUM_THREADS=1 each; without SHARD one process trains every run
# and merges. `python docs/results/build.py --import OUT` then copies the merged results into docs/results/ and
# renders results.md. About 3 core-hours of runs on the 2-core CPU machine of docs/results.md.
set -euo pipefail
OUT=${1:?usage: recipe_protocol.sh OUT [SHARD|merge]}
ACTION=${2:-0/1}
COMMON=(--model minilm --r 8 --seeds 0 --max-eval 200 --no-plots)
LRS=(0.0005 0.001 0.002)
# Development tasks (choose the lr) and evaluation tasks (check it): reasoning-gym classification views.
DEV=(syllogism letter_counting family_relationships ransom_note isomorphic_strings color_cube_rotation)
EVAL=(aiw binary_alternation maze self_reference)
# Tasks run with LoRA-TSD only (the CPU budget of the measured protocol: their long prompts cost about 3x).
TSD_ONLY=(color_cube_rotation binary_alternation maze self_reference)

methods_of() { if [[ " ${TSD_ONLY[*]} " == *" $1 "* ]]; then echo tsd; else echo lora tsd; fi; }
task_grid() {  # task, then extra compare options
  local t=$1; shift
  # shellcheck disable=SC2046
  lora-tsd compare --out "$OUT/tasks/$t" --tasks "reasoning-gym:$t@classification" --methods $(methods_of "$t") \
    --lr "${LRS[@]}" "${COMMON[@]}" "$@"
}

if [[ "$ACTION" != merge ]]; then
  for t in "${DEV[@]}" "${EVAL[@]}"; do task_grid "$t" --shard "$ACTION"; done
  [[ "$ACTION" == 0/1 ]] || { echo "when every shard has finished: bash $0 $OUT merge"; exit 0; }
fi
merge() {
  local name=$1; shift
  local specs=() reuse=()
  for t in "$@"; do
    task_grid "$t" --report-only > /dev/null  # every shard's runs in the task's results.json
    specs+=("reasoning-gym:$t@classification")
    reuse+=("$OUT/tasks/$t/results.json")
  done
  lora-tsd compare --out "$OUT/$name" --tasks "${specs[@]}" --methods lora tsd --lr "${LRS[@]}" "${COMMON[@]}" \
    --reuse "${reuse[@]}" --report-only
}
merge recipe-dev "${DEV[@]}"
merge recipe-eval "${EVAL[@]}"
