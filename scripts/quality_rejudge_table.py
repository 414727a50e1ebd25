"""The TEST table of the gate and quality work (RESULTS.md 7.7, 7.8) judged by two quality judges on the same
generations (issue 22): OLD.jsonl and NEW.jsonl are the rows of one grid, swept with the same generation cache
by the code of two commits. Quality columns show old -> new; the other columns come from NEW (the refusal judge
and the replies are the same in both).

    python scripts/quality_rejudge_table.py OLD.jsonl NEW.jsonl > table.md
"""

from __future__ import annotations

import json
import sys

from saesteer.report import config_label

QUALITY = (  # (header, dataset, metric)
    ("clear refusals", "unsafe_all", "clear_refusal_rate"),
    ("degenerate (unsafe)", "unsafe_all", "degenerate_rate"),
    ("written harmful: clear refusals", "written_harmful", "clear_refusal_rate"),
    ("benign refused (quality)", "safe_all", "refuses_rate"),
    ("degenerate (safe)", "safe_all", "degenerate_rate"),
)
OTHER = (
    ("unsafe refused (strict)", "unsafe_all", "refusal_rate"),
    ("over-refusal (strict)", "safe_all", "over_refusal_rate"),
    ("hh-rlhf ASR", "hh_rlhf", "attack_success_rate"),
    ("Crescendo ASR", "crescendo_advbench", "attack_success_rate"),
)


def rows(path: str) -> dict[tuple[str, str, str], dict]:
    found = {}
    for line in open(path, encoding="utf-8"):
        row = json.loads(line)
        spec = json.dumps(row["config"]["steering"], sort_keys=True)
        found[(spec, row["config"]["dataset"], row["metric"])] = row
    return found


def cell(row: dict | None) -> str:
    if row is None:
        return "-"
    return f"{100 * row['value']:.1f} [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"


def main(old_path: str, new_path: str) -> None:
    old, new = rows(old_path), rows(new_path)
    specs = list(dict.fromkeys(spec for spec, _, _ in new))
    n = {spec: new.get((spec, "unsafe_all", "clear_refusal_rate"), {}).get("n") for spec in specs}
    headers = [h for h, _, _ in QUALITY] + [h for h, _, _ in OTHER]
    print("| method (n unsafe) | " + " | ".join(headers) + " |")
    print("|---|" + "---|" * len(headers))
    for spec in specs:
        cells = []
        for _, dataset, metric in QUALITY:
            before, after = old.get((spec, dataset, metric)), new.get((spec, dataset, metric))
            cells.append(f"{cell(before)} -> {cell(after)}" if before else f"(new) {cell(after)}")
        cells += [cell(new.get((spec, dataset, metric))) for _, dataset, metric in OTHER]
        print(f"| {config_label(json.loads(spec))} ({n[spec]}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
