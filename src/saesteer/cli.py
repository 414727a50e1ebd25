"""The `saesteer` command line: one verb per pipeline stage."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from saesteer.config import (
    DEFAULT_MODEL,
    CollectConfig,
    DemoConfig,
    DiscoverConfig,
    EvaluateConfig,
    FitConfig,
    GateConfig,
    ReportConfig,
    ReproduceConfig,
    SAEEvalConfig,
    ServeConfig,
    SweepConfig,
    TrainConfig,
)
from saesteer.errors import SaesteerError, short
from saesteer.options import command, help_of

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "{field: [values]}" stays as written
    help="Steer a chat LLM's refusal behaviour with sparse-autoencoder features.",
)

# Options of verbs without a config of their own (steer, serve) mean what CollectConfig means by them.
_MODEL = typer.Option(DEFAULT_MODEL, help=help_of(CollectConfig, "model"))
_DEVICE = typer.Option(None, help=help_of(CollectConfig, "device"))
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
        if target.is_dir():  # permissions can pass where writing fails (a read-only or virtual file system)
            tempfile.TemporaryFile(dir=target).close()
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


@command(app, CollectConfig)
def collect(
    config: CollectConfig,
    out: Path = typer.Option(Path(TrainConfig.activations), help="cache folder (rerun to resume)"),
) -> None:
    """Collect residual-stream activations into a resumable safetensors cache."""
    from saesteer.activations import ActivationStore
    from saesteer.activations import collect as run_collect

    _writable_out(out, "dir")
    distributed = _dist().init()
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


@command(app, TrainConfig)
def train(cfg: TrainConfig) -> None:
    """Train a TopK SAE on cached activations, or on activations streamed from --model (run under torchrun for
    data parallelism)."""
    from saesteer.trainer import train as run_train

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


@command(app, SAEEvalConfig, "evaluate-sae")
def evaluate_sae(config: SAEEvalConfig) -> None:
    """Held-out FVU, L0, dead/dense latents, and CE loss / loss recovered / KL with the SAE spliced in."""
    from saesteer.trainer import evaluate_sae as run_evaluate

    _writable_out(config.out, "file")
    m = run_evaluate(config)
    typer.echo(
        f"SAE {config.sae} at layer {m['layer']} ({m['hook_point']}) of {m['model']}, "
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


@command(app, DiscoverConfig)
def discover(config: DiscoverConfig) -> None:
    """Find refusal features (AdvBench + XSTest TRAIN splits only) and an unrelated control feature."""
    from saesteer.features import discover as run_discover
    from saesteer.features import summary_markdown

    _writable_out(config.out, "dir")
    found = run_discover(config)
    best = found.candidates[0] if found.candidates else None
    typer.echo(summary_markdown(found).split("\n## ")[0])
    if best:
        typer.echo(
            f"best candidate: feature {best['feature']}; wrote {Path(config.out) / 'discovery.json'} and "
            f"{Path(config.out) / 'discovery.md'}"
        )


@command(app, FitConfig)
def fit(config: FitConfig) -> None:
    """Fit clamp values on TRAIN prompts by gradient descent so the clamped model replies with a complete
    refusal and then ends its turn; writes a steering spec to evaluate like any other."""
    from saesteer.features import fit as run_fit

    _writable_out(config.out, "dir")
    record = run_fit(config)
    typer.echo(
        f"values {record['start']['values']} -> {record['values']}; mean NLL per refusal token "
        f"{record['initial_loss']:.3f} -> {record['final_loss']:.3f} on {record['n_prompts']} train prompts; "
        f"wrote {Path(config.out) / 'steering.json'}"
    )


@command(app, GateConfig)
def gate(
    config: GateConfig,
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
) -> None:
    """Train harm detectors for conditional steering, validate them leave-one-source-out, keep the one with
    the best worst fold, set its threshold with a 95% false-positive guarantee, and score it on TEST."""
    from saesteer.artefacts import shipped_dir
    from saesteer.gate import gate as run_gate_stage
    from saesteer.gate import ship_gate
    from saesteer.steering import parse_steering

    out = Path(config.out)
    _writable_out(out, "dir")
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


@command(app, EvaluateConfig, "eval")
def eval_command(config: EvaluateConfig) -> None:
    """Evaluate one steering config: safety, capability, jailbreak and fidelity suites with 95% CIs."""
    from saesteer.evals import evaluate, summary_table
    from saesteer.models import pick_dtype

    cache = config.cache or f"{config.out}.cache.jsonl"
    for path, flag in ((config.out, "--out"), (config.replies, "--replies"), (cache, "--cache")):
        _writable_out(path, "file", flag)
    pick_dtype(None, config.dtype)  # a bad --dtype fails before the judge or the model loads
    _dist().init()
    run = evaluate(config)
    if _dist().is_main():
        typer.echo(summary_table(run.rows, run.walls))
        typer.echo(
            f"wrote {len(run.rows)} rows to {config.out} "
            f"(cache: {run.model.cache.hits} hits, {run.model.cache.misses} misses)"
        )


@command(app, SweepConfig)
def sweep(config: SweepConfig) -> None:
    """Evaluate a grid of steering configs; resumable (cached generations, finished configs skipped)."""
    from saesteer.cache import ResultCache
    from saesteer.evals import load_sweep_file, read_rows, summary_table
    from saesteer.evals import sweep as run_sweep
    from saesteer.models import pick_dtype

    cache = config.cache or f"{config.out}.cache.jsonl"
    _writable_out(config.out, "file")
    _writable_out(cache, "file", "--cache")
    pick_dtype(None, config.dtype)  # a bad --dtype fails before the judge or the model loads
    _dist().init()
    steerings = load_sweep_file(config.grid)
    store = ResultCache(cache)
    start = time.perf_counter()
    new = run_sweep(config, cache=store, steerings=steerings)
    if _dist().is_main():
        typer.echo(summary_table(read_rows(config.out)))
        typer.echo(
            f"{len(steerings)} configs, {len(new)} new rows in {config.out} in {time.perf_counter() - start:.1f} s "
            f"(cache: {store.hits} hits, {store.misses} misses)"
        )


@command(app, ReportConfig)
def report(config: ReportConfig) -> None:
    """HTML + Markdown report: results with 95% CIs, trade-off and capability plots, examples, feature dashboards."""
    from saesteer.report import report as run_report

    _writable_out(config.out, "dir")
    html_path, md_path, png_path = run_report(config)
    typer.echo(
        f"HTML:     {html_path}\nMarkdown: {md_path}" + (f"\nscreenshot: {png_path}" if png_path else "")
    )


@command(app, ServeConfig)
def serve(
    config: ServeConfig,
    model: str = _MODEL,
    host: str = typer.Option(
        "127.0.0.1", help="interface to listen on (0.0.0.0 opens the server to the network)"
    ),
    port: int = typer.Option(
        8000, min=1, max=65535, help="TCP port (1-65535, checked before the model loads)"
    ),
    device: Optional[str] = _DEVICE,
    dtype: Optional[str] = _DTYPE,
) -> None:
    """Serve the model behind an OpenAI-compatible chat API with per-request steering."""
    try:
        import uvicorn

        from saesteer.serve import create_app, uvicorn_options
    except ImportError as err:
        raise SaesteerError(f"the server needs {err.name}: pip install 'saesteer[serve]'") from None
    from saesteer.models import load_model

    if config.api_key is None and os.environ.get("SAESTEER_API_KEY") == "":
        raise SaesteerError("SAESTEER_API_KEY is set but empty: give a non-empty key, or unset it")
    missing = [d for d in config.allow_dirs if not Path(d).is_dir()]
    if missing:
        raise SaesteerError(f"--allow-dir {short(missing[0])} is not a folder")
    try:  # a port in use fails before the model loads (IPv4 or IPv6, as uvicorn binds it)
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as err:
        raise SaesteerError(f"cannot listen on {short(host)}:{port}: {err.strerror or err}") from None
    app = create_app(load_model(model, device=device, dtype=dtype), config)
    uvicorn.run(app, host=host, port=port, **uvicorn_options(config))


@app.command()
def reproduce(
    preset: str = typer.Option(
        "full", help="full (the reported run), quick (smaller n) or tiny (CI smoke test)"
    ),
    quick: bool = typer.Option(False, "--quick", help="shorthand for --preset quick"),
    out: Optional[Path] = typer.Option(None, help="output folder (default: runs/reproduce[-quick|-tiny])"),
    shared: Optional[Path] = typer.Option(
        None,
        help=help_of(ReproduceConfig, "shared")
        + " (default: $SAESTEER_SHARED_DATA, else the repo's ../shared/datasets)",
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


AUDIT_TEXTS = ("human", "label", "verdict", "reply", "prompt")


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

    if not labels.is_file():
        raise SaesteerError(f"no such file: {short(str(labels))}")
    rows = read_rows(labels)
    if not all(isinstance(r, dict) and all(isinstance(r.get(k, ""), str) for k in AUDIT_TEXTS) for r in rows):
        raise SaesteerError(f"audit rows are JSON objects whose {', '.join(AUDIT_TEXTS)} are text")
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


@command(app, DemoConfig)
def demo(config: DemoConfig) -> None:
    """Offline demo: unsteered vs steered replies, a small safety eval with 95% CIs, and the HTML report."""
    from saesteer.demo import run_demo

    _writable_out(config.out, "dir")
    start = time.perf_counter()
    html_path, md_path = run_demo(config)
    typer.echo(
        f"\nreport: {html_path.resolve()}\n        {md_path.resolve()}\n({time.perf_counter() - start:.0f} s)"
    )
