"""Whether two results JSONL files hold the same rows, wall times aside (issue 23: behaviour must not change).

python scripts/compare_rows.py OLD.jsonl NEW.jsonl
"""

from __future__ import annotations

import json
import sys


def rows(path: str) -> list[str]:
    found = []
    for line in open(path, encoding="utf-8"):
        row = json.loads(line)
        row.pop("wall_time_s", None)
        found.append(json.dumps(row, sort_keys=False))
    return found


if __name__ == "__main__":
    old, new = rows(sys.argv[1]), rows(sys.argv[2])
    same = sum(a == b for a, b in zip(old, new))
    print(f"{len(old)} rows before, {len(new)} after, {same} identical in order (wall times aside)")
    for a, b in zip(old, new):
        if a != b:
            print("first difference:\n  before", a[:400], "\n  after ", b[:400])
            break
    sys.exit(0 if same == len(old) == len(new) else 1)
