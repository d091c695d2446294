#!/bin/bash
# The default-recipe protocol of docs/results.md ("The default learning rate"): every run, then the merged grids.
#
#   bash docs/results/recipe_protocol.sh OUT [I/N]     # train (I/N: 0/2 and 1/2 in two processes)
#   bash docs/results/recipe_protocol.sh OUT merge     # once every process has finished
#   bash docs/results/recipe_protocol.sh OUT seeds [I/N]  # later: more seeds where a check failed, then merge
#   bash docs/results/recipe_protocol.sh OUT restarts [I/N]  # later: the restart of each stuck run, then merge
#
# OUT: a folder for the grids (one small grid per task × method × lr under OUT/tasks, then OUT/recipe-dev,
# OUT/recipe-eval and OUT/recipe-eval2). On a 2-core machine run the two processes side by side with
# OMP_NUM_THREADS=1 each; without I/N one process trains every run and merges. `python docs/results/build.py
# --import OUT` then copies the merged results into docs/results/ and renders results.md. About 5 core-hours of
# runs on the 2-core CPU machine of docs/results.md.
set -euo pipefail
OUT=${1:?usage: recipe_protocol.sh OUT [I/N|merge]}
ACTION=${2:-0/1}
COMMON=(--model minilm --r 8 --seeds 0 --max-eval 200 --no-plots)
LRS=(0.0005 0.001 0.002)
# Development tasks (choose the lr), evaluation tasks (check it), and the second evaluation tasks (check the
# choice made again after the first check failed): reasoning-gym classification views.
DEV=(syllogism letter_counting family_relationships ransom_note isomorphic_strings color_cube_rotation)
EVAL=(aiw binary_alternation maze self_reference)
EVAL2=(course_schedule circuit_logic)
# The CPU budget of the measured protocol left out some LoRA runs on tasks whose prompts fill the 128 tokens
# (about 3x the cost per step): the LoRA lrs run on these tasks (every other task: every lr).
declare -A LORA_LRS=([color_cube_rotation]="" [maze]="0.001" [self_reference]="0.001")

units() {  # task method lr, one line per run of the protocol
  local t lr
  for t in "${DEV[@]}" "${EVAL[@]}" "${EVAL2[@]}"; do
    for lr in "${LRS[@]}"; do echo "$t tsd $lr"; done
    if [[ -v "LORA_LRS[$t]" ]]; then for lr in ${LORA_LRS[$t]}; do echo "$t lora $lr"; done
    else for lr in "${LRS[@]}"; do echo "$t lora $lr"; done; fi
  done
}

# After the rule answered, more seeds where a check failed: `lora` on the failing tasks, seeds 1 and 2, at the
# lrs given here (on binary_alternation the two that were in question).
declare -A SEED_LRS=([circuit_logic]="0.0005 0.001 0.002" [binary_alternation]="0.0005 0.001")
SEEDS_COMMON=(--model minilm --r 8 --seeds 1 2 --max-eval 200 --no-plots --methods lora)
if [[ "$ACTION" == seeds ]]; then
  shard=${3:-0/1}
  for t in "${!SEED_LRS[@]}"; do
    # shellcheck disable=SC2086  # the lrs are separate words
    lora-tsd compare --out "$OUT/seeds/$t-lora" --tasks "reasoning-gym:$t@classification" --lr ${SEED_LRS[$t]} \
      "${SEEDS_COMMON[@]}" --shard "$shard"
  done
  exit 0
fi
# `lora-tsd train --stuck-restarts 1` (the default since): a run that ended stuck is trained again with seed + 1000.
# The restarts of the evaluation runs at the chosen lr that ended stuck: task method seed.
RESTARTS=("circuit_logic lora 0" "binary_alternation lora 1" "binary_alternation lora 2" "maze lora 0" "maze tsd 0"
          "self_reference lora 0" "self_reference tsd 0")
if [[ "$ACTION" == restarts ]]; then
  shard=${3:-0/1} i=0
  for unit in "${RESTARTS[@]}"; do
    read -r t m s <<< "$unit"
    if (( i++ % ${shard#*/} == ${shard%/*} )); then
      lora-tsd compare --out "$OUT/restarts/$t-$m-s$((s + 1000))" --tasks "reasoning-gym:$t@classification" \
        --methods "$m" --lr 0.001 --seeds $((s + 1000)) --model minilm --r 8 --max-eval 200 --no-plots
    fi
  done
  exit 0
fi
if [[ "$ACTION" != merge ]]; then
  shard=${ACTION%/*} shards=${ACTION#*/} i=0
  while read -r t m lr; do
    if (( i++ % shards == shard )); then
      lora-tsd compare --out "$OUT/tasks/$t-$m-$lr" --tasks "reasoning-gym:$t@classification" --methods "$m" \
        --lr "$lr" "${COMMON[@]}"
    fi
  done < <(units)
  [[ "$ACTION" == 0/1 ]] || { echo "when every process has finished: bash $0 $OUT merge"; exit 0; }
fi
merge() {  # name, then its tasks: one grid over the tasks, its runs carried from the small grids
  local name=$1; shift
  local specs=() reuse=() t f
  for t in "$@"; do
    specs+=("reasoning-gym:$t@classification")
    for f in "$OUT/tasks/$t"/results.json "$OUT/tasks/$t"-*/results.json; do [[ -f $f ]] && reuse+=("$f"); done
  done
  lora-tsd compare --out "$OUT/$name" --tasks "${specs[@]}" --methods lora tsd --lr "${LRS[@]}" "${COMMON[@]}" \
    --reuse "${reuse[@]}" --report-only
}
merge recipe-dev "${DEV[@]}"
merge recipe-eval "${EVAL[@]}"
merge recipe-eval2 "${EVAL2[@]}"
if compgen -G "$OUT/seeds/*/results.json" > /dev/null; then
  specs=() reuse=()
  for t in "${!SEED_LRS[@]}"; do specs+=("reasoning-gym:$t@classification"); done
  lora-tsd compare --out "$OUT/recipe-seeds" --tasks "${specs[@]}" --methods lora --lr "${LRS[@]}" \
    --model minilm --r 8 --seeds 1 2 --max-eval 200 --no-plots --reuse "$OUT"/seeds/*/results.json --report-only
fi
if compgen -G "$OUT/restarts/*/results.json" > /dev/null; then
  lora-tsd compare --out "$OUT/recipe-restarts" --tasks reasoning-gym:{circuit_logic,binary_alternation,maze,self_reference}@classification \
    --methods lora tsd --lr 0.001 --model minilm --r 8 --seeds 1000 1001 1002 --max-eval 200 --no-plots \
    --reuse "$OUT"/restarts/*/results.json --report-only
fi
