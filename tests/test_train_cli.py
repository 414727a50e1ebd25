"""`saesteer train` and `saesteer evaluate-sae` end to end on a tiny model and cache."""

import json

import pytest
from conftest import run_cli

from saesteer.sae import SAE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(tiny_model_dir, text_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "acts"
    code, _ = run_cli(
        monkeypatch,
        capsys,
        "collect",
        "--model",
        str(tiny_model_dir),
        "--layer",
        "1",
        "--data",
        str(text_file),
        "--tokens",
        "1280",
        "--ctx",
        "32",
        "--contexts-per-shard",
        "8",
        "--out",
        str(out),
    )
    assert code in (0, None)
    return out


def test_train_then_evaluate(monkeypatch, capsys, cache, tiny_model_dir, tmp_path):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"k": 4, "warmup_steps": 2, "init_tokens": 512}))
    out = tmp_path / "sae"
    code, res = run_cli(
        monkeypatch,
        capsys,
        "train",
        "--activations",
        str(cache),
        "--out",
        str(out),
        "--config",
        str(config),
        "--n-latents",
        "128",
        "--batch-size",
        "128",
        "--tokens",
        "1280",
        "--device",
        "cpu",
    )
    assert code in (0, None), res.err
    assert "trained TopK SAE d_in 64 x 128 latents, k 4, 1,280 tokens (10 steps)" in res.out
    sae = SAE.load(out / "sae")
    assert (
        sae.cfg.layer == 1
        and sae.cfg.model == str(tiny_model_dir)
        and sae.cfg.training_data["n_contexts"] == 40
    )

    # Held-out text defaults to the SAE's training source after the contexts its cache used.
    code, res = run_cli(monkeypatch, capsys, "evaluate-sae", "--sae", str(out / "sae"), "--contexts", "4")
    assert code in (0, None), res.err
    for line in (
        "FVU",
        "L0",
        "dead latents",
        "dense latents",
        "CE clean",
        "CE with SAE",
        "CE zero-ablated",
        "loss recovered",
        "KL(clean||SAE)",
    ):
        assert line in res.out


def test_train_errors_are_one_line(monkeypatch, capsys, cache, tmp_path):
    code, res = run_cli(
        monkeypatch, capsys, "train", "--activations", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")
    )
    assert code == 2 and "holds no activation cache" in res.err and "Traceback" not in res.err
    code, res = run_cli(
        monkeypatch,
        capsys,
        "train",
        "--activations",
        str(cache),
        "--out",
        str(tmp_path / "o"),
        "--k",
        "0",
    )
    assert code == 2 and "k must be positive" in res.err  # the config's own check, one line
    code, res = run_cli(monkeypatch, capsys, "train", "--activations", str(cache), "--batch-size", "0")
    assert code == 2 and "Invalid value for '--batch-size'" in res.err  # the option's bound, before any work
    code, res = run_cli(monkeypatch, capsys, "evaluate-sae", "--sae", str(tmp_path / "missing"))
    assert code == 2 and "cannot read SAE" in res.err


def test_train_streams_from_a_model(monkeypatch, capsys, tiny_model_dir, text_file, tmp_path):
    """Issue 24 item 5: `train --model` trains on activations computed on the fly, with no cache on disk."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "streamed"
    code, res = run_cli(
        monkeypatch, capsys, "train", "--model", str(tiny_model_dir), "--layer", "1", "--data", str(text_file),
        "--ctx", "32", "--contexts-per-shard", "8", "--out", str(out), "--n-latents", "128", "--k", "4",
        "--batch-size", "128", "--tokens", "1280", "--init-tokens", "512", "--device", "cpu",
    )  # fmt: skip
    assert code in (0, None), res.err
    assert "trained TopK SAE d_in 64 x 128 latents, k 4, 1,280 tokens (10 steps)" in res.out
    assert SAE.load(out / "sae").cfg.layer == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed"]  # nothing else written
