"""Stage times of a `saesteer reproduce` run that was paused (SIGSTOP/SIGCONT, logged as `stop T` / `cont T`
lines in unix seconds): each stage's interval from the cumulative `timings.json` (stages run back to back
after the process started), minus the pauses inside it.

    python scripts/paused_stage_times.py results/full-timing/2026-12-08
"""

import json
import sys
from pathlib import Path

MODEL_LOAD = 8  # seconds between the process start and its first stage


def main(folder: Path) -> None:
    start = int((folder / "start").read_text()) - 5  # stamped 5 s after the process started
    pauses, stopped = [], None
    for kind, t in (line.split() for line in (folder / "pauses.log").read_text().splitlines()):
        if kind == "stop" and stopped is None:
            stopped = int(t)
        elif kind == "cont" and stopped is not None:
            pauses.append((stopped, int(t)))
            stopped = None
    t, total = start + MODEL_LOAD, 0.0
    print("| stage | wall s | paused s | run s |\n|---|---|---|---|")
    for stage, seconds in json.loads(next(folder.glob("timings*.json")).read_text()).items():
        end = t + seconds
        paused = sum(max(0, min(b, end) - max(a, t)) for a, b in pauses)
        print(f"| {stage} | {seconds:,.0f} | {paused:,.0f} | {seconds - paused:,.0f} |")
        total, t = total + seconds - paused, end
    print(f"| sum | | | {total:,.0f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
