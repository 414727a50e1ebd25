#!/usr/bin/env bash
# TEST-split table of the gate and quality work: unsteered, the previous refusal_conditional preset, the new
# one (harm gate + decaying SAE clamp, both chosen on train/validation), and the same gate turning on a canned
# refusal or a forced refusal prefix. Greedy, 64 new tokens, strict refusal judge + quality judge.
set -euo pipefail
saesteer sweep --grid results/gate-quality/test-grid.json --split test --suite safety,jailbreak \
  --limit 40,hh_rlhf=24,crescendo_advbench=24 --judge strict --max-new-tokens 64 \
  --out results/gate-quality/test.jsonl --cache runs/gate-quality/generations.cache.jsonl
