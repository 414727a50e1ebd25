"""Load test of `saesteer serve`: N chat requests from C concurrent clients on loopback.

    python bench/load.py [--model smollm2-135m-instruct] [--requests 64] [--clients 16] [--max-tokens 64]
    python bench/load.py --url http://127.0.0.1:8000/v1     # a server that is already running

Without --url it starts `saesteer serve` on a free loopback port (and stops it afterwards). Requests are
greedy, sent with the openai client, optionally steered (`--steering`, the request's `steering` field)
and streamed (`--stream`, which also reports time to first token). Prints throughput (requests/s and
generated tokens/s), p50/p95 latency and the error count; the exit code is 1 if any request failed.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
from steer import PROMPTS  # the same prompt mix as the steering bench (bench/ is on sys.path)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="base URL of a running server (e.g. http://127.0.0.1:8000/v1)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model the started server loads")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-batch-size", type=int, default=16, help="of the started server")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--steering", default=None, help="preset name or JSON spec sent with every request")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    args = parser.parse_args()

    server, url = (None, args.url) if args.url else start_server(args)
    try:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        steering = json.loads(args.steering) if args.steering and args.steering.lstrip().startswith("{") else args.steering
        extra = {"steering": steering} if steering else None

        def request(i: int) -> tuple[float, float, int]:
            """(latency s, time to first token s, generated tokens) of one request."""
            start = time.perf_counter()
            messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            kw = dict(model=model, messages=messages, max_tokens=args.max_tokens, temperature=0, extra_body=extra)
            if not args.stream:
                reply = client.chat.completions.create(**kw)
                latency = time.perf_counter() - start
                return latency, latency, reply.usage.completion_tokens
            first, tokens = None, 0
            for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
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
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)

    latencies = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    print(f"{args.requests} requests from {args.clients} clients to {model} ({'streamed, ' if args.stream else ''}"
          f"max_tokens {args.max_tokens}, steering {args.steering or 'none'}) in {wall:.1f} s")
    print(f"  throughput  {len(results) / wall:.2f} requests/s, {tokens / wall:.1f} generated tokens/s ({tokens} tokens)")
    if len(latencies) >= 2:
        cuts = statistics.quantiles(latencies, n=20)
        print(f"  latency     p50 {statistics.median(latencies):.2f} s, p95 {cuts[18]:.2f} s, max {latencies[-1]:.2f} s")
    if args.stream and len(results) >= 2:
        print(f"  first token p50 {statistics.median(r[1] for r in results):.2f} s")
    print(f"  errors      {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    sys.exit(1 if errors else 0)


def start_server(args) -> tuple[subprocess.Popen, str]:
    """Start `saesteer serve` on a free loopback port; return it and its base URL once it answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "saesteer", "serve", "--model", args.model, "--port", str(port),
               "--max-batch-size", str(args.max_batch_size), "--max-tokens", str(max(args.max_tokens, 512))]
    log = tempfile.TemporaryFile("w+")  # read back only if the server fails to start
    server = subprocess.Popen(command + (["--device", args.device] if args.device else []), stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}/v1", time.time() + args.startup_timeout
    while time.time() < deadline and server.poll() is None:
        try:
            httpx.get(f"{url}/models", timeout=5).raise_for_status()
            return server, url
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    log.seek(0)
    sys.exit(f"the server did not start; its output ends with:\n{log.read()[-2000:]}")


if __name__ == "__main__":
    main()
