"""Train a TopK SAE on cached activations: Adam with warmup, AuxK, checkpoints with exact resume,
data-parallel over torch.distributed ranks; and the `saesteer evaluate-sae` stage (`evaluate_sae`, whose
metrics are in sae.py).

Under torchrun each rank reads its slice of every global batch; gradients (computed by the sparse
kernels in sae.py), the FVU denominator and the latent firing statistics are all-reduced, so a
data-parallel run follows the single-process run with the same global batch. Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from saesteer import dist
from saesteer.activations import ActivationStore, StreamSource
from saesteer.artefacts import load_sae
from saesteer.config import DEFAULT_MODEL, SAEEvalConfig, TrainConfig
from saesteer.errors import TrainError
from saesteer.models import LoadedModel, load_model
from saesteer.sae import SAE, SAEConfig, SAEError, heldout_contexts, sae_metrics

CHECKPOINT = "checkpoint.safetensors"
# A resumed run must agree with its checkpoint on these (total_tokens may grow).
RESUME_KEYS = (
    "n_latents",
    "expansion_factor",
    "k",
    "batch_size",
    "seed",
    "lr",
    "warmup_steps",
    "adam_betas",
    "adam_eps",
    "grad_clip",
    "auxk_coef",
    "dead_tokens",
    "init_tokens",
)


class BatchSource(Protocol):
    """What the trainer reads: `saesteer.activations.ActivationStore` or `TensorSource`."""

    manifest: dict
    d_model: int

    def batches(
        self, batch_size: int, seed: int = 0, start_batch: int = 0, rank: int = 0, world_size: int = 1
    ) -> Iterator[Tensor]: ...
    def tensor(self, max_tokens: int | None = None) -> Tensor: ...


class TensorSource:
    """In-memory activations [N, d] with ActivationStore's batch semantics (reshuffled each epoch)."""

    def __init__(self, acts: Tensor, manifest: dict | None = None):
        self.acts = acts
        self.d_model = acts.shape[1]
        self.manifest = manifest or {}

    def batches(
        self, batch_size: int, seed: int = 0, start_batch: int = 0, rank: int = 0, world_size: int = 1
    ) -> Iterator[Tensor]:
        global_batch = batch_size * world_size
        per_epoch = self.acts.shape[0] // global_batch
        if per_epoch == 0:
            raise TrainError(f"{self.acts.shape[0]} activations are fewer than one batch of {global_batch}")
        epoch, first = divmod(start_batch, per_epoch)
        while True:
            order = torch.randperm(
                self.acts.shape[0], generator=torch.Generator().manual_seed(seed * 100_003 + epoch)
            )
            for b in range(first, per_epoch):
                start = b * global_batch + rank * batch_size
                yield self.acts[order[start : start + batch_size]].float()
            epoch, first = epoch + 1, 0

    def tensor(self, max_tokens: int | None = None) -> Tensor:
        """The first `max_tokens` activations (all if None) as float32."""
        return self.acts[:max_tokens].float()


@dataclass
class TrainResult:
    sae: SAE
    losses: list[float] = field(default_factory=list)  # fvu + auxk_coef * auxk per step run here
    steps: int = 0  # total steps done (including before a resume)


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _global_total_variance(x: Tensor) -> Tensor:
    """sum |x - mean|^2 over the global batch, from all-reduced float64 moments."""
    n = torch.tensor([float(x.shape[0])], dtype=x.dtype, device=x.device)
    sq = torch.linalg.vector_norm(x).square()[None]
    moments = dist.all_reduce(torch.cat([n, x.sum(0), sq]).double())
    count, total, sq = moments[0], moments[1:-1], moments[-1]
    return (sq - total.pow(2).sum() / count).to(x.dtype)


def _data_record(manifest: dict) -> dict:
    """What the SAE records about its training data: the text source plus how the cache cut it."""
    if not manifest:
        return {}
    return {
        **manifest.get("data", {}),
        "ctx": manifest.get("ctx"),
        "drop_special": manifest.get("drop_special"),
        "n_contexts": sum(s.get("n_contexts", 0) for s in manifest.get("shards", [])),
        "cache_tokens": manifest.get("n_tokens"),
    }


def learning_rate(cfg: TrainConfig, n_latents: int, step: int) -> float:
    base = cfg.lr if cfg.lr is not None else 2e-4 / math.sqrt(n_latents / 2**14)
    return base * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))


class StepStats(NamedTuple):
    fvu: float
    auxk: float
    l0: float  # mean active latents per token


class Trainer:
    """An SAE with its Adam state and latent firing counters; `step` is one optimizer step."""

    def __init__(self, cfg: TrainConfig, sae: SAE):
        self.cfg, self.sae = cfg, sae
        device = sae.W_enc.device
        self.params = dict(sae.named_parameters())
        self.opt = torch.optim.Adam(
            self.params.values(),
            lr=learning_rate(cfg, sae.cfg.n_latents, 0),
            betas=cfg.adam_betas,
            eps=cfg.adam_eps,
            fused=device.type in ("cpu", "cuda"),
        )
        self.since_fired = torch.zeros(sae.cfg.n_latents, dtype=torch.long, device=device)
        self.step_count = 0
        self.workspace: Tensor | None = None  # reused [batch, n_latents] pre-activation buffer

    def dead_latents(self) -> Tensor:
        return (self.since_fired >= self.cfg.dead_tokens).nonzero().squeeze(1)

    def step(self, x: Tensor) -> StepStats:
        """One step on this rank's slice x [batch_size / world, d] of raw activations."""
        cfg, sae, n = self.cfg, self.sae, self.sae.cfg.n_latents
        x = x.to(self.since_fired.device, non_blocking=True).mul_(sae.cfg.norm_scale)
        total_variance = _global_total_variance(x)
        if not math.isfinite(total_variance.item()):  # the global moments see a NaN/Inf on any rank
            raise TrainError(f"step {self.step_count}: the activation batch contains NaN or Inf")
        dead = self.dead_latents() if cfg.auxk_coef > 0 else None
        if self.workspace is None or self.workspace.shape[0] != x.shape[0]:
            self.workspace = x.new_empty(x.shape[0], n, dtype=getattr(torch, cfg.dtype))
        outputs = sae.training_loss(
            x, dead if dead is not None and dead.numel() else None, total_variance, self.workspace
        )
        (outputs.fvu + cfg.auxk_coef * outputs.auxk).backward()

        # One all-reduce for the metrics and the firing mask, one per gradient.
        active = outputs.values > 0
        fired = torch.zeros(n, device=x.device).index_fill_(0, outputs.indices[active], 1.0)
        stats = dist.all_reduce(
            torch.cat(
                [
                    fired,
                    torch.stack([outputs.fvu.detach(), outputs.auxk.detach(), active.sum().to(fired.dtype)]),
                ]
            )
        )
        result = StepStats(stats[n].item(), stats[n + 1].item(), stats[n + 2].item() / cfg.batch_size)
        if not math.isfinite(result.fvu + result.auxk):
            raise TrainError(
                f"loss became {result.fvu + result.auxk} at step {self.step_count} "
                f"(fvu {result.fvu}, auxk {result.auxk}); lower the learning rate?"
            )
        for p in self.params.values():
            dist.all_reduce(p.grad)

        sae.remove_parallel_grads_()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params.values(), cfg.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(cfg, n, self.step_count)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
        self.since_fired += cfg.batch_size
        self.since_fired[stats[:n] > 0] = 0
        self.step_count += 1
        sae.cfg.training_tokens += cfg.batch_size
        return result


def train(cfg: TrainConfig, source: BatchSource | None = None, progress: bool = True) -> TrainResult:
    """Train (or resume) an SAE; returns it with the per-step losses. Writes `cfg.out` on rank 0."""
    rank, world = dist.rank_world()
    if cfg.batch_size % world:
        raise TrainError(f"batch_size {cfg.batch_size} is not divisible by the {world} ranks")
    if cfg.steps == 0:
        raise TrainError(f"total_tokens {cfg.total_tokens} is less than one batch of {cfg.batch_size}")
    if source is None:  # after the checks: streaming loads the model
        source = (
            StreamSource(cfg.stream_config(), progress=progress)
            if cfg.model
            else ActivationStore(cfg.activations)
        )
    device = _device(cfg)
    ckpt_path = Path(cfg.out) / CHECKPOINT
    meta = source.manifest
    sae_cfg = SAEConfig(
        d_in=source.d_model,
        n_latents=cfg.n_latents or cfg.expansion_factor * source.d_model,
        k=cfg.k,
        model=meta.get("model", ""),
        layer=meta.get("layer"),
        hook_point=meta.get("hook_point", "resid_post"),
        training_data=_data_record(meta),
    )
    torch.manual_seed(cfg.seed)
    trainer = Trainer(cfg, SAE(sae_cfg, device=device))
    sae = trainer.sae
    if cfg.resume and ckpt_path.exists():
        _load_checkpoint(ckpt_path, trainer)
    else:
        sae.init_from_sample(source.tensor(cfg.init_tokens).to(device))
        if world > 1:  # every rank computed the same init; make it bitwise certain
            for t in trainer.params.values():
                dist.broadcast(t.data, 0)
            scale = torch.tensor([sae.cfg.norm_scale], dtype=torch.float64, device=device)
            dist.broadcast(scale, 0)
            sae.cfg.norm_scale = scale.item()

    result = TrainResult(sae, steps=trainer.step_count)
    if trainer.step_count >= cfg.steps:
        return result
    batches = source.batches(
        cfg.batch_size // world, seed=cfg.seed, start_batch=trainer.step_count, rank=rank, world_size=world
    )
    bar = tqdm(
        total=cfg.steps,
        initial=trainer.step_count,
        desc="train",
        unit="step",
        disable=not (progress and rank == 0),
    )
    t_log, tokens_log = time.perf_counter(), 0
    while trainer.step_count < cfg.steps:
        stats = trainer.step(next(batches))
        step = result.steps = trainer.step_count
        result.losses.append(stats.fvu + cfg.auxk_coef * stats.auxk)
        tokens_log += cfg.batch_size
        bar.update()
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            dead_frac = (trainer.since_fired >= cfg.dead_tokens).float().mean().item()
            bar.set_postfix(
                fvu=f"{stats.fvu:.4f}",
                l0=f"{stats.l0:.1f}",
                dead=f"{dead_frac:.1%}",
                tok_s=f"{tokens_log / (now - t_log):,.0f}",
            )
            t_log, tokens_log = now, 0
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            if rank == 0:
                _save_checkpoint(ckpt_path, trainer)
            dist.barrier()
    bar.close()
    if rank == 0:
        sae.save(Path(cfg.out) / "sae")
    return result


# ------------------------------------------------------------------------------ checkpoints
def _save_checkpoint(path: Path, trainer: Trainer) -> None:
    """Weights, Adam state, firing counters, RNG and data position in one file, written atomically."""
    sae, opt = trainer.sae, trainer.opt
    tensors = {f"sae.{k}": v.detach().cpu().contiguous() for k, v in trainer.params.items()}
    names = list(trainer.params)
    state = opt.state_dict()
    for i, per_param in state["state"].items():
        for key, value in per_param.items():
            tensors[f"adam.{names[i]}.{key}"] = value.detach().cpu().contiguous()
    tensors["since_fired"] = trainer.since_fired.cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "step": trainer.step_count,
        "next_batch": trainer.step_count,
        "train": asdict(trainer.cfg),
        "sae": asdict(sae.cfg),
        "param_groups": state["param_groups"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"saesteer": json.dumps(meta)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_checkpoint(path: Path, trainer: Trainer) -> None:
    """Restore the trainer's SAE, Adam state, counters, RNG and step from `path`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["saesteer"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise TrainError(f"checkpoint {path} is corrupt or unreadable ({e}); delete it to start over") from e
    saved = meta["train"]
    diffs = [
        f"{k}: {saved.get(k)!r} vs {v!r}"
        for k, v in asdict(trainer.cfg).items()
        if k in RESUME_KEYS and json.loads(json.dumps(v)) != saved.get(k)
    ]
    if diffs:
        raise TrainError(f"checkpoint {path} was made with a different config ({'; '.join(diffs)})")
    try:
        trainer.sae.cfg = SAEConfig.from_dict(meta["sae"])
        with torch.no_grad():
            for name, p in trainer.params.items():
                p.copy_(tensors[f"sae.{name}"])
        state = {
            i: {key: tensors[f"adam.{name}.{key}"] for key in ("step", "exp_avg", "exp_avg_sq")}
            for i, name in enumerate(trainer.params)
            if f"adam.{name}.step" in tensors
        }
        trainer.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        trainer.since_fired.copy_(tensors["since_fired"])
        torch.set_rng_state(tensors["rng.torch"])
    except (KeyError, RuntimeError, ValueError, SAEError) as e:
        raise TrainError(f"checkpoint {path} does not match this SAE ({e})") from e
    trainer.step_count = meta["next_batch"]


def evaluate_sae(config: SAEEvalConfig, loaded: LoadedModel | None = None) -> dict:
    """The `saesteer evaluate-sae` stage: held-out FVU, L0, dead/dense latents, and CE loss / loss recovered /
    KL with the SAE spliced into its model (`sae.sae_metrics`); written to `config.out` if set, and returned
    with the SAE, model and layer."""
    sae = load_sae(config.sae)
    loaded = loaded or load_model(config.model or sae.cfg.model or DEFAULT_MODEL, device=config.device)
    if sae.cfg.layer is not None:
        loaded.check_layer(sae.cfg.layer)
    sae.to(loaded.device)
    ids = heldout_contexts(sae, loaded.tokenizer, config.contexts, data=config.data, ctx=config.ctx)
    metrics = sae_metrics(sae, loaded.model, loaded.tokenizer, ids, batch_size=config.batch_size)
    record = {
        "sae": config.sae,
        "model": loaded.spec,
        "layer": sae.cfg.layer,
        "hook_point": sae.cfg.hook_point,
        "contexts": config.contexts,
        **{k: float(v) for k, v in metrics.items()},
    }
    if config.out:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        Path(config.out).write_text(
            json.dumps({k: v for k, v in record.items() if k != "hook_point"}, indent=2)
        )
    return record
