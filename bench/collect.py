"""Early-exit collection vs a full forward pass, side by side on the same contexts.

    python bench/collect.py [--model smollm2-135m-instruct] [--layer 10] [--batches 6]

Prints tokens/s of both and their ratio; target: >= 0.8 * n_layers / (layer + 1) (about 2.2x at L=10 of 30).
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from saesteer.corpus import TextSource, iter_documents, pack_contexts
from saesteer.hooks import residual_at
from saesteer.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6)
    args = parser.parse_args()

    loaded = load_model(args.model)
    loaded.check_layer(args.layer)
    contexts = pack_contexts(iter_documents(TextSource(), loaded.tokenizer), loaded.tokenizer, args.ctx)
    batches = [torch.tensor(list(itertools.islice(contexts, args.batch_size))) for _ in range(args.batches)]
    runs = {
        "early exit": lambda ids: residual_at(loaded.model, ids, args.layer),
        "full forward": lambda ids: loaded.model(input_ids=ids, use_cache=False).logits,
    }
    seconds = dict.fromkeys(runs, 0.0)
    with torch.inference_mode():
        for run in runs.values():  # warm-up
            run(batches[0])
        for ids in batches:  # interleaved so both see the same machine state
            for name, run in runs.items():
                start = time.perf_counter()
                run(ids)
                seconds[name] += time.perf_counter() - start
    tokens = sum(b.numel() for b in batches)
    for name, spent in seconds.items():
        print(f"{name:>12}: {tokens / spent:8,.0f} tok/s  ({tokens:,} tokens, {spent:.1f} s)")
    ratio = seconds["full forward"] / seconds["early exit"]
    target = 0.8 * loaded.n_layers / (args.layer + 1)
    print(
        f"speedup: {ratio:.2f}x (target >= {target:.2f}x = 0.8 x {loaded.n_layers}/{args.layer + 1}, "
        f"torch threads {torch.get_num_threads()}) -> {'PASS' if ratio >= target else 'MISS'}"
    )


if __name__ == "__main__":
    main()
