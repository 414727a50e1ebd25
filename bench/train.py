"""TopK SAE training throughput: saesteer vs EleutherAI sparsify vs SAELens, side by side.

All three train the same shape (d=576, n=4608, k=32, batch 4096, Adam, AuxK coefficient 1/32,
dead threshold far beyond the run so no latent is dead) on the same synthetic LLM-like activations
(a mean offset plus a sparse sum of atoms from a 16k dictionary with Zipf frequencies and log-normal
scales, plus dense noise). Each framework runs its own full training step including the optimizer.
The roofline is the machine's dense matmul peak over the encoder's 2*d*n FLOPs per token, in the dtype of
that matmul: fp32, and bf16 for `saesteer-bf16` (TrainConfig.dtype "bfloat16": the encoder matmul that chooses
the top-k runs in bf16, everything else in fp32).

Run with a python that has the competitors (they are skipped with a reason otherwise):
    python bench/train.py [--steps 8] [--rounds 2] [--profile]
Rounds interleave the frameworks and each keeps its best round, which damps noise from other jobs.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from saesteer.sae import SAE, SAEConfig  # noqa: E402
from saesteer.trainer import TrainConfig, Trainer  # noqa: E402

D, N, K, BATCH = 576, 4608, 32, 4096
LR = 2e-4 / math.sqrt(N / 2**14)
DEAD_TOKENS = 10**12


def synthetic_activations(n_tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(16384, D, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    zipf = 1.0 / torch.arange(1, 16385, dtype=torch.float64) ** 0.8
    which = torch.multinomial(zipf, n_tokens * 48, replacement=True, generator=g).view(n_tokens, 48)
    scale = torch.exp(torch.randn(n_tokens, 48, generator=g) * 0.5)
    mean = torch.randn(D, generator=g) * 2
    x = torch.cat(
        [torch.bmm(s[:, None, :], atoms[w]).squeeze(1) for s, w in zip(scale.split(512), which.split(512))]
    )
    return x + mean + 0.1 * torch.randn(n_tokens, D, generator=g)


def matmul_peak_flops(dtype: torch.dtype = torch.float32, reps: int = 5) -> float:
    a, b = torch.randn(BATCH, D, dtype=dtype), torch.randn(D, N, dtype=dtype)
    out = torch.empty(BATCH, N, dtype=dtype)
    torch.mm(a, b, out=out)
    best = min(_timed(lambda: torch.mm(a, b, out=out)) for _ in range(reps))
    return 2 * BATCH * D * N / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def saesteer_step(data: list[torch.Tensor], dtype: str = "float32"):
    cfg = TrainConfig(
        n_latents=N, k=K, batch_size=BATCH, lr=LR, warmup_steps=1, dead_tokens=DEAD_TOKENS, dtype=dtype
    )
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=D, n_latents=N, k=K))
    sae.init_from_sample(torch.cat(data[:2]))
    trainer = Trainer(cfg, sae)
    return lambda x: trainer.step(x.clone())  # step() normalises its input in place


def sparsify_step(data: list[torch.Tensor]):
    """sparsify's Trainer step (fvu loss, Adam as its trainer builds it when bitsandbytes is absent)."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sae = SparseCoder(D, SparseCoderConfig(num_latents=N, k=K), device="cpu", dtype=torch.float32)
    sae.b_dec.data = data[0].mean(0)
    opt = torch.optim.Adam(sae.parameters(), lr=LR)
    since_fired = torch.zeros(N, dtype=torch.long)

    def step(x):
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > DEAD_TOKENS
        out = sae(x, dead_mask=dead_mask)
        (out.fvu + out.auxk_loss / 32).backward()
        did_fire = torch.zeros(N, dtype=torch.bool)
        did_fire[out.latent_indices.flatten()] = True
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        since_fired.add_(x.shape[0])
        since_fired[did_fire] = 0

    return step


def saelens_step(data: list[torch.Tensor]):
    """SAELens' SAETrainer._train_step on a TopKTrainingSAE (its defaults otherwise)."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=D, d_sae=N, k=K, aux_loss_coefficient=1 / 32, dtype="float32", device="cpu"
        )
    )
    cfg = SAETrainerConfig(
        total_training_samples=BATCH * 10**6,
        train_batch_size_samples=BATCH,
        lr=LR,
        lr_end=LR,
        device="cpu",
        dead_feature_window=10**9,
    )
    trainer = SAETrainer(cfg, sae, data_provider=iter(data))
    return lambda x: trainer._train_step(sae, x)


FRAMEWORKS = {
    "saesteer": saesteer_step,
    "saesteer-bf16": lambda data: saesteer_step(data, "bfloat16"),
    "sparsify": sparsify_step,
    "SAELens": saelens_step,
}
BF16 = {"saesteer-bf16"}  # frameworks whose roofline is the bf16 matmul's


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per framework per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each framework keeps its best")
    ap.add_argument("--only", nargs="*", choices=list(FRAMEWORKS), help="frameworks to run")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of saesteer's step")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; d={D} n={N} k={K} batch={BATCH}, Adam lr={LR:.2e}"
    )
    data = [x for x in synthetic_activations(4 * BATCH).split(BATCH)]
    steps, skipped = {}, {}
    for name in args.only or FRAMEWORKS:
        try:
            steps[name] = FRAMEWORKS[name](data)
        except ImportError as e:
            skipped[name] = (
                f"not importable ({e}); pip install {'eai-sparsify' if name == 'sparsify' else 'sae-lens'}"
            )
    best: dict[str, float] = {}
    peak = {torch.float32: 0.0, torch.bfloat16: 0.0}
    for r in range(args.rounds):
        for dtype in peak:
            peak[dtype] = max(peak[dtype], matmul_peak_flops(dtype))
        for name, step in steps.items():
            for i in range(args.warmup):
                step(data[i % len(data)])
            elapsed = sum(_timed(lambda i=i: step(data[i % len(data)])) for i in range(args.steps))
            tok_s = args.steps * BATCH / elapsed
            best[name] = max(best.get(name, 0.0), tok_s)
            print(f"  round {r + 1}: {name:13s} {tok_s:9,.0f} tok/s")
    roofline = {dtype: flops / (2 * D * N) for dtype, flops in peak.items()}
    for dtype, flops in peak.items():
        print(
            f"dense {str(dtype)[6:]} matmul peak [{BATCH},{D}]x[{D},{N}]: {flops / 1e9:.1f} GFLOP/s "
            f"-> roofline {roofline[dtype]:,.0f} tok/s"
        )
    for name, tok_s in best.items():
        line = roofline[torch.bfloat16 if name in BF16 else torch.float32]
        print(f"{name:13s} {tok_s:9,.0f} tok/s  ({tok_s / line:.0%} of its dtype's roofline)")
    for name, reason in skipped.items():
        print(f"{name:13s} skipped: {reason}")
    for mine in ("saesteer", "saesteer-bf16"):
        for other in ("sparsify", "SAELens"):
            if mine in best and other in best:
                print(f"{mine} vs {other}: {best[mine] / best[other]:.1f}x")
    if args.profile and "saesteer" in steps:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(3):
                steps["saesteer"](data[i])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
