"""Blind label files for the second quality-judge audit (issue 22) from scripts/quality_labels_replies.sh.

Reads runs/quality-labels-v2/replies-*.jsonl; drops the prompts of the CC BY-NC Alpaca sets (harmful_mix,
harmless: not shipped); keeps each distinct (prompt, reply) once with every steering that produced it; shuffles
with seed 0; splits by prompt (all replies to one prompt in the same half) into `dev` (rules may be written on
it) and `held_out` (agreement is reported on it only). Writes data/labels/quality_v2/replies.jsonl (id, prompt,
label, reply: all a labeller sees) and key.jsonl (id, half, steerings).

For the third audit (scripts/quality_labels_replies_sae.sh): `--runs runs/quality-labels-v3 --out
data/labels/quality_v3 --exclude data/labels/quality_v2/replies.jsonl --reference 1` also drops the prompts an
earlier audit labelled and every reply equal to the unsteered one (replies-1.jsonl) for its prompt, so each
reply left was changed by SAE steering.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

from saesteer.evalsets import safety_prompts


def half(prompt: str) -> str:
    return "dev" if hashlib.sha256(prompt.encode()).digest()[0] % 2 == 0 else "held_out"


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def main(runs: Path, out: Path, exclude: list[Path], reference: int | None) -> None:
    excluded = {p.text for name in ("harmful_mix", "harmless") for p in safety_prompts(name, "train")}
    excluded |= {row["prompt"] for path in exclude for row in read(path)}
    paths = sorted(runs.glob("replies-*.jsonl"), key=lambda p: int(p.stem.split("-")[1]))
    unchanged = (
        {(r["prompt"], r["reply"]) for r in read(runs / f"replies-{reference}.jsonl")} if reference else set()
    )
    found: dict[tuple[str, str], dict] = {}
    for path in paths:
        if reference and path.name == f"replies-{reference}.jsonl":
            continue
        for row in read(path):
            if row["prompt"] in excluded or (row["prompt"], row["reply"]) in unchanged:
                continue
            entry = found.setdefault(
                (row["prompt"], row["reply"]),
                {"prompt": row["prompt"], "label": row["label"], "steerings": []},
            )
            entry["steerings"].append(row["steering"])
    rows = list(found.items())
    random.Random(0).shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "replies.jsonl", "w", encoding="utf-8") as blind, open(out / "key.jsonl", "w") as key:
        for i, ((prompt, reply), entry) in enumerate(rows):
            blind.write(
                json.dumps({"id": i, "prompt": prompt, "label": entry["label"], "reply": reply}) + "\n"
            )
            key.write(json.dumps({"id": i, "half": half(prompt), "steerings": entry["steerings"]}) + "\n")
    halves = [half(p) for (p, _), _ in rows]
    print(f"{len(rows)} distinct replies: {halves.count('dev')} dev, {halves.count('held_out')} held out")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/quality-labels-v2"))
    parser.add_argument("--out", type=Path, default=Path("data/labels/quality_v2"))
    parser.add_argument(
        "--exclude", type=Path, action="append", default=[], help="replies.jsonl already labelled"
    )
    parser.add_argument(
        "--reference", type=int, help="N of the unsteered replies-N.jsonl (drop equal replies)"
    )
    args = parser.parse_args()
    main(args.runs, args.out, args.exclude, args.reference)
