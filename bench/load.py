"""Load test of `saesteer serve`: N chat requests from C concurrent clients on loopback.

    python bench/load.py [--model smollm2-135m-instruct] [--requests 64] [--clients 16] [--max-tokens 64]
    python bench/load.py --compare 8c22c10          # the same load on this tree and on a git ref, side by side
    python bench/load.py --url http://127.0.0.1:8000/v1     # a server that is already running

Without --url it starts `saesteer serve` on a free loopback port (and stops it afterwards); with
--compare it also starts the server of that git ref (from a temporary worktree) and runs every scenario
on both, one after the other. Requests are greedy, sent with the openai client, and cycle through the
steerings of --steering-mix (the request's `steering` field); --stream also reports time to first token.

Scenarios: `load` (throughput, p50/p95 latency, errors) and `abandon`: a client gives up on a 512-token
reply after 2 s, then a 4-token request is sent; its latency is compared with the same request on an
idle server. The exit code is 1 if any request failed.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import openai
from generate import bench_prompts  # the generation bench's validation prompts (bench/ is on sys.path)

REPO = Path(__file__).resolve().parent.parent
PROMPTS = bench_prompts(64)
LONG_PROMPT = "Write a long, detailed essay on the history of the Roman Empire, century by century."


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url", default=None, help="base URL of a running server (e.g. http://127.0.0.1:8000/v1)"
    )
    parser.add_argument(
        "--compare", default=None, help="git ref whose server runs the same scenarios (the 'before')"
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model the started servers load")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-batch-size", type=int, default=16, help="of the started servers")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--steering-mix",
        default="none,refusal,refusal_conditional",
        help="comma-separated presets the requests cycle through",
    )
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--scenarios", default="load,abandon", help="comma-separated: load, abandon")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    args = parser.parse_args()

    failed = False
    with ExitStack() as stack:
        servers = {"this tree": args.url or stack.enter_context(started_server(args, REPO / "src"))}
        if args.compare:
            servers[args.compare] = stack.enter_context(
                started_server(args, stack.enter_context(worktree(args.compare)) / "src")
            )
        for scenario in args.scenarios.split(","):
            for name, url in servers.items():
                print(f"== {scenario} on {name}", flush=True)
                failed |= {"load": load, "abandon": abandon}[scenario](args, url)
    sys.exit(1 if failed else 0)


def client_for(url: str, timeout: float = 600) -> tuple[openai.OpenAI, str]:
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=timeout)
    return client, client.models.list().data[0].id


def load(args, url: str) -> bool:
    """C clients send N requests; prints throughput and latency; returns whether any failed."""
    client, model = client_for(url)
    mix = [s.strip() for s in args.steering_mix.split(",") if s.strip()] or ["none"]

    def request(i: int) -> tuple[float, float, int]:
        """(latency s, time to first token s, generated tokens) of one request."""
        start = time.perf_counter()
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        kw = dict(
            model=model,
            messages=messages,
            max_tokens=args.max_tokens,
            temperature=0,
            extra_body={"steering": mix[i % len(mix)]},
        )
        if not args.stream:
            reply = client.chat.completions.create(**kw)
            latency = time.perf_counter() - start
            return latency, latency, reply.usage.completion_tokens
        first, tokens = None, 0
        for chunk in client.chat.completions.create(
            **kw, stream=True, stream_options={"include_usage": True}
        ):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            tokens = chunk.usage.completion_tokens if chunk.usage else tokens
        latency = time.perf_counter() - start
        return latency, latency if first is None else first, tokens

    request(0)  # warm-up, not counted
    results, errors = [], []

    def attempt(i: int) -> None:
        try:
            results.append(request(i))
        except Exception as err:  # counted and reported, the run goes on
            errors.append(f"{type(err).__name__}: {err}")

    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(attempt, range(args.requests)))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    print(
        f"  {args.requests} requests from {args.clients} clients ({'streamed, ' if args.stream else ''}max_tokens "
        f"{args.max_tokens}, steering mix {','.join(mix)}) in {wall:.1f} s"
    )
    print(
        f"  throughput  {len(results) / wall:.2f} requests/s, {tokens / wall:.1f} generated tokens/s ({tokens} tokens)"
    )
    if len(latencies) >= 2:
        cuts = statistics.quantiles(latencies, n=20)
        print(
            f"  latency     p50 {statistics.median(latencies):.2f} s, p95 {cuts[18]:.2f} s, max {latencies[-1]:.2f} s"
        )
    if args.stream and len(results) >= 2:
        print(f"  first token p50 {statistics.median(r[1] for r in results):.2f} s")
    print(f"  errors      {len(errors)}" + (f" (first: {errors[0]})" if errors else ""), flush=True)
    return bool(errors)


def abandon(args, url: str) -> bool:
    """A 4-token request right after a client abandoned a 512-token one, against the same request idle."""
    client, model = client_for(url)
    short = dict(model=model, messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=4, temperature=0)

    def timed() -> float:
        start = time.perf_counter()
        client.chat.completions.create(**short)
        return time.perf_counter() - start

    timed()  # warm-up
    idle = statistics.median(timed() for _ in range(5))
    quitter, _ = client_for(url, timeout=2.0)
    try:
        quitter.chat.completions.create(
            model=model, messages=[{"role": "user", "content": LONG_PROMPT}], max_tokens=512, temperature=0
        )
        print("  the 512-token request finished within the client's 2 s timeout: no abandonment measured")
    except openai.APITimeoutError:
        pass
    after = timed()
    print(
        f"  4-token request: idle {idle:.2f} s, right after an abandoned 512-token request {after:.2f} s "
        f"({after / idle:.1f}x)",
        flush=True,
    )
    return False


@contextmanager
def worktree(ref: str):
    """A temporary detached git worktree of `ref`, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="saesteer-bench-")) / "tree"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder), ref],
        check=True,
        capture_output=True,
    )
    try:
        yield folder
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder)], capture_output=True
        )


@contextmanager
def started_server(args, source: Path):
    """`saesteer serve` from the package in `source` on a free loopback port; yields its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "saesteer",
        "serve",
        "--model",
        args.model,
        "--port",
        str(port),
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-tokens",
        str(max(args.max_tokens, 512)),
    ]
    log = tempfile.TemporaryFile("w+")  # read back only if the server fails to start
    env = {**os.environ, "PYTHONPATH": str(source)}
    server = subprocess.Popen(
        command + (["--device", args.device] if args.device else []),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url, deadline = f"http://127.0.0.1:{port}/v1", time.time() + args.startup_timeout
    try:
        while time.time() < deadline and server.poll() is None:
            try:
                httpx.get(f"{url}/models", timeout=5).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            log.seek(0)
            sys.exit(f"the server from {source} did not start; its output ends with:\n{log.read()[-2000:]}")
        yield url
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
