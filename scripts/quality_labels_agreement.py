"""Agreement on a quality audit (data/labels/quality_v2/ or quality_v3/, issue 22): the two labellers with each
other (the ceiling) and the quality judge's rules with each labeller, per category (one-vs-rest Cohen's kappa with
a seeded bootstrap 95% CI) and over all categories. The judge is reported on the held-out half only; the dev half
is for writing rules. Writes results/quality/<audit>/agreement.md and agreement.json.

    python scripts/quality_labels_agreement.py [data/labels/quality_v2] [--fresh]

`--fresh`: the rules were written before the audit existed (data/labels/quality_v4), so every reply is held out
and the judge is also reported on all of them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from saesteer.judges import QUALITY_CATEGORIES, quality
from saesteer.stats import kappa_ci

CATEGORIES = sorted({c for cats in QUALITY_CATEGORIES.values() for c in cats})


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def labeller(labels: Path, *names: str) -> dict[int, str]:
    return {r["id"]: r["human"] for name in names for r in read(labels / name)}


def agreement(a: list[str], b: list[str]) -> list[dict]:
    """Per category present, one-vs-rest kappa [95% CI] and both raters' counts; then `all` (multi-class)."""
    rows = []
    for category in [c for c in CATEGORIES if c in a or c in b] + ["all"]:
        x, y = (a, b) if category == "all" else ([v == category for v in a], [v == category for v in b])
        kappa, low, high = kappa_ci(x, y, seed=0)
        rows.append(
            {
                "category": category,
                "kappa": kappa,
                "ci_low": low,
                "ci_high": high,
                "first": len(a) if category == "all" else sum(x),
                "second": len(b) if category == "all" else sum(y),
                "agreement": sum(p == q for p, q in zip(x, y)) / len(x),
                "n": len(x),
            }
        )
    return rows


def table(title: str, rows: list[dict], first: str, second: str) -> list[str]:
    lines = [f"### {title}", "", f"| category | {first} | {second} | agreement | Cohen's kappa [95% CI] |"]
    lines.append("|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['category']} | {r['first']} | {r['second']} | {100 * r['agreement']:.1f}% | "
            f"{r['kappa']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] |"
        )
    return [*lines, ""]


def sae_steered(steerings: list[dict]) -> bool:
    """Whether an SAE edit made the reply: an SAE steering produced it, or a conditional one whose reply
    differs from the unsteered reply (its gate fired)."""
    methods = [s["method"] for s in steerings]
    return "sae" in methods or ("conditional" in methods and "none" not in methods)


def main(labels: Path, fresh: bool = False) -> None:
    out = Path("results/quality") / labels.name.removeprefix("quality_")
    replies = {r["id"]: r for r in read(labels / "replies.jsonl")}
    key = {r["id"]: r for r in read(labels / "key.jsonl")}
    half = {i: r["half"] for i, r in key.items()}
    steered = {i for i, r in key.items() if sae_steered(r["steerings"])}
    a = labeller(labels, "labels-a1.jsonl", "labels-a2.jsonl")
    b = labeller(labels, "labels-b1.jsonl", "labels-b2.jsonl")
    if set(a) != set(replies) or set(b) != set(replies):
        raise SystemExit("every reply needs a label from both labellers")
    judge = {i: quality(r["reply"], r["label"], r["prompt"]) for i, r in replies.items()}
    results, lines = {}, [f"# Quality judge agreement, audit {labels.name} (issue 22)", ""]
    lines += [
        f"{len(replies)} replies ({sum(h == 'dev' for h in half.values())} dev, "
        f"{sum(h == 'held_out' for h in half.values())} held out), each labelled blind by two labellers "
        "(A and B; AI helpers working for the project, two per half of the ids) with "
        f"{labels}/RULES.md. One-vs-rest Cohen's kappa per category, seeded bootstrap 95% CI "
        "(1,000 resamples); `all`: multi-class kappa. `held_out_sae_steered`: held-out replies an SAE edit "
        "made (an SAE clamp, or a conditional steering whose reply differs from the unsteered one).",
        "",
    ]
    parts = {
        "all": set(replies),
        "held_out": {i for i in replies if half[i] == "held_out"},
        "dev": {i for i in replies if half[i] == "dev"},
        "held_out_sae_steered": {i for i in steered if half[i] == "held_out"},
        **({"all_sae_steered": steered} if fresh else {}),
    }
    for part, members in parts.items():
        ids = sorted(members)
        la, lb, lj = ([m[i] for i in ids] for m in (a, b, judge))
        results[part] = {
            "n": len(ids),
            "a_vs_b": agreement(la, lb),
            "judge_vs_a": agreement(lj, la),
            "judge_vs_b": agreement(lj, lb),
        }
        lines += table(f"Labeller A vs labeller B ({part}, n={len(ids)})", results[part]["a_vs_b"], "A", "B")
        if part != "all" or fresh:  # rules are written on dev: held-out figures are the ones to report
            lines += table(f"Judge vs A ({part})", results[part]["judge_vs_a"], "judge", "A")
            lines += table(f"Judge vs B ({part})", results[part]["judge_vs_b"], "judge", "B")
    out.mkdir(parents=True, exist_ok=True)
    (out / "agreement.json").write_text(json.dumps(results, indent=1))
    (out / "agreement.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--fresh"]
    main(Path(args[0] if args else "data/labels/quality_v2"), fresh="--fresh" in sys.argv[1:])
