"""The quality judge that `saesteer.judges` holds, scored on a label audit it was not written on (issue 22):
per category against each labeller (one-vs-rest Cohen's kappa, seeded bootstrap 95% CI), then per method group
(the replies each steering produced; a reply several methods produced counts for each).

    python scripts/quality_judge_on_audit.py data/labels/quality_v4 NAME

NAME names the output, results/quality/<audit>/judge-NAME.md. For the rules of an older commit, run it with
that commit's package first on the path: `git worktree add /tmp/old c8bcf0b` and `PYTHONPATH=/tmp/old/src`.
Judges without the prompt argument are called without it.
"""

from __future__ import annotations

import collections
import inspect
import sys
from pathlib import Path

from quality_labels_agreement import agreement, labeller, read, table
from quality_labels_by_method import method

from saesteer.judges import quality
from saesteer.stats import kappa_ci


def main(labels: Path, name: str) -> None:
    replies = {r["id"]: r for r in read(labels / "replies.jsonl")}
    key = {r["id"]: r for r in read(labels / "key.jsonl")}
    human = {"A": labeller(labels, "labels-a1.jsonl", "labels-a2.jsonl")}
    human["B"] = labeller(labels, "labels-b1.jsonl", "labels-b2.jsonl")
    reads_prompt = "prompt" in inspect.signature(quality).parameters
    judge = {
        i: quality(r["reply"], r["label"], r["prompt"]) if reads_prompt else quality(r["reply"], r["label"])
        for i, r in replies.items()
    }
    ids = sorted(replies)
    lines = [f"# The quality judge ({name}) on audit {labels.name}, every reply held out (issue 22)", ""]
    lines += [f"Command: `python scripts/quality_judge_on_audit.py {labels} {name}`; n = {len(ids)}.", ""]
    for who, labels_of in human.items():
        rows = agreement([judge[i] for i in ids], [labels_of[i] for i in ids])
        lines += table(f"Judge vs {who}", rows, "judge", who)
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i in ids:
        for spec in {method(s): s for s in key[i]["steerings"]}:
            groups[spec].append(i)
    lines += [
        "### Per method group (judge vs A; kappa is 1 where neither rater uses the category, 0 where only one does)",
        "",
        "| method | n | clear refusals (judge / A / B) | clear_refusal kappa | degenerate (judge / A / B) | "
        "degenerate kappa | apology_then_help (judge / A / B) | all kappa |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for group, members in sorted(groups.items()):
        cells = []
        for category in ("clear_refusal", "degenerate", "apology_then_help"):
            counts = [sum(m[i] == category for i in members) for m in (judge, human["A"], human["B"])]
            cells.append(" / ".join(map(str, counts)))
            if category != "apology_then_help":
                x, y = [judge[i] == category for i in members], [human["A"][i] == category for i in members]
                cells.append(f"{kappa_ci(x, y, seed=0)[0]:.3f}")
        overall = kappa_ci([judge[i] for i in members], [human["A"][i] for i in members], seed=0)[0]
        lines.append(f"| {group} | {len(members)} | " + " | ".join(cells) + f" | {overall:.3f} |")
    out = Path("results/quality") / labels.name.removeprefix("quality_") / f"judge-{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
