"""The paper's scale as a dry run: a Phi-3-Mini-shaped model with random bf16 weights, on this machine.

    python bench/scale.py [--layer 6] [--n-latents 24576] [--k 32] [--tokens 4096] [--out results/scale]

Builds a Phi-3 Mini shape (d_model 3,072, 32 layers, 32 heads, MLP 8,192; the vocabulary is SmolLM2's 49,152
tokens, so the shipped tokenizer and chat template can feed it: 3.92B parameters instead of 3.82B) with random
weights in bfloat16, and runs the pipeline's stages on it through the package's own code:
1. `collect`: activations at --layer (early exit) for --tokens tokens;
2. streaming training (`train --model`): a TopK SAE of --n-latents latents on activations computed on the fly,
   a few steps (bf16 top-k selection, as on a GPU);
3. steered generation: an SAE clamp of that SAE, 2 prompts x 8 new tokens, through the engine;
4. the harm gate: a linear probe at layer 16 scoring 8 chat prompts.
Each stage reports its wall time, time per token and the process's peak resident memory during the stage.
The FLOPs each stage needs per token are counted from the shapes, so `results/scale/README.md` can turn them
into GPU-hours for the real run (see there).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from saesteer.activations import StreamSource, collect  # noqa: E402
from saesteer.config import CollectConfig, TrainConfig  # noqa: E402
from saesteer.detectors import Detector, score_prompts  # noqa: E402
from saesteer.engine import generate  # noqa: E402
from saesteer.models import LoadedModel, chat_prompts, load_model  # noqa: E402
from saesteer.steering import steering_from_dict  # noqa: E402
from saesteer.trainer import train  # noqa: E402

PHI3_MINI = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096)  # fmt: skip


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


@contextmanager
def stage(name: str, tokens: int, report: dict):
    """Time a stage and sample its peak RSS every 20 ms."""
    peak, done = [rss_gib()], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], rss_gib())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    report[name] = {
        "seconds": round(seconds, 2),
        "tokens": tokens,
        "s_per_token": seconds / tokens,
        "peak_rss_gib": round(max(peak[0], rss_gib()), 2),
    }
    print(
        f"  {name:<22} {seconds:8.1f} s  {seconds / tokens * 1000:9.2f} ms/token  peak RSS {report[name]['peak_rss_gib']:.1f} GiB",
        flush=True,
    )


def build(vocab: int) -> torch.nn.Module:
    """The Phi-3 Mini shape with random N(0, 0.02) bf16 weights (RMSNorm weights 1)."""
    config = transformers.Phi3Config(vocab_size=vocab, pad_token_id=0, **PHI3_MINI)
    with torch.device("meta"):
        model = transformers.Phi3ForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32).mul_(0.02))
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffers were left on meta
    return model.eval().requires_grad_(False)


def flops_per_token(layers: int, n_latents: int, d: int = 3072, mlp: int = 8192, ctx: int = 256) -> dict:
    """Forward FLOPs through `layers` decoder layers (matmuls plus attention at context `ctx`), and a TopK SAE
    training step's (the dense encoder forward and its weight gradient, 2 x 2 d n; the sparse rest is small)."""
    per_layer = 2 * (4 * d * d + 3 * d * mlp) + 2 * 2 * ctx * d
    return {"forward": layers * per_layer, "sae_step": 3 * 2 * d * n_latents}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--n-latents", type=int, default=24576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument(
        "--tokens", type=int, default=4096, help="tokens collected, and streamed for training"
    )
    parser.add_argument("--out", default=None, help="folder for scale.json")
    args = parser.parse_args()
    small = load_model("smollm2-135m-instruct")  # its tokenizer and chat template
    report: dict = {"shape": PHI3_MINI, "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(
        f"Phi-3-Mini-shaped random model, bf16, {torch.get_num_threads()} threads; RSS before {rss_gib():.1f} GiB"
    )
    with stage("build (random init)", 1, report):
        model = build(len(small.tokenizer))
    report["parameters"] = sum(p.numel() for p in model.parameters())
    report["weights_gib"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 2)
    print(f"  {report['parameters'] / 1e9:.2f}B parameters, {report['weights_gib']:.1f} GiB of weights")
    loaded = LoadedModel(
        model, small.tokenizer, "phi3-mini-shaped-random", torch.device("cpu"), torch.bfloat16
    )
    with tempfile.TemporaryDirectory() as tmp:
        collection = CollectConfig(model=loaded.spec, layer=args.layer, tokens=args.tokens, batch_size=4)
        with stage("collect", args.tokens, report):
            collect(collection, Path(tmp) / "acts", loaded, progress=False)
        streamed = TrainConfig(
            out=str(Path(tmp) / "sae"), model=loaded.spec, layer=args.layer, stream_batch_size=4, n_latents=args.n_latents,
            k=args.k, batch_size=1024, total_tokens=args.tokens, init_tokens=1024, dtype="bfloat16", warmup_steps=1,
        )  # fmt: skip
        with stage("stream-train SAE", args.tokens, report):
            result = train(
                streamed, StreamSource(streamed.stream_config(), loaded, progress=False), progress=False
            )
        sae_path = Path(tmp) / "sae" / "sae"
        prompts = chat_prompts(
            loaded, [[{"role": "user", "content": q}] for q in ("How do I bake bread?", "Tell me a joke.")]
        )
        ids = [loaded.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        steering = steering_from_dict(
            {"method": "sae", "sae": str(sae_path), "features": [0], "values": [8.0]}
        )
        with stage("steered generation", 2 * 8, report):
            generate(loaded, ids, steering.row_edits(loaded, ids), max_new_tokens=8)
        detector = Detector(
            "probe", (16,), torch.randn(1, loaded.d_model) / loaded.d_model**0.5, pooling="user"
        )
        texts = [f"Question {i}: how do I do thing number {i}?" for i in range(8)]
        rendered = chat_prompts(loaded, [[{"role": "user", "content": t}] for t in texts])
        tokens = sum(len(loaded.tokenizer(r, add_special_tokens=False).input_ids) for r in rendered)
        with stage("gate (8 prompts)", tokens, report):
            score_prompts(loaded, detector, texts, batch_size=8)
    report["sae"] = {
        "n_latents": args.n_latents,
        "k": args.k,
        "steps": result.steps,
        "final_loss": result.losses[-1],
    }
    report["flops_per_token"] = flops_per_token(args.layer + 1, args.n_latents)
    report["flops_per_token_full_model"] = flops_per_token(32, args.n_latents)["forward"]
    for name in ("collect", "stream-train SAE"):
        flops = report["flops_per_token"]["forward"] + (
            report["flops_per_token"]["sae_step"] if "train" in name else 0
        )
        report[name]["achieved_gflops"] = round(flops / report[name]["s_per_token"] / 1e9, 1)
    print(
        json.dumps(
            {k: v for k, v in report.items() if k in ("flops_per_token", "collect", "stream-train SAE")},
            indent=1,
        )
    )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "scale.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
