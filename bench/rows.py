"""Decode rows: the engine's throughput and reply stability at 128, 256 and all rows together, in float32 and
bfloat16, on the same 416 validation prompts under the shipped `refusal` preset (64 new tokens).

    python bench/rows.py [--prompts 416] [--rows 128,256,416]

It prints new tokens/s per dtype and row count, how many replies equal the ones at the first row count, and
the best GFLOP/s of the model's layer matmul shapes at that many rows (at 1,024 rows: the peak that
`bench/generate.py` divides by): the evidence behind `engine.DECODE_ROWS`, and for whether a reply depends on
the batch it shares.
"""

from __future__ import annotations

import argparse
import time

import torch
from generate import bench_prompts, count_tokens, matmul_peak, new_path

from saesteer.models import chat_prompts, load_model
from saesteer.steering import parse_steering


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=416)
    parser.add_argument("--rows", default="128,256,416", help="row counts, comma-separated")
    args = parser.parse_args()
    texts = bench_prompts(args.prompts)
    for dtype in ("float32", "bfloat16"):
        loaded = load_model(args.model, dtype=dtype)
        rendered = chat_prompts(loaded, [[{"role": "user", "content": t}] for t in texts])
        steering, first = parse_steering("refusal"), None
        config, dt = loaded.model.config, getattr(torch, dtype)
        peak = matmul_peak(config.hidden_size, config.intermediate_size, dt)
        print(f"{dtype:9s} layer matmuls at 1024 rows: {peak:.0f} GFLOP/s", flush=True)
        for rows in map(int, args.rows.split(",")):
            start = time.perf_counter()
            replies = new_path(loaded, steering, rendered, 64, rows)
            rate = count_tokens(loaded, replies) / (time.perf_counter() - start)
            first = first or replies
            same = sum(a == b for a, b in zip(first, replies))
            flops = matmul_peak(config.hidden_size, config.intermediate_size, dt, rows)
            print(
                f"{dtype:9s} {rows:4d} rows  {rate:6.1f} new tokens/s  {same}/{len(replies)} replies as at the first  "
                f"layer matmuls {flops:.0f} GFLOP/s"
            )


if __name__ == "__main__":
    main()
