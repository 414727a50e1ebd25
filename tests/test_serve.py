"""The OpenAI-compatible server, run for real with uvicorn on loopback and driven by the openai client."""

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn
from conftest import run_cli

from saesteer.models import chat_prompts, generate, load_model
from saesteer.sae import SAE, SAEConfig
from saesteer.serve import ServeConfig, create_app
from saesteer.steering import PRESETS, load_sae, save_direction, steering_from_dict

QUESTIONS = ["the quick brown fox", "sparse autoencoders steer models over the lazy dog", "jumps", "lazy dog"]
LIMITS = dict(model_name="tiny", max_tokens=24, default_max_tokens=8, max_prompt_tokens=230, max_batch_size=8,
              max_body_bytes=20_000)


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
    save_direction(folder / "refusal.safetensors", torch.randn(64, generator=torch.Generator().manual_seed(2)), layer=2, model="tiny")
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=64, n_latents=256, k=8, norm_scale=0.37, layer=1, model="tiny"))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
    sae.save(folder / "sae")
    load_sae.cache_clear()
    return {"actadd": {"method": "actadd", "direction": str(folder / "refusal.safetensors"), "alpha": 30.0},
            "sae": {"method": "sae", "sae": str(folder / "sae"), "features": [5, 17], "values": [60.0, 40.0]}}


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    """(base url, served LoadedModel) of a real uvicorn server in a background thread."""
    loaded = load_model(str(tiny_model_dir))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(loaded, ServeConfig(**LIMITS)), log_level="warning"))
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
        return generate(loaded, chat_prompts(loaded, [method.prepare([{"role": "user", "content": question}])]), max_tokens)[0]


def ask(client, question: str, steering=None, **kw):
    extra = {"steering": steering} if steering is not None else None
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}], extra_body=extra, **kw)


def streamed(client, question: str, steering=None, **kw) -> tuple[str, list]:
    chunks = list(ask(client, question, steering, stream=True, stream_options={"include_usage": True}, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_models_and_presets(client, served):
    [model] = client.models.list().data
    assert model.id == "tiny" and model.model_extra["steering_presets"] == list(PRESETS)
    listing = httpx.get(f"{served[0]}/steering").json()
    assert {p["name"]: p["spec"] for p in listing["data"]} == PRESETS and listing["default"] == {"method": "none"}


def test_unsteered_reply_equals_generate(client, reference):
    for question in QUESTIONS[:2]:
        reply = ask(client, question, temperature=0, max_tokens=12)
        assert reply.choices[0].message.content == expected(reference, question, max_tokens=12)
        assert reply.object == "chat.completion" and reply.choices[0].finish_reason in ("stop", "length")
        prompt = chat_prompts(reference, [[{"role": "user", "content": question}]])[0]
        assert reply.usage.prompt_tokens == len(reference.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert 1 <= reply.usage.completion_tokens <= 12
    assert ask(client, QUESTIONS[0]).choices[0].message.content == expected(reference, QUESTIONS[0], max_tokens=8)  # default 8


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


@pytest.mark.parametrize("name", ["actadd", "sae", "system_prompt"])
def test_steered_reply_equals_direct_steering(client, reference, specs, name):
    steering = specs.get(name, name)
    reply = ask(client, QUESTIONS[0], steering, max_tokens=12)
    assert reply.choices[0].message.content == expected(reference, QUESTIONS[0], steering, max_tokens=12)
    assert reply.choices[0].message.content != expected(reference, QUESTIONS[0], max_tokens=12)
    assert reply.model_extra["steering"]["method"] == (steering["method"] if isinstance(steering, dict) else name)
    if isinstance(steering, dict):  # a spec may also come as a JSON string
        assert ask(client, QUESTIONS[0], json.dumps(steering), max_tokens=12).choices[0].message.content == reply.choices[0].message.content


def test_sampling_is_seeded(client):
    kw = dict(temperature=1.5, top_p=0.95, max_tokens=16)
    first, again = (ask(client, QUESTIONS[2], seed=7, **kw).choices[0].message.content for _ in range(2))
    others = {ask(client, QUESTIONS[2], seed=seed, **kw).choices[0].message.content for seed in range(8, 12)}
    assert first == again and len(others | {first}) > 1


def test_concurrent_mixed_requests_batch_without_leaking(client, served, reference, specs, monkeypatch):
    """Twelve requests at once, four steerings, three lengths: each reply equals its own direct reference,
    and the worker really batched (the first generate call is held until the rest are queued)."""
    model, batches = served[1].model, []
    real_generate = model.generate

    def recording_generate(**kw):
        if not batches:
            time.sleep(0.5)  # let every other request queue up behind the first
        batches.append(kw["input_ids"].shape[0])
        return real_generate(**kw)

    monkeypatch.setattr(model, "generate", recording_generate, raising=False)
    jobs = [(QUESTIONS[i % 4], steering, 4 + 4 * (i % 3))
            for i, steering in enumerate([None, specs["actadd"], specs["sae"], "system_prompt"] * 3)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda job: ask(client, job[0], job[1], max_tokens=job[2]).choices[0].message.content, jobs))
    assert replies == [expected(reference, q, s, max_tokens=m) for q, s, m in jobs]
    assert len(batches) < len(jobs) and max(batches) > 1, batches


def raw(url: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}/chat/completions", content=content, headers={"content-type": "application/json"}, **kw)


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, status, message", [
    (b'{"messages": [', 400, "request body is not valid JSON"),
    (b"[1, 2]", 400, "request body must be a JSON object"),
    ({"model": "tiny"}, 400, "messages: Field required"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role: Input should be"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "only text content parts are supported"),
    ({"messages": USER, "steering": "nope"}, 400, "unknown steering preset 'nope'"),
    ({"messages": USER, "steering": "{bad"}, 400, "steering is not valid JSON"),
    ({"messages": USER, "steering": {"method": "magic"}}, 400, "unknown steering method 'magic'"),
    ({"messages": USER, "steering": {"method": "actadd", "direction": "d", "alpha": "x"}}, 400, "bad actadd steering field alpha"),
    ({"messages": USER, "steering": {"method": "actadd", "colour": 1}}, 400, "unexpected keyword argument 'colour'"),
    ({"messages": USER, "steering": {"method": "sae", "sae": "s", "features": 5, "values": [1]}}, 400, "bad fields for steering method 'sae'"),
    ({"messages": USER, "steering": {"method": "conditional", "steering": "x", "detector": "d"}}, 400, "bad steering spec"),
    ({"messages": USER, "steering": {"method": "conditional", "steering": {"method": "actadd", "alpha": "x"}, "detector": "d"}}, 400,
     "bad actadd steering field alpha"),
    ({"messages": USER, "steering": [1]}, 400, "steering must be a preset name or a spec object"),
    ({"messages": USER, "steering": {"method": "sae", "sae": "SAE", "features": [999], "values": [1]}}, 400,
     "feature index 999 is out of range"),
    ({"messages": USER, "steering": {"method": "sae", "sae": "SAE", "features": [999], "values": [1]}, "stream": True}, 400,
     "feature index 999 is out of range"),
    ({"messages": USER, "steering": {"method": "actadd", "direction": "missing.safetensors"}}, 400, "cannot read direction file"),
    ({"messages": USER, "max_tokens": 25}, 400, "max_tokens 25 is above this server's limit of 24"),
    ({"messages": USER, "max_completion_tokens": 0}, 400, "max_completion_tokens: Input should be greater than or equal to 1"),
    ({"messages": USER, "n": 2}, 400, "n=2 is not supported"),
    ({"messages": [{"role": "user", "content": "fox " * 300}]}, 400, "the prompt is"),
    ({"messages": [{"role": "user", "content": "x" * 30_000}]}, 413, "above this server's limit of 20000"),
])
def test_bad_requests_get_openai_errors(served, specs, body, status, message):
    if isinstance(body, dict) and isinstance(body.get("steering"), dict) and body["steering"].get("sae") == "SAE":
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


def test_cli_serve_answers(tiny_model_dir, specs, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = tmp_path / "default.json"
    spec.write_text(json.dumps(specs["actadd"]))
    command = [sys.executable, "-m", "saesteer", "serve", "--model", str(tiny_model_dir), "--port", str(port),
               "--steering", str(spec), "--max-tokens", "8"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        deadline = time.time() + 60
        while True:
            try:
                assert client.models.list().data[0].model_extra["default_steering"]["method"] == "actadd"
                break
            except openai.APIConnectionError:
                assert process.poll() is None and time.time() < deadline, process.stdout.read() if process.poll() is not None else "timeout"
                time.sleep(0.2)
        reply = ask(client, "hi")
        assert reply.model_extra["steering"]["method"] == "actadd" and reply.usage.completion_tokens <= 8
    finally:
        process.terminate()
        process.wait(10)


def test_cli_serve_bad_default_steering_is_one_line(monkeypatch, capsys, tiny_model_dir):
    code, out = run_cli(monkeypatch, capsys, "serve", "--model", str(tiny_model_dir), "--steering", '{"method": "nope"}')
    assert code == 2 and "unknown steering method 'nope'" in out.err and "Traceback" not in out.err
