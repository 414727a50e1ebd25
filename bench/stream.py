"""Streaming SAE training (`saesteer train --model`) against the cached path, on the same tokens.

    python bench/stream.py [--model smollm2-135m-instruct] [--layer 6] [--tokens 262144] [--n-latents 4608]

Runs, one after the other in one process: `collect` into a temporary cache and `train` on it (the cached
path), then `train` streaming the same collection from the model. Prints the wall time and tokens/s of each
stage, and the final FVU of both SAEs on the cache's last 8,192 activations (which training also read). The
streamed SAE trains on the same activations in the same order, so the two are expected to be equal.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from saesteer.activations import ActivationStore, StreamSource, collect  # noqa: E402
from saesteer.config import CollectConfig, TrainConfig  # noqa: E402
from saesteer.models import load_model  # noqa: E402
from saesteer.sae import reconstruction_metrics  # noqa: E402
from saesteer.trainer import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=262_144)
    parser.add_argument("--n-latents", type=int, default=4608)
    parser.add_argument("--batch-size", type=int, default=4096)
    args = parser.parse_args()
    loaded = load_model(args.model)
    collection = CollectConfig(model=args.model, layer=args.layer, tokens=args.tokens)
    settings = dict(n_latents=args.n_latents, batch_size=args.batch_size, total_tokens=args.tokens * 9 // 10)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        collect(collection, Path(tmp) / "cache", loaded, progress=False)
        collected = time.perf_counter() - start
        start = time.perf_counter()
        cached = train(
            TrainConfig(activations=str(Path(tmp) / "cache"), out=str(Path(tmp) / "a"), **settings),
            progress=False,
        )
        trained = time.perf_counter() - start
        held_out = ActivationStore(Path(tmp) / "cache").tensor()[-8192:]
        stream = TrainConfig(out=str(Path(tmp) / "b"), model=args.model, layer=args.layer, **settings)
        start = time.perf_counter()
        same_tokens = replace(stream.stream_config(), tokens=args.tokens)  # the collection above, exactly
        streamed = train(stream, StreamSource(same_tokens, loaded, progress=False), progress=False)
        streaming = time.perf_counter() - start
    tokens = settings["total_tokens"]
    print(
        f"model {args.model} layer {args.layer}, {args.n_latents} latents, {tokens:,} training tokens, torch {torch.__version__}"
    )
    print(
        f"  cached:   collect {collected:.1f} s ({args.tokens / collected:,.0f} tok/s) + train {trained:.1f} s ({tokens / trained:,.0f} tok/s) = {collected + trained:.1f} s"
    )
    print(
        f"  streamed: {streaming:.1f} s ({tokens / streaming:,.0f} tok/s), {streaming / (collected + trained):.2f}x the cached path's total"
    )
    same = all(torch.equal(v, streamed.sae.state_dict()[k]) for k, v in cached.sae.state_dict().items())
    fvu = [reconstruction_metrics(r.sae, held_out)["fvu"] for r in (cached, streamed)]
    print(
        f"  FVU on the cache's last 8,192 activations (read in training too): cached {fvu[0]:.4f}, streamed {fvu[1]:.4f}; weights identical: {same}"
    )


if __name__ == "__main__":
    main()
