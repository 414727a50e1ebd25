"""The runtime harm gate of conditional steering: a detector file, read once, scoring chat-rendered prompts.
(`saesteer.gate` trains and chooses detectors.)

A detector scores a chat-rendered prompt from the residual stream; the gate fires when score > threshold.
Every detector here is linear in pooled features, score = sum_l w[l] . pool(f(h_l)) + b, where f is the
identity or, for `sae_probe`, an SAE's encoder, so one safetensors file (`weight` [n_layers, width] plus
metadata) holds any kind:

- `dim`: the unit diff-in-means direction, harmful minus benign, at one layer (the old detector; b = 0);
- `probe`: L2 logistic regression on standardised features at one layer;
- `ensemble`: the mean logit of one probe per layer (still linear: one weight row per layer);
- `sae_probe`: L1 (sparse) logistic regression on pooled SAE codes, the paper's features as detectors.

Pooling: `last` is the mean of the last `tokens` positions (the template's tail; the old detector used 4);
`user` is the mean over everything between the template's fixed head (system prompt, user header) and its
tail, i.e. the user's message, or in a multi-turn prompt the conversation so far; `max` is the per-feature
maximum over those same positions (a feature that fires anywhere in the message counts in full).

Probes weight every source equally (each class's weight is split evenly over its sources), so a large
source cannot dominate what "harmful" means.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from saesteer.artefacts import file_identity, layer_of, load_sae
from saesteer.config import RESIDUAL_POINTS
from saesteer.errors import SaesteerError, short
from saesteer.hooks import residuals_at
from saesteer.models import (
    WORD_JOINER,
    LoadedModel,
    Messages,
    chat_prompts,
    rendered_batches,
    special_strings,
)
from saesteer.sae import SAE

POOLINGS = ("last", "user", "max")
GATE_TURNS = 32  # the most turns of one conversation the gate scores (each is one extra row of a pass)
GATE_BATCH = 16  # turns scored together


# ---------------------------------------------------------------- scoring a prompt


@dataclass
class Detector:
    """A linear harm score over pooled (optionally SAE-encoded) residual-stream features."""

    kind: str
    layers: tuple[int, ...]
    weight: torch.Tensor  # [n_layers, width]
    bias: float = 0.0
    pooling: str = "last"
    tokens: int = 4
    sae: str | None = None
    hook_point: str = "resid_post"
    meta: dict = field(default_factory=dict)
    loaded_sae: SAE | None = field(default=None, repr=False, compare=False)
    """`sae` once `sae_model` has loaded it"""

    def sae_model(self) -> SAE | None:
        """The detector's SAE (None for none), loaded on first use and kept with the detector, so a server can
        check its path before it is read and never reads it again."""
        if self.sae is not None and self.loaded_sae is None:
            self.loaded_sae = load_sae(self.sae)
        return self.loaded_sae

    def save(self, path: str | Path, model: str, **meta) -> None:
        info = {
            "kind": self.kind,
            "layers": json.dumps(list(self.layers)),
            "bias": repr(self.bias),
            "pooling": self.pooling,
            "tokens": str(self.tokens),
            "sae": self.sae or "",
            "hook_point": self.hook_point,
            "model": model,
            **{k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()},
        }
        save_file({"weight": self.weight.detach().float().cpu().contiguous()}, str(path), metadata=info)

    def scores(
        self, loaded: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Score per row [batch] of left-padded, chat-rendered prompts."""
        for layer in self.layers:
            loaded.check_layer(layer)
        if self.sae is None and self.weight.shape[-1] != loaded.d_model:
            raise SaesteerError(
                f"detector has width {self.weight.shape[-1]} but {loaded.spec} has d_model={loaded.d_model}"
            )
        hidden = residuals_at(loaded.model, input_ids, self.layers, self.hook_point, attention_mask)
        weights = position_weights(loaded, input_ids, attention_mask, self.pooling, self.tokens)
        total = torch.full((input_ids.shape[0],), self.bias, device=input_ids.device)
        for row, layer in zip(self.weight.to(input_ids.device), self.layers):
            features = features_of(hidden[layer].float(), self.sae_model())
            total += pool(features, weights, self.pooling) @ row
        return total


def load_detector(path: str, layer: int | None = None, tokens: int = 4) -> Detector:
    """A detector file from `saesteer gate`, or a direction file (a `dim` detector at `layer`, default its
    own, pooled over the last `tokens` positions), read once per file however it is spelled (at most 16 are
    kept). A detector's own SAE is named by its real path, so a server checks the file it will read."""
    try:
        identity = file_identity(path)
    except (OSError, ValueError, RuntimeError):  # missing, a name too long or with NUL, a symlink loop
        raise SaesteerError(f"cannot read detector file {short(path)}: no such file") from None
    return _load_detector_file(*identity, layer=layer, tokens=tokens)


@functools.lru_cache(maxsize=16)
def _load_detector_file(path: str, *identity, layer: int | None, tokens: int) -> Detector:
    try:
        with safe_open(path, "pt") as f:
            names, meta = set(f.keys()), f.metadata() or {}
            tensor = f.get_tensor("weight" if "weight" in names else "direction").float()
    except Exception as err:  # a bad header, a missing tensor
        raise SaesteerError(f"cannot read detector file {short(path)}: {short(str(err), 200)}") from None
    if "weight" not in names:
        return Detector(
            "dim",
            (layer_of(meta, path) if layer is None else layer,),
            (tensor / tensor.norm())[None],
            pooling="last",
            tokens=tokens,
            hook_point=meta.get("hook_point", "resid_post"),
            meta=meta,
        )
    try:
        layers = json.loads(meta["layers"])
        if not (
            isinstance(layers, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
        ):
            raise ValueError(f"layers {short(meta['layers'])!r} is not a list of integers")
        detector = Detector(
            meta["kind"],
            tuple(layers),
            tensor,
            float(meta["bias"]),
            meta["pooling"],
            int(meta["tokens"]),
            _real_sae(meta["sae"]),
            meta.get("hook_point", "resid_post"),
            meta,
        )
        if detector.hook_point not in RESIDUAL_POINTS or detector.pooling not in POOLINGS:
            raise ValueError(
                f"hook point {short(detector.hook_point)!r} or pooling {short(detector.pooling)!r}"
            )
        if not layers or tensor.shape[0] != len(layers):
            raise ValueError(f"{len(layers)} layers for a weight of shape {tuple(tensor.shape)}")
        if not (math.isfinite(detector.bias) and detector.tokens >= 1):
            raise ValueError(f"bias {detector.bias} or tokens {detector.tokens}")
    except (KeyError, ValueError, TypeError) as err:
        raise SaesteerError(
            f"detector file {short(path)} lacks valid metadata ({short(str(err), 200)})"
        ) from None
    return detector


def _real_sae(path: str) -> str | None:
    """A detector's SAE by its real path (a `saelens:` name as it is; None for none)."""
    if not path or path.startswith("saelens:"):
        return path or None
    try:
        return file_identity(path)[0]
    except (OSError, ValueError, RuntimeError):
        raise ValueError(f"its SAE {short(path)!r} is missing") from None


def template_ends(loaded: LoadedModel) -> tuple[str, str]:
    """The chat template's text before and after a single user message (head, tail)."""
    return _template_ends(loaded.tokenizer, datetime.date.today())


MARKS = {
    "system": "\u2063S\u2063",
    "user": "\u2063A\u2063",
    "assistant": "\u2063B\u2063",
    "next": "\u2063C\u2063",
}


@functools.lru_cache(maxsize=8)
def _template_ends(tokenizer, day: datetime.date) -> tuple[str, str]:
    """(`day` keys the cache: some templates print today's date.)"""
    head, tail = _render(tokenizer, [{"role": "user", "content": MARKS["user"]}]).split(MARKS["user"])
    return head, tail


@functools.lru_cache(maxsize=8)
def _segmenter(tokenizer, day: datetime.date) -> tuple[re.Pattern | None, tuple[str, ...], frozenset[str]]:
    """How `turns` cuts a rendering: (a pattern matching the tokenizer's special-token strings, the headers
    that precede a message's text between them (e.g. "user\\n"), the template's own text between them)."""
    specials = special_strings(tokenizer)
    if not specials:
        return None, (), frozenset()
    pattern = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))))
    conversations = [
        [{"role": "user", "content": MARKS["user"]}],
        _conversation(MARKS["user"], MARKS["assistant"], MARKS["next"]),
        [{"role": "system", "content": MARKS["system"]}, {"role": "user", "content": MARKS["user"]}],
    ]
    segments = []
    for conversation in conversations:
        try:
            segments += pattern.split(_render(tokenizer, conversation))
        except Exception:  # noqa: BLE001 - a template that refuses a system message
            continue
    marked = {s for s in segments if any(m in s for m in MARKS.values())}
    found = {s.split(m)[0] for s in marked for m in MARKS.values() if m in s}
    headers = tuple(sorted(found - {""}, key=len, reverse=True))
    fixed = {
        _without_header(s, headers).strip() for s in set(segments) - marked
    }  # e.g. a default system prompt
    return pattern, headers, frozenset(fixed)


def _without_header(segment: str, headers: tuple[str, ...]) -> str:
    return segment[len(next((h for h in headers if segment.startswith(h)), "")) :]


def _conversation(*texts: str) -> Messages:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def _render(tokenizer, conversation: Messages) -> str:
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def template_margins(loaded: LoadedModel) -> tuple[int, int]:
    """Tokens of the template head and tail around a single user message (computed once per tokenizer)."""
    return _margins(loaded.tokenizer, template_ends(loaded))


@functools.lru_cache(maxsize=8)
def _margins(tokenizer, ends: tuple[str, str]) -> tuple[int, int]:
    return tuple(len(tokenizer(text, add_special_tokens=False).input_ids) for text in ends)


def position_weights(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pooling: str,
    tokens: int,
) -> torch.Tensor:
    """[batch, pos] weights that average the pooled positions of each left-padded row."""
    batch, length = input_ids.shape
    position = torch.arange(length, device=input_ids.device)[None].expand(batch, -1)
    if pooling == "last":
        keep = position >= length - tokens
    elif pooling in ("user", "max"):
        real = (
            attention_mask.sum(1, keepdim=True)
            if attention_mask is not None
            else torch.full((batch, 1), length, device=input_ids.device)
        )
        head, tail = template_margins(loaded)
        keep = (position >= length - real + head) & (position < length - tail)
        keep |= ~keep.any(1, keepdim=True) & (position == length - 1)  # no user span: the last token
    else:
        raise SaesteerError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
    keep = keep.float()
    return keep / keep.sum(1, keepdim=True)


def features_of(hidden: torch.Tensor, sae: SAE | str | None) -> torch.Tensor:
    """[batch, pos, d] residual stream -> the detector's per-position features: itself, or the codes of an SAE
    (loaded, or its path)."""
    if sae is None:
        return hidden
    model = load_sae(sae) if isinstance(sae, str) else sae
    return (
        model.encode(hidden.reshape(-1, hidden.shape[-1]).to(model.W_enc.dtype))
        .float()
        .reshape(*hidden.shape[:2], -1)
    )


def pool(features: torch.Tensor, weights: torch.Tensor, pooling: str = "user") -> torch.Tensor:
    """[batch, pos, width] x [batch, pos] -> [batch, width]: the weighted mean, or for `max` pooling the
    maximum over the positions of non-zero weight."""
    if pooling == "max":
        return features.masked_fill(weights[..., None] == 0, float("-inf")).amax(1)
    return torch.einsum("bpw,bp->bw", features, weights.to(features.dtype))


def turns(loaded: LoadedModel, rendered: str) -> list[str]:
    """The text of every message of a chat-rendered conversation, system, user or assistant, cut wherever the
    tokenizer's special-token strings stand (escaped by `as_text` or not), so a turn forged inside a message
    is a turn; the template's own text (headers, a default system prompt) is left out. [] for a template
    without special tokens."""
    pattern, headers, fixed = _segmenter(loaded.tokenizer, datetime.date.today())
    if pattern is None:
        return []
    found = []
    for segment in pattern.split(rendered.replace(WORD_JOINER, "")):
        text = _without_header(segment, headers)
        if text.strip() and text.strip() not in fixed:
            found.append(text)
    return found


def gate_scores(
    loaded: LoadedModel, detector: Detector, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Per row: the maximum of the score of the whole conversation and of each of its turns (`turns`: system,
    user or assistant, forged or real) scored alone as a user message, so an earlier or forged harmful turn
    scores as it would sent plainly. A conversation of over `GATE_TURNS` turns is refused before any pass."""
    found: list[tuple[int, str]] = []
    for row, ids in enumerate(input_ids):
        real = ids[attention_mask[row].bool()] if attention_mask is not None else ids
        text = loaded.tokenizer.decode(real, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        messages = turns(loaded, text)
        if len(messages) > GATE_TURNS:
            raise SaesteerError(
                f"the conversation has {len(messages)} turns; the harm gate scores at most {GATE_TURNS}"
            )
        plain = len(messages) == 1 and text.startswith(template_ends(loaded)[0])  # no system message either
        if messages and not plain:
            found += [(row, message) for message in messages]
    scores = detector.scores(loaded, input_ids, attention_mask)
    found.sort(key=lambda turn: len(turn[1]))  # similar lengths pad little
    rendered = chat_prompts(loaded, [[{"role": "user", "content": m}] for _, m in found])
    rows = iter(row for row, _ in found)
    for batch in rendered_batches(loaded, rendered, GATE_BATCH):
        for row, score in zip(rows, detector.scores(loaded, batch["input_ids"], batch["attention_mask"])):
            scores[row] = torch.maximum(scores[row], score)
    return scores


def score_prompts(
    loaded: LoadedModel, detector: Detector, conversations: list[Messages], batch_size: int = 16
) -> torch.Tensor:
    """The gate score of each conversation (a plain string is one user turn)."""
    conversations = [[{"role": "user", "content": c}] if isinstance(c, str) else c for c in conversations]
    rendered = chat_prompts(loaded, conversations)
    out = []
    for batch in rendered_batches(loaded, rendered, batch_size):
        with torch.inference_mode():
            out.append(gate_scores(loaded, detector, batch["input_ids"], batch["attention_mask"]).cpu())
    return torch.cat(out) if out else torch.zeros(0)
