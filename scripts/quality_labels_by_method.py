"""What each steering made, by a labeller's reading (issue 22): the share of each quality category among the
replies of each method in a label audit (a reply several methods produced counts for each). Writes
results/quality/<audit>/by-method.md.

    python scripts/quality_labels_by_method.py data/labels/quality_v3
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

from quality_labels_agreement import labeller, read

from saesteer.stats import clopper_pearson


def method(spec: dict) -> str:
    """A short name of a steering spec of the audits."""
    if spec["method"] != "sae":
        return (
            spec["method"] if spec["method"] != "conditional" else f"conditional({method(spec['steering'])})"
        )
    schedule = f", release on {spec['release_on']}" if spec.get("release_on") else ""
    schedule += f", decay {spec['decay']:g}" if spec.get("decay", 1.0) != 1.0 else ""
    return f"SAE clamp {spec['features'][0]} = {spec['values'][0]:g}{schedule}"


def main(labels: Path) -> None:
    key = {r["id"]: r for r in read(labels / "key.jsonl")}
    human = {"A": labeller(labels, "labels-a1.jsonl", "labels-a2.jsonl")}
    human["B"] = labeller(labels, "labels-b1.jsonl", "labels-b2.jsonl")
    lines = [f"# Quality of each method's replies, audit {labels.name} (issue 22)", ""]
    lines += [
        f"Command: `python scripts/quality_labels_by_method.py {labels}`. Share [exact 95% CI] per labeller.",
        "",
    ]
    for who, labels_of in human.items():
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for i, entry in key.items():
            for spec in entry["steerings"]:
                counts[method(spec)][labels_of[i]] += 1
        categories = sorted({c for cc in counts.values() for c in cc})
        lines += [f"## Labeller {who}", "", "| method | n | " + " | ".join(categories) + " |"]
        lines.append("|---|---|" + "---|" * len(categories))
        for name, cc in sorted(counts.items()):
            n = sum(cc.values())
            cells = []
            for c in categories:
                low, high = clopper_pearson(cc[c], n)
                cells.append(f"{cc[c] / n:.0%} [{low:.0%}, {high:.0%}]")
            lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
        lines.append("")
    out = Path("results/quality") / labels.name.removeprefix("quality_")
    out.mkdir(parents=True, exist_ok=True)
    (out / "by-method.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/labels/quality_v3"))
