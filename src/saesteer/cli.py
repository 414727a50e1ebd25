"""The `saesteer` command line: one verb per pipeline stage."""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from saesteer.configdoc import MISSING, field_docs
from saesteer.errors import SaesteerError, short

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Steer a chat LLM's refusal behaviour with sparse-autoencoder features.",
)

# The config dataclasses whose fields the options below come from ("module:Class" under saesteer; read from
# the source, so importing the CLI loads neither torch nor the server's optional dependencies).
COLLECT, SOURCE, TRAIN = "config:CollectConfig", "config:TextSource", "config:TrainConfig"
DISCOVER, GATE, REPRODUCE = "config:DiscoverConfig", "config:GateConfig", "config:ReproduceConfig"
FIT, SAE_EVAL, SWEEP = "config:FitConfig", "config:SAEEvalConfig", "config:SweepConfig"
EVAL, DECODING, SERVE, DEMO = (
    "config:EvalConfig",
    "config:Decoding",
    "config:ServeConfig",
    "config:DemoConfig",
)


def _shown(value) -> str:
    """A default as help text shows it: 20,000,000; 8,16 for (8.0, 16.0)."""
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return (
        f"{value:,}"
        if isinstance(value, int) and not isinstance(value, bool) and value >= 100_000
        else str(value)
    )


def field_default(config: str, name: str):
    """The default of field `name` of config dataclass `config` ("module:Class")."""
    module, cls = config.split(":")
    default = field_docs(f"saesteer.{module}", cls)[name].default
    if default is MISSING:
        raise LookupError(f"{config}.{name} has no plain default")
    return default


def opt(
    config: str,
    name: str,
    *param_decls: str,
    default=MISSING,
    help: str | None = None,
    more: str = "",
    unset: bool = False,
    **kwargs,
):
    """A typer.Option whose default and help text come from field `name` of config dataclass `config`
    ("module:Class"), where each field's docstring documents it. `default` or `help` replace the field's;
    `more` is added to the help; `unset=True` makes the option default to None (not given: a config file or
    the dataclass decides) and names the dataclass default in the help instead."""
    module, cls = config.split(":")
    doc = field_docs(f"saesteer.{module}", cls)[name]
    text = " ".join(t for t in (doc.help if help is None else help, more) if t)
    if unset:
        value = None
        if doc.default is not None and doc.default is not MISSING:
            text += f" (default: {_shown(doc.default)})"
    else:
        value = field_default(config, name) if default is MISSING else default
        value = list(value) if isinstance(value, tuple) else value
    return typer.Option(value, *param_decls, help=text, **kwargs)


# Commands without a config dataclass of their own mean what CollectConfig means by these.
_MODEL, _DEVICE = opt(COLLECT, "model"), opt(COLLECT, "device")
_DTYPE = typer.Option(
    None,
    help="the model's weights and activations: float32 or bfloat16 (default: float32 on CPU, bfloat16 on GPUs "
    "that support it); bfloat16 generates faster on CPUs with AVX512-BF16 but changes most replies, and a "
    "reply can depend on the replies generated beside it (README, How it works)",
)


@app.callback()
def _root() -> None:
    """Steer a chat LLM's refusal behaviour with sparse-autoencoder features."""


def _writable_out(path: Path | str | None, kind: str = "file", option: str = "--out") -> None:
    """Refuse an output path that cannot be written, before any expensive work (model loading,
    generation): `kind` "file" must not be a folder, "dir" must not be a file, and the path or its
    nearest existing ancestor (which must be a folder) must be writable. None passes (no output)."""
    if path is None:
        return
    path, shown = Path(path), short(str(path))
    try:
        if path.exists():
            if kind == "dir" and not path.is_dir():
                raise SaesteerError(f"{option} {shown} is a file, not a folder")
            if kind == "file" and path.is_dir():
                raise SaesteerError(f"{option} {shown} is a folder, not a file")
            target = path
        else:
            target = path.parent
            while not target.exists() and target != target.parent:
                target = target.parent
            if not target.is_dir():
                raise SaesteerError(
                    f"{option} {shown} cannot be created: {short(str(target))} is a file, not a folder"
                )
        if not os.access(target, os.W_OK | (os.X_OK if target.is_dir() else 0)):
            raise SaesteerError(
                f"{option} {shown} is not writable (no write permission on {short(str(target))})"
            )
    except (OSError, ValueError) as err:  # a name too long for the file system, a NUL byte, ...
        raise SaesteerError(
            f"{option} {shown} is not a usable path: {getattr(err, 'strerror', None) or err}"
        ) from None


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except SaesteerError as err:
        print(f"saesteer: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("saesteer: interrupted (rerun the same command to resume where supported)", file=sys.stderr)
        sys.exit(130)


def _dist():
    """saesteer.dist, imported when a verb runs (it imports torch)."""
    from saesteer import dist

    return dist


@app.command()
def collect(
    model: str = opt(COLLECT, "model"),
    layer: int = opt(COLLECT, "layer"),
    hook_point: str = opt(COLLECT, "hook_point"),
    data: str = opt(SOURCE, "data"),
    field: str = opt(SOURCE, "field"),
    chat: Optional[str] = opt(SOURCE, "chat"),
    tokens: int = opt(COLLECT, "tokens", min=1),
    passes: int = opt(SOURCE, "passes", min=1),
    ctx: int = opt(COLLECT, "ctx", min=2),
    batch_size: int = opt(COLLECT, "batch_size", min=1),
    contexts_per_shard: int = opt(COLLECT, "contexts_per_shard", min=1),
    dtype: str = opt(COLLECT, "dtype"),
    keep_special: bool = typer.Option(
        not field_default(COLLECT, "drop_special"),
        help="keep BOS/EOS/special-token positions (outlier norms)",
    ),
    device: Optional[str] = opt(COLLECT, "device"),
    out: Path = opt(TRAIN, "activations", help="cache folder (rerun to resume)"),
) -> None:
    """Collect residual-stream activations into a resumable safetensors cache."""
    from saesteer.activations import ActivationStore, CollectConfig
    from saesteer.activations import collect as run_collect
    from saesteer.corpus import TextSource

    _writable_out(out, "dir")
    distributed = _dist().init()
    config = CollectConfig(
        model=model,
        layer=layer,
        hook_point=hook_point,
        tokens=tokens,
        ctx=ctx,
        data=TextSource(data=data, field=field, chat=chat, passes=passes),
        batch_size=batch_size,
        contexts_per_shard=contexts_per_shard,
        dtype=dtype,
        drop_special=not keep_special,
        device=device,
    )
    start = time.perf_counter()
    manifest = run_collect(config, out)
    elapsed = time.perf_counter() - start
    if distributed and not _dist().is_main():
        return
    sample = ActivationStore(out).tensor(max_tokens=20_000)
    norms = sample.norm(dim=-1)
    size = sum((Path(out) / s["file"]).stat().st_size for s in manifest["shards"])
    typer.echo(
        f"collected {manifest['n_tokens']:,} activations of {manifest['model']} "
        f"layer {manifest['layer']} ({manifest['hook_point']}), d_model {manifest['d_model']}\n"
        f"  data       {manifest['data']['data']} (sha256 {manifest['data']['sha256'][:12]})\n"
        f"  contexts   {sum(s['n_contexts'] for s in manifest['shards']):,} x {manifest['ctx']} tokens, "
        f"special positions {'dropped' if manifest['drop_special'] else 'kept'}\n"
        f"  cache      {out} ({len(manifest['shards'])} shards, {size / 2**20:.1f} MiB {manifest['dtype']})\n"
        f"  norms      mean {norms.mean():.1f}, median {norms.median():.1f}, max {norms.max():.1f} "
        f"(on {sample.shape[0]:,} activations)\n"
        f"  time       {elapsed:.1f} s this run"
    )


@app.command()
def train(
    activations: Optional[Path] = opt(TRAIN, "activations", unset=True),
    out: Optional[Path] = opt(TRAIN, "out", unset=True),
    config: Optional[Path] = typer.Option(
        None, help="JSON file of TrainConfig fields; flags given here override it"
    ),
    n_latents: Optional[int] = opt(TRAIN, "n_latents", unset=True),
    expansion_factor: Optional[int] = opt(TRAIN, "expansion_factor", unset=True),
    k: Optional[int] = opt(TRAIN, "k", unset=True),
    batch_size: Optional[int] = opt(TRAIN, "batch_size", unset=True),
    tokens: Optional[int] = opt(TRAIN, "total_tokens", unset=True),
    lr: Optional[float] = opt(TRAIN, "lr", unset=True),
    warmup_steps: Optional[int] = opt(TRAIN, "warmup_steps", unset=True),
    auxk_coef: Optional[float] = opt(TRAIN, "auxk_coef", unset=True),
    dead_tokens: Optional[int] = opt(TRAIN, "dead_tokens", unset=True),
    seed: Optional[int] = opt(TRAIN, "seed", unset=True),
    dtype: Optional[str] = opt(TRAIN, "dtype", unset=True),
    checkpoint_every: Optional[int] = opt(TRAIN, "checkpoint_every", unset=True),
    resume: bool = opt(TRAIN, "resume"),
    device: Optional[str] = opt(TRAIN, "device", unset=True),
) -> None:
    """Train a TopK SAE on cached activations (run under torchrun for data parallelism)."""
    from saesteer.trainer import TrainConfig
    from saesteer.trainer import train as run_train

    flags = dict(
        activations=activations,
        out=out,
        n_latents=n_latents,
        expansion_factor=expansion_factor,
        k=k,
        batch_size=batch_size,
        total_tokens=tokens,
        lr=lr,
        warmup_steps=warmup_steps,
        auxk_coef=auxk_coef,
        dead_tokens=dead_tokens,
        seed=seed,
        dtype=dtype,
        checkpoint_every=checkpoint_every,
        device=device,
    )
    overrides = {name: str(v) if isinstance(v, Path) else v for name, v in flags.items() if v is not None}
    if resume:
        overrides["resume"] = True
    cfg = TrainConfig.from_json(config, **overrides) if config else TrainConfig(**overrides)
    _writable_out(cfg.out, "dir")
    distributed = _dist().init()
    start = time.perf_counter()
    result = run_train(cfg)
    if distributed and not _dist().is_main():
        return
    sae, tail = result.sae, result.losses[-20:]
    loss = (
        f"{sum(tail) / len(tail):.4f} (mean of the last {len(tail)} steps)"
        if tail
        else "n/a (already trained)"
    )
    typer.echo(
        f"trained TopK SAE d_in {sae.cfg.d_in} x {sae.cfg.n_latents} latents, k {sae.cfg.k}, "
        f"{sae.cfg.training_tokens:,} tokens ({result.steps} steps)\n"
        f"  loss       {loss}\n"
        f"  saved      {Path(cfg.out) / 'sae'} (SAELens format), checkpoint {Path(cfg.out) / 'checkpoint.safetensors'}\n"
        f"  time       {time.perf_counter() - start:.1f} s this run"
    )


@app.command("evaluate-sae")
def evaluate_sae(
    sae: str = opt(SAE_EVAL, "sae", default=...),
    model: Optional[str] = opt(SAE_EVAL, "model"),
    data: Optional[str] = opt(SAE_EVAL, "data"),
    contexts: int = opt(SAE_EVAL, "contexts", min=1),
    ctx: Optional[int] = opt(SAE_EVAL, "ctx", min=2),
    batch_size: int = opt(SAE_EVAL, "batch_size", min=1),
    device: Optional[str] = _DEVICE,
    out: Optional[Path] = opt(SAE_EVAL, "out"),
) -> None:
    """Held-out FVU, L0, dead/dense latents, and CE loss / loss recovered / KL with the SAE spliced in."""
    from saesteer.config import SAEEvalConfig
    from saesteer.trainer import evaluate_sae as run_evaluate

    _writable_out(out, "file")
    m = run_evaluate(
        SAEEvalConfig(
            sae=sae,
            model=model,
            data=data,
            contexts=contexts,
            ctx=ctx,
            batch_size=batch_size,
            device=device,
            out=str(out) if out else None,
        )
    )
    typer.echo(
        f"SAE {sae} at layer {m['layer']} ({m['hook_point']}) of {m['model']}, "
        f"{int(m['tokens']):,} held-out activations, {int(m['predictions']):,} next-token predictions\n"
        f"  FVU             {m['fvu']:.4f}\n"
        f"  L0              {m['l0']:.1f}\n"
        f"  dead latents    {m['dead_frac']:.1%} (never fired on these tokens)\n"
        f"  dense latents   {m['dense_frac']:.1%} (fire on >10% of tokens)\n"
        f"  CE clean        {m['ce_clean']:.4f}\n"
        f"  CE with SAE     {m['ce_sae']:.4f}\n"
        f"  CE zero-ablated {m['ce_zero']:.4f}\n"
        f"  loss recovered  {m['loss_recovered']:.1%}\n"
        f"  KL(clean||SAE)  {m['kl_sae']:.4f}"
    )


@app.command()
def steer(
    steering: str = typer.Option(..., help="preset name, JSON spec, or JSON file (see README)"),
    prompt: list[str] = typer.Option(..., help="user prompt (repeat for several)"),
    model: str = _MODEL,
    max_new_tokens: int = typer.Option(60, min=1, help="tokens to generate per reply"),
    device: Optional[str] = _DEVICE,
    dtype: Optional[str] = _DTYPE,
) -> None:
    """Chat with a steered model: unsteered and steered replies side by side."""
    from saesteer.models import load_model
    from saesteer.steering import generate, parse_steering

    method = parse_steering(steering)
    loaded = load_model(model, device=device, dtype=dtype)
    plain = generate(loaded, prompt, None, max_new_tokens)
    steered = generate(loaded, prompt, method, max_new_tokens)
    for question, before, after in zip(prompt, plain, steered):
        typer.echo(
            f"\n>>> {question}\n--- unsteered ---\n{before.strip()}\n--- steered ({method.method}) ---\n{after.strip()}"
        )


def _numbers(text: str, option: str, kind: type = float) -> list:
    """Comma-separated finite numbers, or a one-line error naming the option."""
    try:
        numbers = [kind(v) for v in text.split(",")]
    except ValueError:
        numbers = []
    if not numbers or not all(math.isfinite(v) for v in numbers):
        raise SaesteerError(
            f"bad {option} {short(text)!r}: use finite numbers separated by commas, e.g. 8,16"
        )
    return numbers


@app.command()
def discover(
    sae: Path = typer.Option(..., help=field_docs("saesteer.config", "DiscoverConfig")["sae"].help),
    model: str = _MODEL,
    n_candidates: int = opt(DISCOVER, "n_candidates", min=0),
    n_attribution: int = opt(DISCOVER, "n_attribution", min=0),
    attribution_prompts: int = opt(DISCOVER, "attribution_prompts", min=1),
    screen_values: str = opt(
        DISCOVER,
        "screen_values",
        default=_shown(field_default(DISCOVER, "screen_values")),
        more="(comma-separated)",
    ),
    screen_prompts: int = opt(DISCOVER, "screen_prompts", min=1),
    limit: Optional[int] = opt(DISCOVER, "limit", min=1),
    max_new_tokens: int = opt(DISCOVER, "max_new_tokens", min=1),
    detector_layer: int = opt(DISCOVER, "detector_layer"),
    detector_recall: float = opt(DISCOVER, "detector_recall", min=0.0, max=1.0),
    detector_negatives: Optional[int] = opt(DISCOVER, "detector_negatives", min=1),
    alpaca_harmless: int = opt(DISCOVER, "alpaca_harmless"),
    judge: str = opt(DISCOVER, "judge"),
    out: Path = opt(DISCOVER, "out"),
    device: Optional[str] = _DEVICE,
) -> None:
    """Find refusal features (AdvBench + XSTest TRAIN splits only) and an unrelated control feature."""
    from saesteer.config import DiscoverConfig
    from saesteer.features import discover as run_discover
    from saesteer.features import summary_markdown

    _writable_out(out, "dir")
    config = DiscoverConfig(
        n_candidates=n_candidates,
        n_attribution=n_attribution,
        attribution_prompts=attribution_prompts,
        screen_prompts=screen_prompts,
        max_new_tokens=max_new_tokens,
        screen_values=tuple(_numbers(screen_values, "--screen-values")),
        sae=str(sae),
        model=model,
        limit=limit,
        detector_layer=detector_layer,
        detector_recall=detector_recall,
        detector_negatives=detector_negatives,
        alpaca_harmless=alpaca_harmless,
        judge=judge,
        out=str(out),
        device=device,
    )
    result = run_discover(config)
    best = result["candidates"][0] if result["candidates"] else None
    typer.echo(summary_markdown(result).split("\n## ")[0])
    if best:
        typer.echo(
            f"best candidate: feature {best['feature']}; wrote {out / 'discovery.json'} and {out / 'discovery.md'}"
        )


@app.command()
def fit(
    values: str = typer.Option(
        ..., help="starting clamp values, comma-separated (one value: for every feature)"
    ),
    features: Optional[str] = typer.Option(
        None, help="SAE features to clamp together, comma-separated, e.g. 5730,5904"
    ),
    candidates: int = typer.Option(
        0,
        min=0,
        help="instead of --features: the features with the largest attribution toward a complete refusal "
        "on the same train prompts",
    ),
    sae: str = typer.Option("builtin:sae", help="SAE folder, or builtin:sae (the shipped one)"),
    model: str = _MODEL,
    decay: float = typer.Option(
        1.0, help="the clamp's schedule while generating: decay**t on generated token t"
    ),
    limit: int = typer.Option(
        16,
        min=1,
        help="harmful TRAIN prompts per set (advbench, xstest_unsafe, hh_rlhf_harmful, written_harmful)",
    ),
    steps: int = opt(FIT, "steps", min=0),
    lr: float = opt(FIT, "lr", min=0.0),
    l1: float = opt(FIT, "l1", min=0.0),
    batch_size: int = opt(FIT, "batch_size", min=1),
    out: Path = typer.Option(
        Path("runs/fit"), help="folder for steering.json (the fitted spec) and fit.json"
    ),
    device: Optional[str] = _DEVICE,
) -> None:
    """Fit clamp values on TRAIN prompts by gradient descent so the clamped model replies with a complete
    refusal and then ends its turn; writes a steering spec to evaluate like any other."""
    import json
    from dataclasses import asdict

    from saesteer.artefacts import load_sae
    from saesteer.evalsets import safety_prompts
    from saesteer.features import FIT_SETS, FitConfig, fit_clamp_values, refusal_candidates
    from saesteer.models import load_model
    from saesteer.steering import SAESteer, check_sae_fits, steering_from_dict

    _writable_out(out, "dir")
    if (features is None) == (candidates == 0):
        raise SaesteerError("give either --features or --candidates")
    starts = _numbers(values, "--values")
    given = _numbers(features, "--features", int) if features is not None else None
    if len(starts) not in (1, len(given or starts)) or any(v < 0 for v in starts):
        raise SaesteerError("--values: one value >= 0 for every feature, or a single value for all")
    SAESteer(
        sae=sae, features=[0], values=starts[:1], decay=decay
    )  # a bad value or decay fails before loading
    loaded = load_model(model, device=device)
    autoencoder = load_sae(sae).to(loaded.device)
    check_sae_fits(autoencoder, loaded)
    prompts = [p.text for name in FIT_SETS for p in safety_prompts(name, "train")[:limit]]
    chosen = given or refusal_candidates(loaded, autoencoder, prompts, candidates, batch_size)
    starts = starts * len(chosen) if len(starts) == 1 else starts
    start = SAESteer(sae=sae, features=chosen, values=starts, decay=decay)
    config = FitConfig(steps=steps, lr=lr, l1=l1, batch_size=batch_size)
    result = fit_clamp_values(loaded, autoencoder, start.features, start.values, prompts, decay, config)
    spec = steering_from_dict({**start.to_dict(), "values": result["values"]}).to_dict()
    out.mkdir(parents=True, exist_ok=True)
    (out / "steering.json").write_text(json.dumps(spec, indent=1))
    record = {"start": start.to_dict(), "config": asdict(config), "limit": limit, "n_prompts": len(prompts)}
    (out / "fit.json").write_text(json.dumps({**record, **result}, indent=1))
    typer.echo(
        f"values {start.values} -> {result['values']}; mean NLL per refusal token "
        f"{result['initial_loss']:.3f} -> {result['final_loss']:.3f} on {len(prompts)} train prompts; "
        f"wrote {out / 'steering.json'}"
    )


@app.command()
def gate(
    model: str = _MODEL,
    out: Path = opt(GATE, "out"),
    sae: Optional[str] = opt(GATE, "sae"),
    max_fpr: float = opt(GATE, "max_fpr"),
    limit: Optional[int] = opt(GATE, "limit", min=1),
    baseline: Optional[str] = opt(GATE, "baseline"),
    ship: bool = typer.Option(
        False,
        help="install the chosen gate in the shipped `refusal_conditional` preset (replaced "
        "presets stay as <name>_previous)",
    ),
    steering: Optional[str] = typer.Option(
        None,
        help="with --ship: the steering the gate turns on, also shipped as `refusal` "
        "(default: keep refusal_conditional's)",
    ),
    device: Optional[str] = _DEVICE,
) -> None:
    """Train harm detectors for conditional steering, validate them leave-one-source-out, keep the one with
    the best worst fold, set its threshold with a 95% false-positive guarantee, and score it on TEST."""
    from saesteer.artefacts import shipped_dir
    from saesteer.config import GateConfig
    from saesteer.gate import gate as run_gate_stage
    from saesteer.gate import ship_gate
    from saesteer.steering import parse_steering

    _writable_out(out, "dir")
    config = GateConfig(
        sae=sae or None,
        max_fpr=max_fpr,
        limit=limit,
        model=model,
        out=str(out),
        baseline=baseline,
        device=device,
    )
    summary = run_gate_stage(config)
    typer.echo((out / "gate.md").read_text())
    typer.echo(
        f"chosen {summary['chosen']}: wrote {out / 'detector.safetensors'} (threshold {summary['threshold']['threshold']:.4g})"
    )
    if ship:
        inner = parse_steering(steering).to_dict() if steering else None
        preset = ship_gate(
            out / "detector.safetensors", summary["threshold"]["threshold"], shipped_dir(), inner
        )
        typer.echo(
            f"refusal_conditional now gates with {preset['detector']} at threshold {preset['threshold']:.4g}"
        )


def _eval_config(
    model: str,
    suite: str,
    limit: str,
    split: str,
    seed: int,
    max_new_tokens: int,
    batch_size: int,
    gsm8k_max_new_tokens: int,
    mmlu_shots: int,
    prompts: Optional[Path],
    label: Optional[str],
    column: Optional[str],
):
    from saesteer.evals import Decoding, EvalConfig, parse_limits, parse_suites
    from saesteer.evalsets import load_prompt_file

    if (prompts is None) != (label is None):
        raise SaesteerError("--prompts and --label go together (--label unsafe or safe)")
    user = load_prompt_file(prompts, label, column) if prompts else None
    default_limit, limits = parse_limits(limit)
    return EvalConfig(
        model=model,
        suites=parse_suites(suite),
        split=split,
        limit=default_limit,
        limits=limits,
        seed=seed,
        decoding=Decoding(max_new_tokens, batch_size),
        gsm8k_max_new_tokens=gsm8k_max_new_tokens,
        mmlu_shots=mmlu_shots,
        user_prompts=user,
        user_prompts_name=f"user:{prompts.name}" if prompts else None,
    )


_EVAL_OPTIONS = dict(
    model=opt(EVAL, "model"),
    suite=opt(
        EVAL,
        "suites",
        default=_shown(field_default(EVAL, "suites")),
        help="safety, capability, jailbreak, fidelity, all, or a comma-separated list",
    ),
    limit=opt(
        EVAL,
        "limit",
        default=str(field_default(EVAL, "limit")),
        help="items per dataset (seeded sample), 0 = all; per-dataset: 50,mmlu=100,gsm8k=20",
    ),
    split=opt(EVAL, "split"),
    prompts=typer.Option(
        None, help="your own prompts (.csv, .jsonl or .txt) instead of the built-in safety sets"
    ),
    label=typer.Option(None, help="label of --prompts: unsafe or safe"),
    column=typer.Option(None, help="prompt column of --prompts (case-insensitive; default: prompt/goal/...)"),
    judge=typer.Option(
        "string",
        help="string, strict (apology + offer of help = compliance), a local chat model spec, or openai:<base url>/v1:<model>",
    ),
    agreement_sample=typer.Option(
        50, min=0, help="with an LLM judge: replies re-judged by the string judge for kappa"
    ),
    seed=opt(EVAL, "seed"),
    max_new_tokens=opt(DECODING, "max_new_tokens", min=1),
    batch_size=opt(DECODING, "batch_size", min=1),
    gsm8k_max_new_tokens=opt(EVAL, "gsm8k_max_new_tokens", min=1),
    mmlu_shots=opt(EVAL, "mmlu_shots", min=0),
    cache=typer.Option(None, help="generation cache file (default: <out>.cache.jsonl)"),
    device=_DEVICE,
    dtype=_DTYPE,
)


@app.command("eval")
def eval_command(
    model: str = _EVAL_OPTIONS["model"],
    steering: Optional[str] = typer.Option(
        None, help="JSON string, JSON file or method name (default: unsteered)"
    ),
    suite: str = _EVAL_OPTIONS["suite"],
    limit: str = _EVAL_OPTIONS["limit"],
    split: str = _EVAL_OPTIONS["split"],
    out: Path = typer.Option(Path("runs/eval.jsonl"), help="results JSONL (rows are appended)"),
    replies: Optional[Path] = typer.Option(
        None, help="also write every judged reply (prompt, reply, verdict) to this JSONL"
    ),
    prompts: Optional[Path] = _EVAL_OPTIONS["prompts"],
    label: Optional[str] = _EVAL_OPTIONS["label"],
    column: Optional[str] = _EVAL_OPTIONS["column"],
    judge: str = _EVAL_OPTIONS["judge"],
    agreement_sample: int = _EVAL_OPTIONS["agreement_sample"],
    attacker: Optional[str] = typer.Option(
        None,
        help="Crescendo attacker: local chat model spec or openai:<url>/v1:<model> "
        "(default: the built-in templated escalation)",
    ),
    jailbreak_turns: int = opt(EVAL, "jailbreak_turns", min=1),
    seed: int = _EVAL_OPTIONS["seed"],
    max_new_tokens: int = _EVAL_OPTIONS["max_new_tokens"],
    batch_size: int = _EVAL_OPTIONS["batch_size"],
    gsm8k_max_new_tokens: int = _EVAL_OPTIONS["gsm8k_max_new_tokens"],
    mmlu_shots: int = _EVAL_OPTIONS["mmlu_shots"],
    cache: Optional[Path] = _EVAL_OPTIONS["cache"],
    device: Optional[str] = _EVAL_OPTIONS["device"],
    dtype: Optional[str] = _EVAL_OPTIONS["dtype"],
) -> None:
    """Evaluate one steering config: safety, capability, jailbreak and fidelity suites with 95% CIs."""
    from saesteer.cache import ResultCache
    from saesteer.evals import (
        SteeredModel,
        agreement_rows,
        append_rows,
        evaluate,
        summary_table,
        write_judged,
    )
    from saesteer.judges import StringMatchJudge, load_judge
    from saesteer.models import load_model, pick_dtype
    from saesteer.steering import parse_steering

    for path in (out, replies, cache or Path(f"{out}.cache.jsonl")):
        _writable_out(path, "file", "--out" if path == out else "--replies" if path == replies else "--cache")
    pick_dtype(None, dtype)  # a bad --dtype fails before the judge or the model loads
    _dist().init()
    method = parse_steering(steering)  # the spec's one parse: evals carry this object to the engine
    config = _eval_config(
        model,
        suite,
        limit,
        split,
        seed,
        max_new_tokens,
        batch_size,
        gsm8k_max_new_tokens,
        mmlu_shots,
        prompts,
        label,
        column,
    )
    config.jailbreak_turns = jailbreak_turns
    the_judge = load_judge(judge, device=device)
    if attacker:
        from saesteer.judges import load_chat_backend

        config.attacker = load_chat_backend(attacker, max_tokens=96, device=device)
    loaded = load_model(model, device=device, dtype=dtype)
    steered = SteeredModel(loaded, method, ResultCache(cache or Path(f"{out}.cache.jsonl")))
    run = evaluate(steered, config, the_judge)
    if judge != "string" and agreement_sample > 0 and run.judged:
        run.rows += agreement_rows(run, StringMatchJudge(), agreement_sample)
    append_rows(out, run.rows)
    if replies and _dist().is_main():
        write_judged(replies, run)
    if _dist().is_main():
        typer.echo(summary_table(run.rows, run.walls))
        typer.echo(
            f"wrote {len(run.rows)} rows to {out} (cache: {steered.cache.hits} hits, {steered.cache.misses} misses)"
        )


@app.command()
def sweep(
    grid: Path = opt(SWEEP, "grid", default=...),
    model: str = _EVAL_OPTIONS["model"],
    suite: str = _EVAL_OPTIONS["suite"],
    limit: str = _EVAL_OPTIONS["limit"],
    split: str = typer.Option(
        "validation", help="train, validation or test (sweeps choose settings: validation)"
    ),
    out: Path = opt(SWEEP, "out"),
    prompts: Optional[Path] = _EVAL_OPTIONS["prompts"],
    label: Optional[str] = _EVAL_OPTIONS["label"],
    column: Optional[str] = _EVAL_OPTIONS["column"],
    judge: str = _EVAL_OPTIONS["judge"],
    seed: int = _EVAL_OPTIONS["seed"],
    max_new_tokens: int = _EVAL_OPTIONS["max_new_tokens"],
    batch_size: int = _EVAL_OPTIONS["batch_size"],
    gsm8k_max_new_tokens: int = _EVAL_OPTIONS["gsm8k_max_new_tokens"],
    mmlu_shots: int = _EVAL_OPTIONS["mmlu_shots"],
    cache: Optional[Path] = _EVAL_OPTIONS["cache"],
    device: Optional[str] = _EVAL_OPTIONS["device"],
    dtype: Optional[str] = _EVAL_OPTIONS["dtype"],
) -> None:
    """Evaluate a grid of steering configs; resumable (cached generations, finished configs skipped)."""
    from saesteer.cache import ResultCache
    from saesteer.config import SweepConfig
    from saesteer.evals import load_sweep_file, read_rows, summary_table
    from saesteer.evals import sweep as run_sweep
    from saesteer.models import pick_dtype

    _writable_out(out, "file")
    _writable_out(cache or Path(f"{out}.cache.jsonl"), "file", "--cache")
    pick_dtype(None, dtype)  # a bad --dtype fails before the judge or the model loads
    _dist().init()
    steerings = load_sweep_file(grid)
    config = SweepConfig(
        grid=str(grid),
        eval=_eval_config(
            model,
            suite,
            limit,
            split,
            seed,
            max_new_tokens,
            batch_size,
            gsm8k_max_new_tokens,
            mmlu_shots,
            prompts,
            label,
            column,
        ),
        out=str(out),
        cache=str(cache) if cache else None,
        judge=judge,
        device=device,
        dtype=dtype,
    )
    store = ResultCache(cache or Path(f"{out}.cache.jsonl"))
    start = time.perf_counter()
    new = run_sweep(config, cache=store, steerings=steerings)
    if _dist().is_main():
        typer.echo(summary_table(read_rows(out)))
        typer.echo(
            f"{len(steerings)} configs, {len(new)} new rows in {out} in {time.perf_counter() - start:.1f} s "
            f"(cache: {store.hits} hits, {store.misses} misses)"
        )


@app.command()
def report(
    results: list[Path] = typer.Option(..., help="eval/sweep results JSONL (repeat for several files)"),
    discovery: Optional[Path] = typer.Option(
        None, help="discovery.json from `saesteer discover` (feature dashboards)"
    ),
    examples: Optional[Path] = typer.Option(
        None, help="example generations JSONL (saesteer.report.write_examples)"
    ),
    out: Path = typer.Option(Path("runs/report"), help="folder for report.html, report.md and the plot PNGs"),
    title: str = typer.Option("saesteer report", help="title of the report"),
    screenshot: bool = typer.Option(
        False, help="also render report.html in headless Chromium to report.png and check it"
    ),
) -> None:
    """HTML + Markdown report: results with 95% CIs, trade-off and capability plots, examples, feature dashboards."""
    from saesteer.report import build_report
    from saesteer.report import screenshot as take_screenshot

    _writable_out(out, "dir")
    html_path, md_path = build_report(results, out, discovery, examples, title)
    typer.echo(f"HTML:     {html_path}\nMarkdown: {md_path}")
    if screenshot:
        typer.echo(f"screenshot: {take_screenshot(html_path, out / 'report.png')}")


@app.command()
def serve(
    model: str = _MODEL,
    host: str = typer.Option(
        "127.0.0.1", help="interface to listen on (0.0.0.0 opens the server to the network)"
    ),
    port: int = typer.Option(
        8000, min=1, max=65535, help="TCP port (1-65535, checked before the model loads)"
    ),
    steering: Optional[str] = opt(SERVE, "steering"),
    max_tokens: int = opt(SERVE, "max_tokens"),
    default_max_tokens: int = opt(SERVE, "default_max_tokens"),
    max_prompt_tokens: int = opt(SERVE, "max_prompt_tokens"),
    max_batch_size: int = opt(SERVE, "max_batch_size", min=1),
    allow_dir: list[Path] = opt(SERVE, "allow_dirs", more="(repeatable)"),
    api_key: Optional[str] = opt(SERVE, "api_key", envvar="SAESTEER_API_KEY"),
    device: Optional[str] = _DEVICE,
    dtype: Optional[str] = _DTYPE,
) -> None:
    """Serve the model behind an OpenAI-compatible chat API with per-request steering."""
    try:
        import uvicorn

        from saesteer.serve import ServeConfig, create_app
    except ImportError as err:
        raise SaesteerError(f"the server needs {err.name}: pip install 'saesteer[serve]'") from None
    from saesteer.models import load_model

    missing = [str(d) for d in allow_dir if not d.is_dir()]
    if missing:
        raise SaesteerError(f"--allow-dir {short(missing[0])} is not a folder")
    config = ServeConfig(
        steering=steering,
        max_tokens=max_tokens,
        default_max_tokens=default_max_tokens,
        max_prompt_tokens=max_prompt_tokens,
        max_batch_size=max_batch_size,
        allow_dirs=[str(d) for d in allow_dir],
        api_key=api_key,
    )
    uvicorn.run(create_app(load_model(model, device=device, dtype=dtype), config), host=host, port=port)


@app.command()
def reproduce(
    preset: str = typer.Option(
        "full", help="full (the reported run), quick (smaller n) or tiny (CI smoke test)"
    ),
    quick: bool = typer.Option(False, "--quick", help="shorthand for --preset quick"),
    out: Optional[Path] = typer.Option(None, help="output folder (default: runs/reproduce[-quick|-tiny])"),
    shared: Optional[Path] = opt(
        REPRODUCE,
        "shared",
        default=None,
        more="(default: $SAESTEER_SHARED_DATA, else the repo's ../shared/datasets)",
    ),
    layer: Optional[int] = typer.Option(None, help="skip the layer scan and use this layer"),
    ship: Optional[Path] = typer.Option(
        None,
        help="also export the SAE, directions and chosen presets to this folder "
        "(src/saesteer/assets/shipped to update the shipped artefacts)",
    ),
) -> None:
    """The paper's experiment end to end: layer scan, SAE, discovery (train), choices (validation), all methods
    on test splits, results.md and the trade-off plot. Rerun to resume after a crash."""
    from dataclasses import replace

    from saesteer.evalsets import shared_dir
    from saesteer.reproduce import PRESETS
    from saesteer.reproduce import reproduce as run_reproduce

    name = "quick" if quick else preset
    if name not in PRESETS:
        raise SaesteerError(f"unknown preset {short(name)!r}: use {', '.join(PRESETS)}")
    shared = shared or shared_dir()
    if not (shared / "corpus").is_dir():
        raise SaesteerError(
            f"{short(str(shared))} has no corpus/ folder: reproduce trains its SAE on a corpus that is not shipped; "
            "pass --shared <folder with corpus/ and hh_rlhf_harmless/> (the project's shared datasets)"
        )
    config = replace(PRESETS[name], shared=str(shared))
    if out is not None:
        config = replace(config, out=str(out))
    if layer is not None:
        config = replace(config, layer=layer, scan=None)
    _writable_out(config.out, "dir")
    _writable_out(ship, "dir", "--ship")
    start = time.perf_counter()
    results = run_reproduce(config, ship)
    typer.echo(
        f"\nwrote {results} and {results.parent / 'tradeoff.png'} in {time.perf_counter() - start:.0f} s"
    )


@app.command()
def audit(
    labels: Path = typer.Argument(
        ..., help="JSONL of judged replies (from eval --replies), each given a 'human' label"
    ),
) -> None:
    """Check a judge against a person. Rows whose `human` label is a quality category (clear_refusal,
    degenerate, ...): Cohen's kappa of the quality judge per category. Otherwise: how the human labels
    split among replies the refusal judge called refusal / not."""
    from saesteer.evals import read_rows
    from saesteer.judges import QUALITY_CATEGORIES
    from saesteer.scoring import audit_summary, quality_agreement

    rows = read_rows(labels)
    if rows and all(r.get("human") in QUALITY_CATEGORIES.get(r.get("label"), ()) for r in rows):
        typer.echo(f"{'category':<18} {'human':>6} {'judge':>6} {'agree':>7}  Cohen's kappa [95% CI]")
        for s in quality_agreement(rows):
            typer.echo(
                f"{s['category']:<18} {s['human']:>6} {s['judge']:>6} {100 * s['agreement']:>6.1f}%  "
                f"{s['kappa']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"
            )
        return
    summary = audit_summary(rows)
    typer.echo(f"{'judge':<12} {'human label':<22} {'count':>9}  share [95% CI]")
    for s in summary:
        typer.echo(
            f"{s['judge']:<12} {s['human']:<22} {s['count']:>4} / {s['of']:<3}  "
            f"{100 * s['share']:.1f}% [{100 * s['ci_low']:.1f}, {100 * s['ci_high']:.1f}]"
        )


@app.command()
def demo(
    model: str = opt(DEMO, "model"),
    dtype: Optional[str] = opt(DEMO, "dtype"),
    out: Path = opt(DEMO, "out"),
    method: list[str] = opt(DEMO, "methods", more="(repeat)"),
    examples: int = opt(DEMO, "examples", min=0),
    limit: int = opt(DEMO, "limit", min=1),
    max_new_tokens: int = opt(DEMO, "max_new_tokens", min=1),
    train_sae: bool = opt(DEMO, "train_sae"),
) -> None:
    """Offline demo: unsteered vs steered replies, a small safety eval with 95% CIs, and the HTML report."""
    from saesteer.demo import DemoConfig, run_demo

    _writable_out(out, "dir")
    start = time.perf_counter()
    html_path, md_path = run_demo(
        DemoConfig(
            model=model,
            dtype=dtype,
            out=str(out),
            methods=tuple(method),
            examples=examples,
            limit=limit,
            max_new_tokens=max_new_tokens,
            train_sae=train_sae,
        )
    )
    typer.echo(
        f"\nreport: {html_path.resolve()}\n        {md_path.resolve()}\n({time.perf_counter() - start:.0f} s)"
    )
