"""Blind label files for the second quality-judge audit (issue 22) from scripts/quality_labels_replies.sh.

Reads runs/quality-labels-v2/replies-*.jsonl; drops the prompts of the CC BY-NC Alpaca sets (harmful_mix,
harmless: not shipped); keeps each distinct (prompt, reply) once with every steering that produced it; shuffles
with seed 0; splits by prompt (all replies to one prompt in the same half) into `dev` (rules may be written on
it) and `held_out` (agreement is reported on it only). Writes data/labels/quality_v2/replies.jsonl (id, prompt,
label, reply: all a labeller sees) and key.jsonl (id, half, steerings).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from saesteer.evalsets import safety_prompts

RUNS, OUT = Path("runs/quality-labels-v2"), Path("data/labels/quality_v2")


def half(prompt: str) -> str:
    return "dev" if hashlib.sha256(prompt.encode()).digest()[0] % 2 == 0 else "held_out"


def main() -> None:
    excluded = {p.text for name in ("harmful_mix", "harmless") for p in safety_prompts(name, "train")}
    found: dict[tuple[str, str], dict] = {}
    for path in sorted(RUNS.glob("replies-*.jsonl"), key=lambda p: int(p.stem.split("-")[1])):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row["prompt"] in excluded:
                continue
            entry = found.setdefault(
                (row["prompt"], row["reply"]),
                {"prompt": row["prompt"], "label": row["label"], "steerings": []},
            )
            entry["steerings"].append(row["steering"])
    rows = list(found.items())
    random.Random(0).shuffle(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "replies.jsonl", "w", encoding="utf-8") as blind, open(OUT / "key.jsonl", "w") as key:
        for i, ((prompt, reply), entry) in enumerate(rows):
            blind.write(
                json.dumps({"id": i, "prompt": prompt, "label": entry["label"], "reply": reply}) + "\n"
            )
            key.write(json.dumps({"id": i, "half": half(prompt), "steerings": entry["steerings"]}) + "\n")
    halves = [half(p) for (p, _), _ in rows]
    print(f"{len(rows)} distinct replies: {halves.count('dev')} dev, {halves.count('held_out')} held out")


if __name__ == "__main__":
    main()
