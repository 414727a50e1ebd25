"""The OpenAI-compatible server, run for real with uvicorn on loopback and driven by the openai client."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from conftest import run_cli, save_steering_sae

from saesteer.artefacts import load_sae, save_direction
from saesteer.errors import SaesteerError, short
from saesteer.models import chat_prompts, load_model, reference_generate
from saesteer.serve import ServeConfig, create_app, uvicorn_options
from saesteer.steering import PRESETS, steering_from_dict

QUESTIONS = ["the quick brown fox", "sparse autoencoders steer models over the lazy dog", "jumps", "lazy dog"]
LIMITS = dict(
    model_name="tiny",
    max_tokens=24,
    default_max_tokens=8,
    max_prompt_tokens=230,
    max_batch_size=8,
    max_body_bytes=20_000,
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """A second copy of the served model, for replies computed directly (never shared with the server)."""
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("steer")
    save_direction(
        folder / "refusal.safetensors",
        torch.randn(64, generator=torch.Generator().manual_seed(2)),
        layer=2,
        model="tiny",
    )
    save_steering_sae(folder / "sae")
    return {
        "folder": str(folder),
        "actadd": {"method": "actadd", "direction": str(folder / "refusal.safetensors"), "alpha": 30.0},
        "sae": {"method": "sae", "sae": str(folder / "sae"), "features": [5, 17], "values": [60.0, 40.0]},
        "sae_schedule": {  # a decaying clamp released by a refusal opener (token-aware: per-row state)
            "method": "sae",
            "sae": str(folder / "sae"),
            "features": [5],
            "values": [60.0],
            "decay": 0.8,
            "release_on": "decline",
        },
    }


@pytest.fixture(scope="module")
def served(tiny_model_dir, specs):
    """(base url, served LoadedModel) of a real uvicorn server in a background thread; requests may name
    the files of `specs`."""
    yield from serve_in_thread(
        load_model(str(tiny_model_dir)), ServeConfig(**LIMITS, allow_dirs=[specs["folder"]])
    )


def serve_in_thread(loaded, config: ServeConfig):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(loaded, config)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **uvicorn_options(config)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", loaded
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0], api_key="x", max_retries=0)


def expected(loaded, question: str, steering=None, max_tokens: int = 8) -> str:
    """The reply computed directly: `generate` on the prepared prompt with the steering applied."""
    method = steering_from_dict(PRESETS[steering] if isinstance(steering, str) else steering)
    with method.applied(loaded):
        return reference_generate(
            loaded,
            chat_prompts(loaded, [method.prepare([{"role": "user", "content": question}])]),
            max_tokens,
        )[0]


def ask(client, question: str, steering=None, **kw):
    extra = {"steering": steering} if steering is not None else None
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": question}], extra_body=extra, **kw
    )


def streamed(client, question: str, steering=None, **kw) -> tuple[str, list]:
    chunks = list(ask(client, question, steering, stream=True, stream_options={"include_usage": True}, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_models_and_presets(client, served):
    [model] = client.models.list().data
    assert model.id == "tiny" and model.model_extra["steering_presets"] == list(PRESETS)
    listing = httpx.get(f"{served[0]}/steering").json()
    assert {p["name"]: p["spec"] for p in listing["data"]} == PRESETS and listing["default"] == {
        "method": "none"
    }


def test_unsteered_reply_equals_generate(client, reference):
    for question in QUESTIONS[:2]:
        reply = ask(client, question, temperature=0, max_tokens=12)
        assert reply.choices[0].message.content == expected(reference, question, max_tokens=12)
        assert reply.object == "chat.completion" and reply.choices[0].finish_reason in ("stop", "length")
        prompt = chat_prompts(reference, [[{"role": "user", "content": question}]])[0]
        assert reply.usage.prompt_tokens == len(
            reference.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        )
        assert 1 <= reply.usage.completion_tokens <= 12
    assert ask(client, QUESTIONS[0]).choices[0].message.content == expected(
        reference, QUESTIONS[0], max_tokens=8
    )  # default 8


def test_stream_concatenation_equals_non_streamed(client, specs):
    for question, steering in [(QUESTIONS[1], None), (QUESTIONS[0], specs["sae"])]:
        reply = ask(client, question, steering, max_tokens=16)
        text, chunks = streamed(client, question, steering, max_tokens=16)
        assert text == reply.choices[0].message.content
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_length_and_stop_strings(client, reference):
    full = expected(reference, QUESTIONS[0], max_tokens=16)
    assert ask(client, QUESTIONS[0], max_tokens=16).choices[0].finish_reason == "length"
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = full[: full.find(stop)]
    reply = ask(client, QUESTIONS[0], max_tokens=16, stop=[stop, "never-there"])
    assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"
    assert streamed(client, QUESTIONS[0], max_tokens=16, stop=stop)[0] == cut


@pytest.mark.parametrize("name", ["actadd", "sae", "sae_schedule", "system_prompt"])
def test_steered_reply_equals_direct_steering(client, reference, specs, name):
    steering = specs.get(name, name)
    reply = ask(client, QUESTIONS[0], steering, max_tokens=12)
    assert reply.choices[0].message.content == expected(reference, QUESTIONS[0], steering, max_tokens=12)
    assert reply.choices[0].message.content != expected(reference, QUESTIONS[0], max_tokens=12)
    assert reply.model_extra["steering"]["method"] == (
        steering["method"] if isinstance(steering, dict) else name
    )
    if isinstance(steering, dict):  # a spec may also come as a JSON string
        assert (
            ask(client, QUESTIONS[0], json.dumps(steering), max_tokens=12).choices[0].message.content
            == reply.choices[0].message.content
        )


def test_a_release_in_shared_batches_equals_its_direct_reply(client, reference, specs, monkeypatch):
    """With a marker every text holds, the release fires on the first generated token of each request,
    also when requests share decoding steps: each reply equals the prompt-only clamp's direct reply."""
    from saesteer import steering as steering_module

    monkeypatch.setitem(steering_module.RELEASE_MARKERS, "decline", ("",))
    spec = specs["sae_schedule"]
    prompt_only = {k: v for k, v in spec.items() if k not in ("release_on", "decay")} | {
        "generated_tokens": 0
    }
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        replies = list(
            pool.map(lambda q: ask(client, q, spec, max_tokens=8).choices[0].message.content, QUESTIONS)
        )
    assert replies == [expected(reference, q, prompt_only, max_tokens=8) for q in QUESTIONS]
    steered_throughout = [
        expected(reference, q, {**spec, "release_on": None}, max_tokens=8) for q in QUESTIONS
    ]
    assert replies != steered_throughout


def test_sampling_is_seeded(client):
    kw = dict(temperature=1.5, top_p=0.95, max_tokens=16)
    first, again = (ask(client, QUESTIONS[2], seed=7, **kw).choices[0].message.content for _ in range(2))
    others = {ask(client, QUESTIONS[2], seed=seed, **kw).choices[0].message.content for seed in range(8, 12)}
    assert first == again and len(others | {first}) > 1


@contextmanager
def recorded_forwards(model, delay: float = 0.0):
    """The batch size of every forward pass of `model` while inside (as its token embeddings see it: the
    engine runs the layers itself), each delayed by `delay` seconds."""
    sizes = []

    def record(_module, args):
        sizes.append(args[0].shape[0])
        time.sleep(delay)

    handle = model.get_input_embeddings().register_forward_pre_hook(record)
    try:
        yield sizes
    finally:
        handle.remove()


def test_tiny_temperature_samples_the_greedy_token(client, reference):
    """Found by schemathesis: temperature 1e-300 overflowed the scaled logits to inf - inf = NaN (a 500)."""
    reply = ask(client, QUESTIONS[1], temperature=1e-300, top_p=1e-300, seed=1, max_tokens=8)
    assert reply.choices[0].message.content == expected(reference, QUESTIONS[1], max_tokens=8)


def test_concurrent_mixed_requests_share_batches_without_leaking(client, served, reference, specs):
    """Fifteen requests at once, five steerings, three lengths: each reply equals its own direct reference,
    and rows with different steerings really shared decoding steps."""
    jobs = [
        (QUESTIONS[i % len(QUESTIONS)], steering, 4 + 4 * (i % 3))
        for i, steering in enumerate(
            [None, specs["actadd"], specs["sae"], specs["sae_schedule"], "system_prompt"] * 3
        )
    ]
    with recorded_forwards(served[1].model, delay=0.01) as sizes, ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(
            pool.map(
                lambda job: ask(client, job[0], job[1], max_tokens=job[2]).choices[0].message.content, jobs
            )
        )
    assert replies == [expected(reference, q, s, max_tokens=m) for q, s, m in jobs]
    assert max(sizes) >= 4, sizes  # one row per steering at least


@pytest.fixture
def slow_server(tiny_model_dir):
    """(url, forward batch sizes) of a server whose forward passes take 50 ms each, and that allows 400 tokens."""
    loaded = load_model(str(tiny_model_dir))
    loaded.model.generation_config.eos_token_id = None  # replies run to their token limit
    loaded.tokenizer.eos_token = None
    with recorded_forwards(loaded.model, delay=0.05) as sizes:
        for url, _ in serve_in_thread(loaded, ServeConfig(**{**LIMITS, "max_tokens": 400})):
            yield url, sizes


@pytest.mark.parametrize("stream", [False, True])
def test_abandoned_request_stops_at_the_next_step(slow_server, stream):
    """Finding 1: a client that gives up on a 400-token reply (20 s of steps) frees the engine at once."""
    url, sizes = slow_server
    body = {"messages": USER, "max_tokens": 400, "stream": stream}
    if stream:  # read for a second, then hang up
        with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=30) as response:
            start = time.perf_counter()
            for _ in response.iter_bytes():
                if time.perf_counter() - start > 1.0:
                    break
    else:
        with pytest.raises(httpx.TimeoutException):
            raw(url, body, timeout=1.0)
    start = time.perf_counter()
    reply = raw(url, {"messages": USER, "max_tokens": 4}, timeout=30)
    assert reply.status_code == 200 and time.perf_counter() - start < 3.0
    time.sleep(0.5)
    steps = len(sizes)
    time.sleep(0.5)
    assert len(sizes) == steps < 80, steps  # nothing runs any more, and the abandoned reply stopped early


def test_new_request_joins_the_running_batch(slow_server):
    """A short request sent while a long one generates is answered within a step plus its own tokens."""
    url, sizes = slow_server
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(raw, url, {"messages": USER, "max_tokens": 120}, timeout=60)
        time.sleep(1.0)
        start = time.perf_counter()
        short_reply = raw(url, {"messages": USER, "max_tokens": 4}, timeout=60)
        latency = time.perf_counter() - start
        assert short_reply.status_code == 200 and not long.done() and latency < 2.0, latency
        assert long.result().json()["usage"]["completion_tokens"] == 120
    assert 2 in sizes  # the two rows shared steps


def raw(url: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{url}/chat/completions", content=content, headers={"content-type": "application/json"}, **kw
    )


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b'{"messages": [', 400, "request body is not valid JSON"),
        (b"[1, 2]", 400, "request body must be a JSON object"),
        ({"model": "tiny"}, 400, "messages: Field required"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role: Input should be"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            "only text content parts are supported",
        ),
        ({"messages": USER, "steering": "nope"}, 400, "unknown steering preset 'nope'"),
        ({"messages": USER, "steering": "{bad"}, 400, "steering is not valid JSON"),
        ({"messages": USER, "steering": {"method": "magic"}}, 400, "unknown steering method 'magic'"),
        (
            {"messages": USER, "steering": {"method": "actadd", "direction": "d", "alpha": "x"}},
            400,
            "bad actadd steering field alpha",
        ),
        (
            {"messages": USER, "steering": {"method": "actadd", "colour": 1}},
            400,
            "bad actadd steering field colour: Unexpected keyword",
        ),
        (
            {"messages": USER, "steering": {"method": "sae", "sae": "s", "features": 5, "values": [1]}},
            400,
            "bad sae steering field features: Input should be a valid list",
        ),
        (
            {"messages": USER, "steering": {"method": "conditional", "steering": "x", "detector": "d"}},
            400,
            "bad conditional steering field steering",
        ),
        (
            {
                "messages": USER,
                "steering": {
                    "method": "conditional",
                    "steering": {"method": "actadd", "alpha": "x"},
                    "detector": "d",
                },
            },
            400,
            "bad actadd steering field alpha",
        ),
        ({"messages": USER, "steering": [1]}, 400, "steering must be a preset name or a spec object"),
        (
            {"messages": USER, "steering": {"method": "sae", "sae": "SAE", "features": [999], "values": [1]}},
            400,
            "feature index 999 is out of range",
        ),
        (
            {
                "messages": USER,
                "steering": {"method": "sae", "sae": "SAE", "features": [999], "values": [1]},
                "stream": True,
            },
            400,
            "feature index 999 is out of range",
        ),
        (
            {"messages": USER, "steering": {"method": "actadd", "direction": "missing.safetensors"}},
            400,
            "is not available on this server",
        ),
        # Finding 3: non-finite or overflowing steering values are refused before anything runs.
        (
            {
                "messages": USER,
                "steering": {"method": "sae", "sae": "SAE", "features": [5], "values": ["nan"]},
            },
            400,
            "values.0: Input should be a finite number",
        ),
        (
            {
                "messages": USER,
                "steering": {"method": "sae", "sae": "SAE", "features": [5], "values": ["inf"]},
            },
            400,
            "finite number",
        ),
        (
            {
                "messages": USER,
                "steering": {"method": "sae", "sae": "SAE", "features": [5], "values": [1e308]},
            },
            400,
            "values must be within",
        ),
        (
            {
                "messages": USER,
                "steering": {"method": "actadd", "direction": "d", "alpha": "nan"},
                "temperature": 1,
            },
            400,
            "finite number",
        ),
        # Finding 4: inputs that used to end in a 500.
        (
            {"messages": USER, "seed": 99999999999999999999999, "temperature": 1},
            400,
            "seed: Input should be less than",
        ),
        (
            {"messages": USER, "steering": {"method": "actadd", "direction": "d" * 5000}},
            400,
            "holds 5000 items or characters",
        ),
        (
            {"messages": USER, "steering": {"method": "actadd", "direction": "/" + "d" * 300 + "/x" * 1500}},
            400,
            "not available",
        ),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "not valid Unicode"),
        (b'{"messages": ' + b"[" * 15_000, 400, "request body is not valid JSON"),
        (
            json.dumps({"messages": USER, "steering": '{"a":' + "[" * 5_000}).encode(),
            400,
            "steering is not valid JSON",
        ),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"1" * 5000 + b"}",
            400,
            "not valid JSON",
        ),
        (
            json.dumps(
                {"messages": USER, "steering": '{"method": "sae", "features": [' + "1" * 5000 + "]}"}
            ).encode(),
            400,
            "steering is not valid JSON",
        ),
        (
            {
                "messages": USER,
                "steering": {
                    "method": "conditional",
                    "steering": {"method": "none"},
                    "detector": "d",
                    "tokens": 0,
                },
            },
            400,
            "tokens must be between 1 and",
        ),
        # Finding 5: a prompt-only method inside conditional would be silently ignored.
        (
            {
                "messages": USER,
                "steering": {
                    "method": "conditional",
                    "steering": {"method": "system_prompt"},
                    "detector": "d",
                },
            },
            400,
            "cannot wrap system_prompt",
        ),
        ({"messages": USER, "max_tokens": 25}, 400, "max_tokens 25 is above this server's limit of 24"),
        (
            {"messages": USER, "max_completion_tokens": 0},
            400,
            "max_completion_tokens: Input should be greater than or equal to 1",
        ),
        ({"messages": USER, "n": 2}, 400, "n=2 is not supported"),
        ({"messages": [{"role": "user", "content": "fox " * 300}]}, 400, "the prompt is"),
        (
            {"messages": [{"role": "user", "content": "x" * 30_000}]},
            413,
            "above this server's limit of 20000",
        ),
    ],
    ids=lambda value: None if isinstance(value, (dict, bytes)) else str(value)[:40],
)
def test_bad_requests_get_openai_errors(served, specs, body, status, message):
    if (
        isinstance(body, dict)
        and isinstance(body.get("steering"), dict)
        and body["steering"].get("sae") == "SAE"
    ):
        body = {**body, "steering": {**body["steering"], "sae": specs["sae"]["sae"]}}
    response = raw(served[0], body)
    error = response.json()["error"]
    assert response.status_code == status and message in error["message"], error
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


def test_unknown_route_and_openai_client_errors(served, client):
    response = httpx.get(f"{served[0]}/nothing")
    assert response.status_code == 404 and response.json()["error"]["message"] == "Not Found"
    with pytest.raises(openai.BadRequestError, match="unknown steering preset"):
        ask(client, "hi", "nope")
    assert ask(client, "hi").choices[0].message.content is not None  # the server still answers


def test_request_files_stay_inside_allowed_dirs(served, specs, tmp_path):
    """Finding 2: a request may name files only inside the allowed folders, and cannot tell missing from forbidden."""
    url = served[0]
    fifo = Path(specs["folder"]) / "pipe"
    if not fifo.exists():
        os.mkfifo(fifo)
    elsewhere = tmp_path / "direction.safetensors"
    save_direction(elsewhere, torch.ones(64), layer=2, model="tiny")
    messages = set()
    for path in [
        "builtin:../../../../../../etc/hostname",
        "/etc",
        "/etc/hostname",
        "/no/such/file",
        str(fifo),
        str(elsewhere),
        str(Path(specs["folder"]) / ".." / elsewhere.parent.name / elsewhere.name),
    ]:
        for steering in (
            {"method": "actadd", "direction": path},
            {"method": "sae", "sae": path, "features": [1], "values": [1]},
        ):
            response = raw(url, {"messages": USER, "steering": steering}, timeout=10)
            assert response.status_code == 400, (path, response.text)
            messages.add(response.json()["error"]["message"].replace(repr(short(path)), "PATH"))
    assert len(messages) == 1, messages
    assert (
        raw(url, {"messages": USER, "steering": specs["actadd"], "max_tokens": 2}).status_code == 200
    )  # allowed


def test_api_key(tiny_model_dir):
    for url, _ in serve_in_thread(load_model(str(tiny_model_dir)), ServeConfig(**LIMITS, api_key="s3cret")):
        assert httpx.get(f"{url}/models").status_code == 401
        assert httpx.get(f"{url}/models", headers={"host": "x?"}).status_code in (
            400,
            401,
        )  # path from the scope, not Host
        wrong = openai.OpenAI(base_url=url, api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
            ask(wrong, "hi", max_tokens=2)
        right = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert ask(right, "hi", max_tokens=2).usage.completion_tokens <= 2
        root = url.removesuffix("/v1")
        for path in ("/docs", "/openapi.json", "/nowhere"):  # issue 25: the API docs need the key too
            assert httpx.get(root + path).status_code == 401, path
        assert (
            httpx.get(root + "/openapi.json", headers={"authorization": "Bearer s3cret"}).status_code == 200
        )
    for empty in ("", "  "):
        with pytest.raises(SaesteerError, match="the API key is empty"):
            ServeConfig(api_key=empty)


def test_a_request_s_steering_is_bounded_before_it_runs(served, specs):
    """Issue 25 item 1: a stack of thousands of clamps, or one naming many files, is a 400 before it runs."""
    url, clamp = served[0], specs["sae"]
    for steering, message in (
        ({"method": "stack", "steerings": [clamp] * 40}, "the steering makes 80 edits, above this server's limit of 64"),
        ({"method": "sae", **{k: v for k, v in clamp.items() if k != "method"}, "features": list(range(65)),
          "values": [1.0] * 65}, "makes 65 edits"),
        ({"method": "stack", "steerings": [
            {**clamp, "sae": str(Path(specs["folder"]) / "sae") + "/." * i} for i in range(5)
        ]}, "names 5 files, above this server's limit of 4"),
    ):  # fmt: skip
        response = raw(url, {"messages": USER, "steering": steering, "max_tokens": 2})
        assert response.status_code == 400 and message in response.json()["error"]["message"], response.text


def test_every_spelling_of_one_sae_is_one_copy(specs):
    """Issue 25 item 2: the SAE cache keys on the file's identity, not the string that names it."""
    folder = Path(specs["folder"]) / "sae"
    spellings = [str(folder) + "/." * i for i in range(40)] + [str(folder / ".." / "sae")]
    assert len({id(load_sae(s)) for s in spellings}) == 1


def test_a_steering_reads_the_file_that_was_checked(reference, tmp_path, monkeypatch):
    """Issue 25 item 5: the server reads a request's files at the real paths it checked, so a symlink flipped
    after the check changes nothing, and a folder swapped for a symlink while the files load is a 400."""
    from saesteer import serve
    from saesteer.artefacts import load_direction
    from saesteer.steering import ActAdd

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir(), outside.mkdir()
    save_direction(allowed / "inside.safetensors", torch.ones(64), layer=2, model="tiny")
    save_direction(outside / "secret.safetensors", -torch.ones(64), layer=2, model="tiny")
    link = allowed / "link.safetensors"
    link.symlink_to(allowed / "inside.safetensors")
    config, spec = ServeConfig(**LIMITS), {"method": "actadd", "direction": str(link)}
    steering, echo = serve._request_steering(spec, None, [allowed.resolve()], config, reference)
    link.unlink()
    link.symlink_to(outside / "secret.safetensors")  # the flip after the check
    assert echo["direction"] == str(link) and steering.direction == str(
        (allowed / "inside.safetensors").resolve()
    )
    assert load_direction(steering.direction)[0].sum() > 0  # the checked file, not the secret
    with pytest.raises(SaesteerError, match="not available"):  # the flipped link itself is refused
        serve._request_steering(spec, None, [allowed.resolve()], config, reference)

    sub = allowed / "sub"
    sub.mkdir()
    save_direction(sub / "d.safetensors", torch.ones(64), layer=2, model="tiny")
    save_direction(outside / "d.safetensors", -torch.ones(64), layer=2, model="tiny")
    check = ActAdd.check

    def swap_then_load(self, loaded):  # a folder on the way becomes a symlink between check and load
        if sub.is_dir() and not sub.is_symlink():
            sub.rename(allowed / "sub.old")
            sub.symlink_to(outside)
        return check(self, loaded)

    # once checked, the steering keeps what it loaded: the engine's later passes never read the path again
    later = ActAdd.edits
    monkeypatch.setattr("saesteer.steering.load_direction", lambda path: pytest.fail(f"read again: {path}"))
    assert later(steering, reference)
    monkeypatch.undo()
    monkeypatch.setattr(ActAdd, "check", swap_then_load)
    with pytest.raises(SaesteerError, match="not available on this server"):  # outside now
        serve._request_steering(
            {"method": "actadd", "direction": str(sub / "d.safetensors")},
            None,
            [allowed.resolve()],
            config,
            reference,
        )


def test_shipped_artefacts_stay_allowed_beside_allow_dirs(served):
    """Issue 25 item 5: --allow-dir adds to the shipped artefacts, as the README says."""
    steering = {"method": "sae", "sae": "builtin:sae", "features": [1], "values": [1.0]}
    response = raw(served[0], {"messages": USER, "steering": steering, "max_tokens": 2})
    assert response.status_code in (200, 400), response.text
    assert "not available on this server" not in response.text


def test_cli_serve_answers(tiny_model_dir, specs, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = tmp_path / "default.json"
    spec.write_text(json.dumps(specs["actadd"]))
    command = [
        sys.executable,
        "-m",
        "saesteer",
        "serve",
        "--model",
        str(tiny_model_dir),
        "--port",
        str(port),
        "--steering",
        str(spec),
        "--max-tokens",
        "8",
        "--allow-dir",
        specs["folder"],
        "--api-key",
        "k",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        deadline = time.time() + 60
        while True:
            try:
                assert client.models.list().data[0].model_extra["default_steering"]["method"] == "actadd"
                break
            except openai.APIConnectionError:
                assert process.poll() is None and time.time() < deadline, (
                    process.stdout.read() if process.poll() is not None else "timeout"
                )
                time.sleep(0.2)
        reply = ask(client, "hi")
        assert reply.model_extra["steering"]["method"] == "actadd" and reply.usage.completion_tokens <= 8
        assert (
            ask(client, "hi", specs["sae"]).model_extra["steering"]["method"] == "sae"
        )  # a file under --allow-dir
    finally:
        process.terminate()
        process.wait(10)


def test_cli_serve_bad_default_steering_is_one_line(monkeypatch, capsys, tiny_model_dir):
    code, out = run_cli(
        monkeypatch, capsys, "serve", "--model", str(tiny_model_dir), "--steering", '{"method": "nope"}'
    )
    assert code == 2 and "unknown steering method 'nope'" in out.err and "Traceback" not in out.err


def test_a_poisoned_file_fails_its_own_request_alone(served, specs, tmp_path):
    """Issue 25 item 4: bad metadata is a 400 for the request that names it, found before it joins a batch;
    the requests sent beside it succeed, and no error names another request's steering."""
    from safetensors.torch import save_file

    from saesteer.detectors import Detector

    url, folder = served[0], Path(specs["folder"])
    vector = {"direction": torch.ones(64)}
    save_file(vector, str(folder / "hook.safetensors"), metadata={"layer": "2", "hook_point": "bogus"})
    save_file(vector, str(folder / "layer.safetensors"), metadata={"layer": "abc"})
    weight = torch.zeros(1, 64)
    save_file({"weight": weight}, str(folder / "layers.safetensors"), metadata={
        "kind": "probe", "layers": "7", "bias": "0.0", "pooling": "user", "tokens": "4", "sae": "", "model": "tiny",
    })  # fmt: skip
    Detector("sae_probe", (1,), weight, sae=str(tmp_path)).save(folder / "outside.safetensors", "tiny")
    bad = [
        ({"method": "actadd", "direction": str(folder / "hook.safetensors")}, "unknown hook point"),
        ({"method": "actadd", "direction": str(folder / "layer.safetensors")}, "not an integer"),
        ({"method": "conditional", "steering": specs["actadd"], "detector": str(folder / "layers.safetensors")},
         "lacks valid metadata"),
        ({"method": "conditional", "steering": specs["actadd"], "detector": str(folder / "outside.safetensors")},
         "is not available on this server"),
    ]  # fmt: skip
    good = {"messages": USER, "steering": specs["actadd"], "max_tokens": 4}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: raw(url, body, timeout=60), [good, *[
            {"messages": USER, "steering": steering, "max_tokens": 4} for steering, _ in bad
        ], good]))  # fmt: skip
    assert answers[0].status_code == answers[-1].status_code == 200, answers[0].text
    for answer, (_, message) in zip(answers[1:-1], bad):
        assert answer.status_code == 400 and message in answer.json()["error"]["message"], answer.text


def test_a_body_that_never_arrives_is_a_408(tiny_model_dir):
    """Issue 25 item 6: a Content-Length the body never reaches ends at the deadline, not never."""
    config = ServeConfig(**LIMITS, body_seconds=0.5)
    for url, _ in serve_in_thread(load_model(str(tiny_model_dir)), config):
        host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"messages": '
            )
            answer = ""
            while "did not arrive" not in answer and (
                chunk := conn.recv(4096)
            ):  # headers, body may come apart
                answer += chunk.decode()
        assert answer.startswith("HTTP/1.1 408") and "did not arrive within 0.5 s" in answer, answer


def test_headers_that_never_end_close_the_connection(tiny_model_dir):
    """Issue 25 item 6: a slow-loris client that never finishes its headers is disconnected at the deadline,
    on a fresh connection and on a kept-alive one after a response; a prompt client is not."""
    config = ServeConfig(**LIMITS, header_seconds=0.5)
    for url, _ in serve_in_thread(load_model(str(tiny_model_dir)), config):
        host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # and then nothing
            started = time.monotonic()
            assert conn.recv(4096) == b"" and time.monotonic() - started < 5
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            response = b""
            while b"\r\n\r\n" not in response:
                response += conn.recv(65536)
            head, _, body = response.partition(b"\r\n\r\n")
            length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))
            while len(body) < length:  # the whole response, so what follows is the deadline's close
                body += conn.recv(65536)
            assert head.startswith(b"HTTP/1.1 200")
            conn.sendall(b"GET /v1/models HTTP/1.1\r\n")  # the next request's headers never end
            assert conn.recv(4096) == b""
        assert httpx.get(f"{url}/models").status_code == 200


def test_arrivals_share_one_gate_pass_and_a_failing_one_fails_alone(reference, specs, monkeypatch):
    """Jobs that arrive together with the same steering get one `row_edits` call (one gate pass, shared edit
    objects); a conversation over the gate's turn limit among them is a 400 alone."""
    import asyncio

    from saesteer import serve
    from saesteer.detectors import GATE_TURNS
    from saesteer.steering import Conditional

    spec = {
        "method": "conditional",
        "steering": specs["actadd"],
        "detector": specs["actadd"]["direction"],
        "threshold": -1e9,
    }
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(GATE_TURNS + 1)]
    calls, row_edits = [], Conditional.row_edits
    monkeypatch.setattr(
        Conditional,
        "row_edits",
        lambda self, loaded, prompts: calls.append(len(prompts)) or row_edits(self, loaded, prompts),
    )
    loop = asyncio.new_event_loop()
    engine = serve._EngineThread(reference, 4)

    def jobs(*conversations):
        rendered = chat_prompts(reference, list(conversations))
        return [
            serve._Job(
                serve.Reply(reference.tokenizer(r, add_special_tokens=False)["input_ids"]),
                steering_from_dict(spec),
                spec,
                False,
                loop,
                reference.tokenizer,
            )
            for r in rendered
        ]

    together = jobs(USER, USER)
    assert engine._prepare(together) == together and calls == [2]
    assert together[0].request.edits[0][2] is together[1].request.edits[0][2]  # one edit object for both rows
    calls.clear()
    mixed = jobs(USER, long, USER)
    assert engine._prepare(mixed) == [mixed[0], mixed[2]] and calls == [3, 1, 1, 1]
    assert mixed[1].finish == "error" and mixed[0].finish is None and mixed[2].request.edits
    loop.close()


def test_a_conversation_over_the_gate_s_turn_limit_is_a_400(served, specs):
    """Issue 25 item 1: a conversation the gate would score turn by turn past its limit is refused before
    the engine thread sees it; the limit is the gate's alone."""
    from saesteer.detectors import GATE_TURNS

    gated = {"method": "conditional", "steering": specs["actadd"], "detector": specs["actadd"]["direction"]}
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(GATE_TURNS + 1)]
    response = raw(served[0], {"messages": long, "steering": gated, "max_tokens": 2})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "messages", response.text
    assert (
        f"the conversation has {GATE_TURNS + 1} turns; the harm gate scores at most {GATE_TURNS}"
        in error["message"]
    )
    unsteered = raw(
        served[0], {"messages": long, "max_tokens": 2}
    )  # only the test's small prompt limit applies
    assert (
        "harm gate" not in unsteered.text and unsteered.json()["error"]["code"] == "context_length_exceeded"
    )
