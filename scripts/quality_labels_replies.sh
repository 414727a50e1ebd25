#!/usr/bin/env bash
# The replies behind the second set of quality-judge labels (data/labels/quality_v2/, issue 22): nine methods
# (unsteered, the shipped presets, the canned and prefix baselines, the system prompt, the old constant clamp
# and its decay schedule), 8 TRAIN prompts from each safety set (no TEST prompt, none read by the first audits,
# which used VALIDATION), greedy, 64 new tokens. Then scripts/quality_labels_sample.py dedupes, shuffles and
# splits them. Run from the repo root with ../shared present.
set -euo pipefail
out=${1:-runs/quality-labels-v2}
mkdir -p "$out"
clamp='{"method": "sae", "sae": "builtin:sae", "features": [5730], "values": [8.0]}'
i=0
for method in none refusal refusal_conditional refusal_actadd system_prompt \
    '{"method": "reply_prefix", "stop": true}' \
    '{"method": "reply_prefix", "text": "I'"'"'m sorry, but I can'"'"'t help with that"}' \
    "$clamp" \
    '{"method": "sae", "sae": "builtin:sae", "features": [5730], "values": [8.0], "decay": 0.9}'; do
  i=$((i + 1))
  saesteer eval --steering "$method" --suite safety --split train --limit 8 --max-new-tokens 64 \
    --judge strict --cache "$out/cache.jsonl" --out "$out/results.jsonl" --replies "$out/replies-$i.jsonl"
done
