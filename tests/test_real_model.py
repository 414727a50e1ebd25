"""Tests on the real embedded default model (SmolLM2-135M-Instruct): slow, but CI runs them."""

import sys

import pytest
import torch
from conftest import needs_default_model

from saesteer.cli import main
from saesteer.hooks import residual_at
from saesteer.models import load_model

pytestmark = [pytest.mark.slow, needs_default_model]


@pytest.fixture(scope="module")
def default():
    return load_model()


def test_default_model_shape_and_chat_template(default):
    assert (default.n_layers, default.d_model) == (30, 576)
    prompt = default.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.rstrip().endswith("<|im_start|>assistant")


def test_early_exit_equals_output_hidden_states_at_layer_10(default):
    ids = default.tokenizer(
        ["The capital of France is Paris.", "Sparse autoencoders find features."],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        full = default.model(**ids, output_hidden_states=True).hidden_states[11]
    early = residual_at(default.model, ids["input_ids"], 10, attention_mask=ids["attention_mask"])
    torch.testing.assert_close(early, full, rtol=0, atol=0)


def test_cli_collect_smoke(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(
        sys, "argv", ["saesteer", "collect", "--tokens", "2048", "--out", str(tmp_path / "acts")]
    )
    try:
        main()
    except SystemExit as done:
        assert done.code in (0, None)
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct layer 10 (resid_post), d_model 576" in out
    assert "8 x 256 tokens" in out
