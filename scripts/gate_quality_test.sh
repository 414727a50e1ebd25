#!/usr/bin/env bash
# TEST-split table of the gate and quality work (results/gate-quality/test-grid.json): unsteered, the first
# refusal_conditional preset (diff-in-means gate, constant clamp), the second gate (results/gate/second-run/)
# and the shipped one, each turning on the decaying SAE clamp, and the shipped gate turning on a canned refusal
# or a forced refusal prefix; all chosen on train/validation. Greedy, 64 new tokens, strict refusal judge +
# quality judge. Under a gate only flagged prompts are generated; the rest share the unsteered replies.
set -euo pipefail
saesteer sweep --grid results/gate-quality/test-grid.json --split test --suite safety,jailbreak \
  --limit 40,hh_rlhf=24,crescendo_advbench=24 --judge strict --max-new-tokens 64 \
  --out results/gate-quality/test.jsonl --cache runs/gate-quality/generations.cache.jsonl
