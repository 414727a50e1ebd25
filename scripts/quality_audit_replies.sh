#!/usr/bin/env bash
# The replies behind the quality judge's validation labels (data/labels/quality_audit.jsonl): six methods,
# 8 VALIDATION prompts from each safety set, greedy, 64 new tokens. Run from the repo root with ../shared present.
set -euo pipefail
out=${1:-runs/quality-audit}
mkdir -p "$out"
for method in none refusal refusal_conditional refusal_actadd system_prompt \
    '{"method": "sae", "sae": "builtin:sae", "features": [5730], "values": [12.0]}'; do
  name=$(echo "$method" | tr -c 'a-z0-9_\n' '_' | cut -c1-40)
  saesteer eval --steering "$method" --suite safety --split validation --limit 8 --max-new-tokens 64 \
    --cache "$out/cache.jsonl" --out "$out/results.jsonl" --replies "$out/replies-$name.jsonl"
done
