"""The `saesteer` command line: one verb per pipeline stage."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from saesteer.errors import SaesteerError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Steer a chat LLM's refusal behaviour with sparse-autoencoder features.")


@app.callback()
def _root() -> None:
    """Steer a chat LLM's refusal behaviour with sparse-autoencoder features."""


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


@app.command()
def collect(
    model: str = typer.Option("smollm2-135m-instruct", help="default alias, hub id, local folder or .gguf file"),
    layer: int = typer.Option(10, help="decoder layer whose residual stream is collected"),
    hook_point: str = typer.Option("resid_post", help="resid_post (layer output) or resid_pre (layer input)"),
    data: str = typer.Option("builtin:corpus-slice", help="file/folder of .txt/.jsonl/.json(.gz), or hf:<dataset id>"),
    field: str = typer.Option("text", help="text field of JSON records"),
    chat: Optional[str] = typer.Option(None, help="'prompt_field,response_field': chat-format records with the model's template"),
    tokens: int = typer.Option(100_000, help="model input tokens to process"),
    ctx: int = typer.Option(256, help="context length (each starts with BOS)"),
    batch_size: int = typer.Option(8, help="contexts per forward pass"),
    contexts_per_shard: int = typer.Option(256, help="contexts per safetensors shard"),
    dtype: str = typer.Option("bfloat16", help="cache dtype: bfloat16 or float16"),
    keep_special: bool = typer.Option(False, help="keep BOS/EOS/special-token positions (outlier norms)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, mps (default: best available)"),
    out: Path = typer.Option(Path("runs/activations"), help="cache folder (rerun to resume)"),
) -> None:
    """Collect residual-stream activations into a resumable safetensors cache."""
    from saesteer.activations import ActivationStore, CollectConfig
    from saesteer.activations import collect as run_collect
    from saesteer.corpus import TextSource

    distributed = _init_distributed()
    config = CollectConfig(model=model, layer=layer, hook_point=hook_point, tokens=tokens, ctx=ctx,
                           data=TextSource(data=data, field=field, chat=chat), batch_size=batch_size,
                           contexts_per_shard=contexts_per_shard, dtype=dtype, drop_special=not keep_special, device=device)
    start = time.perf_counter()
    manifest = run_collect(config, out)
    elapsed = time.perf_counter() - start
    if distributed and not _is_rank_zero():
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


def _init_distributed() -> bool:
    """Join the torchrun process group when launched under torchrun."""
    import os

    import torch

    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _is_rank_zero() -> bool:
    import torch

    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
