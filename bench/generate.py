"""Greedy generation throughput: the old path (HF `generate` with hooks) against `saesteer.engine`, side by
side in one run, on the same prompts and the real default model.

    python bench/generate.py [--prompts 208] [--tokens 64] [--out results/bench/generate.json]

Rows: old and new at batch 1, 16 and 64, unsteered and under the shipped `refusal` and `refusal_conditional`
presets; the engine at its default `DECODE_ROWS`; K = 1, 4 and 16 distinct SAE steerings sharing one batch;
llama.cpp on the same GGUF when `llama-cpp-python` is installed; and the measured matmul peak, from which the
fp32 compute limit is peak / (2 x weights per token). The replies of old and new at batch 64 are compared
one by one (identical greedy replies). Unless `--no-bf16`: the engine again at `DECODE_ROWS` with the model in
bfloat16 (`--dtype bfloat16`), its own matmul peak and limit, and how many of its replies equal fp32's.
Prompts: validation prompts of the shipped sets (AdvBench, XSTest safe and unsafe, the written pairs) in a
fixed interleaved order, so a conditional steering's gate fires on some of them.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from saesteer.engine import DECODE_ROWS, Engine, Reply
from saesteer.evalsets import safety_prompts
from saesteer.hooks import decoder_layers
from saesteer.models import chat_prompts, load_model, reference_generate, resolve_spec
from saesteer.steering import parse_steering, steering_from_dict

SETS = ("advbench", "xstest_safe", "xstest_unsafe", "written_harmful", "written_benign")
STEERINGS = ("none", "refusal", "refusal_conditional")


def bench_prompts(n: int) -> list[str]:
    pools = [[p.text for p in safety_prompts(name, "validation")] for name in SETS]
    mixed = [pool[i] for i in range(max(map(len, pools))) for pool in pools if i < len(pool)]
    if len(mixed) < n:
        raise SystemExit(f"only {len(mixed)} validation prompts; ask for fewer with --prompts")
    return mixed[:n]


def count_tokens(loaded, replies: list[str]) -> int:
    return sum(len(loaded.tokenizer(r, add_special_tokens=False).input_ids) for r in replies)


def old_path(loaded, steering, rendered, tokens, batch):
    with steering.applied(loaded):
        return reference_generate(loaded, rendered, max_new_tokens=tokens, batch_size=batch)


def new_path(loaded, steering, rendered, tokens, rows):
    ids = [loaded.tokenizer(p, add_special_tokens=False).input_ids for p in rendered]
    replies = [Reply(i, e, tokens) for i, e in zip(ids, steering.row_edits(loaded, ids))]
    Engine(loaded, prefill=min(16, rows), rows=rows).run(replies)
    return loaded.tokenizer.batch_decode([r.tokens for r in replies], skip_special_tokens=True)


def cpu_info() -> dict:
    """The CPU's model name and its bf16 instruction sets, from /proc/cpuinfo where there is one."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = {k.strip(): v.strip() for k, v in fields.items()}
    bf16 = sorted(set(flags.get("flags", "").split()) & {"avx512_bf16", "amx_bf16"})
    return {"cpu": flags.get("model name", ""), "bf16_instructions": bf16}


def timed(fn, *args) -> tuple[list[str], float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def matmul_peak(d_model: int, d_ff: int, dtype: torch.dtype, rows: int = 1024) -> float:
    """GFLOP/s of the model's layer matmul shapes at many rows (the best a forward pass can reach)."""
    best = 0.0
    for n_out, n_in in ((d_model, d_model), (d_ff, d_model), (d_model, d_ff)):
        x, w = torch.randn(rows, n_in, dtype=dtype), torch.randn(n_out, n_in, dtype=dtype)
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        start, reps = time.perf_counter(), 20
        for _ in range(reps):
            torch.nn.functional.linear(x, w)
        best = max(best, 2 * rows * n_in * n_out * reps / (time.perf_counter() - start) / 1e9)
    return best


def flops_per_token(loaded) -> float:
    """2 x the weights a generated token multiplies: every decoder-layer matrix and the output head."""
    layers = sum(p.numel() for p in decoder_layers(loaded.model).parameters() if p.dim() == 2)
    return 2.0 * (layers + loaded.model.get_output_embeddings().weight.numel())


def llama_cpp(rendered: list[str], tokens: int) -> dict:
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install -e '.[llamacpp]': bench only)"}
    folder, extra = resolve_spec("smollm2-135m-instruct")
    llm = Llama(model_path=str(Path(folder) / extra["gguf_file"]), n_threads=2, n_ctx=512, verbose=False)
    made, start = 0, time.perf_counter()
    for prompt in rendered:
        out = llm(prompt, max_tokens=tokens, temperature=0.0)
        made += out["usage"]["completion_tokens"]
    return {"tokens_per_s": made / (time.perf_counter() - start), "prompts": len(rendered), "stream": 1}


def bf16_rows(args, rendered: list[str], fp32: dict[str, list[str]], record) -> dict:
    """The engine at `DECODE_ROWS` with the model in bfloat16: throughput against the fp32 and the bf16 limits,
    and how many replies equal the fp32 engine's (`fp32`: steering name -> replies)."""
    loaded = load_model(args.model, dtype="bfloat16")
    config = loaded.model.config
    peak = matmul_peak(config.hidden_size, config.intermediate_size, torch.bfloat16)
    limit = peak * 1e9 / flops_per_token(loaded)
    print(f"bfloat16: matmul peak {peak:.0f} GFLOP/s; compute limit {limit:.0f} new tokens/s", flush=True)
    identical = {}
    for name in STEERINGS:
        replies, seconds = timed(new_path, loaded, parse_steering(name), rendered, args.tokens, DECODE_ROWS)
        record("engine_bf16", name, DECODE_ROWS, replies, seconds, bf16_limit=limit)
        identical[name] = {"identical": sum(a == b for a, b in zip(fp32[name], replies)), "of": len(replies)}
    return {
        "matmul_peak_gflops": round(peak, 1),
        "compute_limit_tokens_per_s": round(limit, 1),
        "identical_to_fp32": identical,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=208, help="prompts at batch 64 and above")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per reply")
    parser.add_argument("--out", default="results/bench/generate.json")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bfloat16 engine rows")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    texts = bench_prompts(args.prompts)
    rendered = chat_prompts(loaded, [[{"role": "user", "content": t}] for t in texts])
    config = loaded.model.config
    peak = matmul_peak(config.hidden_size, config.intermediate_size, loaded.dtype)
    limit = peak * 1e9 / flops_per_token(loaded)
    print(
        f"matmul peak {peak:.0f} GFLOP/s ({loaded.dtype}); compute limit {limit:.0f} new tokens/s", flush=True
    )
    rows: list[dict] = []

    def record(
        engine: str,
        steering: str,
        batch: int,
        replies: list[str],
        seconds: float,
        bf16_limit: float | None = None,
        **extra,
    ) -> dict:
        rate = count_tokens(loaded, replies) / seconds
        if bf16_limit is not None:
            extra["bf16_limit_pct"] = round(100 * rate / bf16_limit, 1)
        row = {"engine": engine, "steering": steering, "batch": batch, "prompts": len(replies)}
        row |= {
            "seconds": round(seconds, 2),
            "tokens_per_s": round(rate, 1),
            "limit_pct": round(100 * rate / limit, 1),
        }
        rows.append(row | extra)
        print(json.dumps(rows[-1]), flush=True)
        return row

    identical_at_64, at_rows = {}, {}
    for name in STEERINGS:
        steering = parse_steering(name)
        for batch in (1, 16, 64):
            n = {1: 8, 16: 32, 64: args.prompts}[batch]
            old, old_s = timed(old_path, loaded, steering, rendered[:n], args.tokens, batch)
            record("hf_generate", name, batch, old, old_s)
            new, new_s = timed(new_path, loaded, steering, rendered[:n], args.tokens, batch)
            record("engine", name, batch, new, new_s, speedup=round(old_s / new_s, 2))
            if batch == 64:
                identical_at_64[name] = {"identical": sum(a == b for a, b in zip(old, new)), "of": n}
        at_rows[name], new_s = timed(new_path, loaded, steering, rendered, args.tokens, DECODE_ROWS)
        record("engine", name, DECODE_ROWS, at_rows[name], new_s)
    refusal = steering_from_dict(parse_steering("refusal").to_dict())
    for k in (1, 4, 16):
        variants = [
            steering_from_dict({**refusal.to_dict(), "values": [refusal.values[0] + 0.01 * i]})
            for i in range(k)
        ]
        ids = [loaded.tokenizer(p, add_special_tokens=False).input_ids for p in rendered]
        edits = [v.edits(loaded) for v in variants]
        replies = [Reply(p, edits[i % k], args.tokens) for i, p in enumerate(ids)]
        start = time.perf_counter()
        Engine(loaded, prefill=16, rows=DECODE_ROWS).run(replies)
        seconds = time.perf_counter() - start
        text = loaded.tokenizer.batch_decode([r.tokens for r in replies], skip_special_tokens=True)
        record("engine", f"{k} distinct SAE clamps", DECODE_ROWS, text, seconds, distinct=k)
    bf16 = bf16_rows(args, rendered, at_rows, record) if args.bf16 else {"skipped": "--no-bf16"}
    cpp = llama_cpp(rendered[:8], args.tokens)
    print(json.dumps({"llama_cpp": cpp}), flush=True)
    summary = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            **cpu_info(),
            "threads": torch.get_num_threads(),
        },
        "model": args.model,
        "dtype": str(loaded.dtype),
        "tokens": args.tokens,
        "matmul_peak_gflops": round(peak, 1),
        "compute_limit_tokens_per_s": round(limit, 1),
        "identical_replies_at_batch_64": identical_at_64,
        "bfloat16": bf16,
        "llama_cpp": cpp,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
