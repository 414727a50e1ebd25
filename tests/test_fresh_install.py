"""Every verb on a fresh install: no ../shared/datasets (SAESTEER_SHARED_DATA points at an empty folder).

Runs on a tiny random Llama, so it checks data dependencies, not model quality; the default-model
demo is covered in test_demo.py.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


@pytest.fixture
def no_shared(monkeypatch, tmp_path):
    empty = tmp_path / "empty-shared"
    empty.mkdir()
    monkeypatch.setenv("SAESTEER_SHARED_DATA", str(empty))
    return empty


@pytest.mark.slow
def test_every_verb_runs_without_shared_data(
    no_shared, monkeypatch, capsys, tiny_model_dir, tiny_sae, tmp_path, one_thread
):
    model = str(tiny_model_dir)

    def ok(*args):
        code, out = run_cli(monkeypatch, capsys, *args)
        assert code == 0, f"saesteer {args[0]} failed without shared data: {out.err}"
        return out.out

    ok(
        "collect",
        "--model",
        model,
        "--layer",
        "1",
        "--tokens",
        "2048",
        "--ctx",
        "64",
        "--out",
        str(tmp_path / "acts"),
    )
    ok(
        "train",
        "--activations",
        str(tmp_path / "acts"),
        "--out",
        str(tmp_path / "sae"),
        "--expansion-factor",
        "2",
        "--k",
        "4",
        "--tokens",
        "4096",
        "--batch-size",
        "512",
        "--dead-tokens",
        "2048",
    )
    ok(
        "discover",
        "--sae",
        str(tiny_sae),
        "--model",
        model,
        "--limit",
        "4",
        "--n-candidates",
        "1",
        "--n-attribution",
        "1",
        "--screen-values",
        "4",
        "--max-new-tokens",
        "2",
        "--screen-prompts",
        "2",
        "--detector-layer",
        "3",
        "--out",
        str(tmp_path / "disc"),
    )
    detector = json.loads((tmp_path / "disc" / "discovery.json").read_text())["detector"]
    assert detector["n_negatives"] > 500  # XSTest-safe and the shipped benign set, no Alpaca prompts
    spec = json.dumps({"method": "sae", "sae": str(tiny_sae), "features": [3], "values": [8.0]})
    ok("steer", "--model", model, "--steering", spec, "--prompt", "hi", "--max-new-tokens", "2")
    results = tmp_path / "eval.jsonl"
    ok(
        "eval",
        "--model",
        model,
        "--steering",
        spec,
        "--suite",
        "safety,capability,jailbreak,fidelity",
        "--limit",
        "2",
        "--max-new-tokens",
        "2",
        "--gsm8k-max-new-tokens",
        "2",
        "--mmlu-shots",
        "0",
        "--jailbreak-turns",
        "2",
        "--out",
        str(results),
    )
    datasets = {json.loads(line)["config"]["dataset"] for line in results.read_text().splitlines()}
    assert {
        "advbench",
        "xstest_unsafe",
        "hh_rlhf_harmful",
        "xstest_safe",
        "benign",
        "mmlu",
        "gsm8k",
    } <= datasets
    assert not datasets & {"harmless", "harmful_mix"}  # not vendored: skipped, not failed
    ok("report", "--results", str(results), "--out", str(tmp_path / "report"))
    _serve_answers(tiny_model_dir)
    ok(
        "demo",
        "--model",
        model,
        "--train-sae",
        "--out",
        str(tmp_path / "demo"),
        "--examples",
        "1",
        "--limit",
        "2",
        "--max-new-tokens",
        "2",
    )
    code, out = run_cli(monkeypatch, capsys, "reproduce", "--preset", "tiny", "--out", str(tmp_path / "rep"))
    assert code == 2 and "corpus" in out.err and "--shared" in out.err and "Traceback" not in out.err


def _serve_answers(model_dir) -> None:
    from fastapi.testclient import TestClient

    from saesteer.models import load_model
    from saesteer.serve import ServeConfig, create_app

    with TestClient(
        create_app(load_model(str(model_dir)), ServeConfig(model_name="tiny", default_max_tokens=2))
    ) as client:
        answer = client.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        )
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] is not None, (
        answer.text
    )
