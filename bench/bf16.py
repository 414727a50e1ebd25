"""How much bfloat16 changes greedy replies and refusal rates, side by side in one run: the safety suite on
VALIDATION prompts under each shipped preset, with the model in float32 and in bfloat16 (`--dtype`).

    python bench/bf16.py [--limit 100] [--out results/bench/bf16.json]

Per steering and dtype: each safety set's refusal (or over-refusal), clear-refusal and degenerate rates with
bootstrap 95% CIs (strict refusal judge, rules quality judge, 64 new tokens, seed 0), the seconds the eval
took, and how many bfloat16 replies are identical to float32's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from saesteer import evaluate
from saesteer.judges import StrictStringJudge
from saesteer.models import load_model

SETS = ("advbench", "xstest_unsafe", "written_harmful", "xstest_safe", "written_benign")
STEERINGS = ("none", "refusal", "refusal_conditional")
METRICS = ("refusal_rate", "over_refusal_rate", "clear_refusal_rate", "degenerate_rate")
DTYPES = ("float32", "bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=100, help="VALIDATION prompts per safety set")
    parser.add_argument("--out", default="results/bench/bf16.json")
    args = parser.parse_args()
    rows, replies, seconds = [], {}, {}
    for dtype in DTYPES:
        loaded = load_model(args.model, dtype=dtype)
        for name in STEERINGS:
            start = time.perf_counter()
            run = evaluate(
                loaded,
                name,
                "safety",
                judge=StrictStringJudge(),
                split="validation",
                limit=args.limit,
                safety_sets=SETS,
                progress=False,
            )
            seconds[(dtype, name)] = round(time.perf_counter() - start, 1)
            replies[(dtype, name)] = {prompt: reply for prompt, reply, _ in run.judged}
            for row in run.rows:
                if row["metric"] in METRICS:
                    rows.append(
                        {
                            "dtype": dtype,
                            "steering": name,
                            "dataset": row["config"]["dataset"],
                            "metric": row["metric"],
                            "value": round(100 * row["value"], 1),
                            "ci": [round(100 * row["ci_low"], 1), round(100 * row["ci_high"], 1)],
                            "n": row["n"],
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    identical = {}
    for name in STEERINGS:
        fp32, bf16 = replies[("float32", name)], replies[("bfloat16", name)]
        identical[name] = {"identical": sum(fp32[p] == bf16.get(p) for p in fp32), "of": len(fp32)}
    summary = {
        "model": args.model,
        "split": "validation",
        "limit": args.limit,
        "judge": "strict",
        "max_new_tokens": 64,
        "seed": 0,
        "seconds": {f"{dtype} {name}": s for (dtype, name), s in seconds.items()},
        "identical_replies": identical,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(identical), f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
