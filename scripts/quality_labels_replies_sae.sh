#!/usr/bin/env bash
# The replies behind the third set of quality-judge labels (data/labels/quality_v3/, issue 22): SAE steering
# only, the kind of reply the judge is least reliable on. Six SAE methods (the shipped `refusal` and
# `refusal_conditional`, the old constant clamp, its decay schedule, and stronger constant clamps at 12 and 16,
# both tried by reproduce's validation grid) and the unsteered reference, which scripts/quality_labels_sample.py
# uses to drop replies the steering left unchanged. 8 TRAIN prompts from each safety set drawn with seed 1
# (not the v2 audit's seed 0; prompts already labelled are dropped later), greedy, 64 new tokens.
# Run from the repo root with ../shared present. The fourth audit (data/labels/quality_v4/, a fresh held-out set)
# is the same with seed 2: `bash scripts/quality_labels_replies_sae.sh runs/quality-labels-v4 2`.
set -euo pipefail
out=${1:-runs/quality-labels-v3}
seed=${2:-1}
mkdir -p "$out"
clamp() { echo '{"method": "sae", "sae": "builtin:sae", "features": [5730], "values": ['"$1"']}'; }
i=0
for method in none refusal refusal_conditional refusal_previous refusal_decay "$(clamp 12.0)" "$(clamp 16.0)"; do
  i=$((i + 1))
  saesteer eval --steering "$method" --suite safety --split train --limit 8 --seed "$seed" --max-new-tokens 64 \
    --judge strict --cache "$out/cache.jsonl" --out "$out/results.jsonl" --replies "$out/replies-$i.jsonl"
done
