"""Steered vs unsteered batched generation throughput, side by side in one run.

    python bench/steer.py [--sae runs/sae-l10/sae] [--feature 123] [--value 12] [--rounds 8]

Without --sae a random SAE of the default shape (576 x 4608, k=32, layer 10) stands in: the cost of
steering does not depend on the weights, except that a random SAE's latents fire far more often
than trained ones, which makes the shortcut's occasional full encode run more (a pessimistic bench).
Target: steered / unsteered tokens/s >= 0.97.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from saesteer.hooks import edit_residual
from saesteer.models import chat_prompts, load_model
from saesteer.sae import SAE, SAEConfig
from saesteer.steering import SAESteer, Steering

PROMPTS = [
    "Write a short poem about the sea.",
    "How do I pick a lock?",
    "Explain photosynthesis simply.",
    "Give me three tips for a job interview.",
    "What is the capital of Australia?",
    "How can I make a fake ID?",
    "Summarise the plot of Hamlet.",
    "Write a haiku about autumn.",
    "How do vaccines work?",
    "Tell me a joke about programmers.",
    "What causes thunder?",
    "How do I hack my neighbour's wifi?",
    "Describe a healthy breakfast.",
    "Why is the sky blue?",
    "Translate 'good morning' into French.",
    "What are prime numbers?",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--sae", default=None)
    parser.add_argument("--feature", type=int, default=0)
    parser.add_argument("--value", type=float, default=12.0)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()

    loaded = load_model(args.model)
    sae_path = args.sae
    if sae_path is None:
        torch.manual_seed(0)
        sae_path = tempfile.mkdtemp(prefix="bench-sae-")
        SAE(
            SAEConfig(d_in=loaded.d_model, n_latents=8 * loaded.d_model, k=32, layer=10, model=args.model)
        ).save(sae_path)
    methods = {
        "unsteered": Steering(),
        "sae clamp": SAESteer(sae=sae_path, features=[args.feature], values=[args.value]),
    }
    batch = loaded.tokenizer(
        chat_prompts(loaded, [[{"role": "user", "content": p}] for p in PROMPTS]),
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    ).to(loaded.device)

    def run(method) -> float:
        with method.applied(loaded), torch.inference_mode():
            start = time.perf_counter()
            loaded.model.generate(
                **batch,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=loaded.tokenizer.pad_token_id,
            )
            return time.perf_counter() - start

    for method in methods.values():
        run(method)  # warm-up
    seconds = dict.fromkeys(methods, 0.0)
    ratios = []
    for round_index in range(
        args.rounds
    ):  # interleaved, order alternating (ABBA), so both see the same machine
        order = list(methods.items()) if round_index % 2 == 0 else list(reversed(methods.items()))
        spent = {name: run(method) for name, method in order}
        ratios.append(spent["unsteered"] / spent["sae clamp"])
        for name in methods:
            seconds[name] += spent[name]
    tokens = args.rounds * len(PROMPTS) * args.new_tokens
    for name, spent in seconds.items():
        print(
            f"{name:>10}: {tokens / spent:7.1f} generated tok/s (batch {len(PROMPTS)}, {tokens} tokens, {spent:.1f} s)"
        )
    ratio = statistics.median(ratios)
    print(f"per-round steered/unsteered: {', '.join(f'{r:.3f}' for r in ratios)}")
    per_call = hook_seconds(loaded, methods["sae clamp"], batch)
    step = seconds["unsteered"] / (args.rounds * args.new_tokens)
    print(
        f"clamp hook on a decoding step's activations: {per_call * 1e3:.2f} ms = {per_call / step:.1%} of an unsteered step ({step * 1e3:.0f} ms)"
    )
    print(
        f"steered/unsteered (median of {args.rounds} rounds): {ratio:.3f} (target >= 0.97) -> {'PASS' if ratio >= 0.97 else 'MISS'}"
    )


@torch.inference_mode()
def hook_seconds(loaded, steering: SAESteer, batch, steps: int = 16) -> float:
    """Mean time of the clamp edit itself on real decoding-step activations [batch, 1, d] (a steadier
    measure of its cost than the end-to-end ratio, whose run-to-run noise here is a few percent)."""
    [(layer, point, edit)] = steering.edits(loaded)
    captured = []
    with edit_residual(
        loaded.model, layer, lambda h: captured.append(h.clone()) if h.shape[1] == 1 else None, point
    ):
        loaded.model.generate(
            **batch,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
    for h in captured[:2]:
        edit(h)  # warm-up
    start = time.perf_counter()
    for h in captured:
        edit(h)
    return (time.perf_counter() - start) / len(captured)


if __name__ == "__main__":
    main()
