"""Read and edit the residual stream at one decoder layer of any HF causal LM.

`edit_residual` is the single hook utility the whole package uses; `residual_at` runs the model
only up to the hooked layer (early exit) and returns the residual stream there; `residuals_at` does the
same for several layers in one pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from saesteer.config import RESIDUAL_POINTS
from saesteer.errors import SaesteerError

# "logits": the output head's logits [batch, pos, vocab]; "input_ids": the token ids [batch, pos] entering the
# embeddings (read only: how a schedule sees which tokens were generated).
LAYERLESS_POINTS = ("logits", "input_ids")  # hook points where the layer is ignored
HOOK_POINTS = (*RESIDUAL_POINTS, *LAYERLESS_POINTS)
# Where common architectures keep their decoder layers (Llama, Phi-3, Qwen2, Gemma2, Mistral | GPT-2 | NeoX).
_LAYER_PATHS = (
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "model.language_model.layers",
)

ResidualFn = Callable[[torch.Tensor], "torch.Tensor | None"]
_ROW_KEYS = itertools.count()  # row identities, unique in the process


@dataclass
class Rows:
    """The rows of one batched forward pass as a steering edit sees them: either a prefill (every position is
    a prompt token) or a decoding step (each row feeds one generated token)."""

    keys: list[int]
    """one identity per row, fixed from its prefill to its last token (per-row state is keyed by it)"""
    replies: list[list[int]]
    """each row's generated token ids so far; in a decoding step the last one is the token fed now"""
    prefill: bool
    """whether this pass runs prompts (True) or one decoding step (False)"""

    @classmethod
    def prompts(cls, n: int) -> Rows:
        """A prefill of `n` new rows."""
        return cls([next(_ROW_KEYS) for _ in range(n)], [[] for _ in range(n)], True)

    def t(self) -> list[int]:
        """Per row, the index of the generated token fed in this pass (-1 in a prefill)."""
        return [len(reply) - 1 for reply in self.replies]

    def subset(self, index: list[int]) -> Rows:
        return Rows([self.keys[i] for i in index], [self.replies[i] for i in index], self.prefill)


# A steering edit: (layer, hook point, fn); fn(tensor [n, T, ...] of the pass's rows, their `Rows`) returns the
# edited tensor, or None to leave it unchanged. The layer is ignored at LAYERLESS_POINTS.
EditFn = Callable[[torch.Tensor, Rows], "torch.Tensor | None"]
Edit = tuple[int, str, EditFn]


def edit_rows(fn: EditFn, h: torch.Tensor, rows: Rows, index: list[int] | None) -> torch.Tensor:
    """`h` [batch, ...] with `fn` applied to the rows in `index` alone (None: to every row)."""
    if index is not None and not index:
        return h
    if index is None or len(index) == h.shape[0]:  # every row (indices are distinct)
        new = fn(h, rows)
        return h if new is None else new
    at = torch.tensor(index, device=h.device)
    new = fn(h.index_select(0, at), rows.subset(index))
    return h if new is None else h.index_copy(0, at, new.to(h.dtype))


@contextmanager
def edits_applied(
    model: nn.Module, edits: list[Edit], gate: Callable[[], "list[int] | None"] | None = None
) -> Iterator[None]:
    """Within the block, every forward pass of `model` (an HF `generate`, a scoring pass) is steered by
    `edits`: a pass of several positions is a prefill of new rows, a one-position pass a decoding step that
    feeds each row's next generated token. `gate()` may name the rows to edit (None: every row)."""
    state: dict = {}

    def read_ids(ids: torch.Tensor) -> None:
        rows = state.get("rows")
        if ids.shape[1] > 1 or rows is None or len(rows.keys) != ids.shape[0]:
            state["rows"] = rows = Rows.prompts(ids.shape[0])
            rows.prefill = ids.shape[1] > 1
            if rows.prefill:
                return
        rows.prefill = False
        for reply, token in zip(rows.replies, ids[:, 0].tolist()):
            reply.append(token)

    def routed(fn: EditFn) -> ResidualFn:
        return lambda h: edit_rows(fn, h, state["rows"], gate() if gate else None)

    with ExitStack() as stack:
        stack.enter_context(edit_residual(model, 0, read_ids, "input_ids"))
        for layer, point, fn in edits:
            stack.enter_context(
                edit_residual(model, 0 if point in LAYERLESS_POINTS else layer, routed(fn), point)
            )
        yield


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks."""
    for path in _LAYER_PATHS:
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise SaesteerError(f"cannot find the decoder layers of {type(model).__name__}")


def _hidden_of(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def edit_residual(model: nn.Module, layer: int, fn: ResidualFn, point: str = "resid_post") -> Iterator[None]:
    """Within the block, call `fn(hidden)` on the residual stream [batch, pos, d] at `layer`.

    `point` is "resid_post" (output of decoder layer `layer`), "resid_pre" (its input), "logits" (the
    output head's logits) or "input_ids" (the token ids [batch, pos] entering the embeddings, read only);
    `layer` is ignored for the last two. If `fn` returns a tensor it replaces what it was given; returning
    None only reads it.
    """
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise SaesteerError(f"layer {layer} is out of range: the model has layers 0..{len(layers) - 1}")
    if point == "input_ids":

        def read_ids(_module, args, kwargs):
            if fn(args[0] if args else kwargs["input"]) is not None:
                raise SaesteerError("the input_ids hook point is read-only: token ids cannot be edited")

        handle = model.get_input_embeddings().register_forward_pre_hook(read_ids, with_kwargs=True)
    elif point == "logits":
        head = model.get_output_embeddings()
        if head is None:
            raise SaesteerError(f"{type(model).__name__} has no output head to edit logits at")
        handle = head.register_forward_hook(lambda _module, _args, output: fn(output))
    elif point == "resid_post":

        def post_hook(_module, _args, output):
            new = fn(_hidden_of(output))
            return None if new is None else _replace_hidden(output, new)

        handle = layers[layer].register_forward_hook(post_hook)
    elif point == "resid_pre":

        def pre_hook(_module, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        handle = layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        raise SaesteerError(f"unknown hook point {point!r}: use one of {', '.join(HOOK_POINTS)}")
    try:
        yield
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised by the early-exit hook to abandon the forward pass once the activation is captured."""


@torch.inference_mode()
def residuals_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    layers: tuple[int, ...],
    point: str = "resid_post",
    attention_mask: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """The residual stream [batch, pos, d] at each of `layers`, running only up to the last of them."""
    if point not in RESIDUAL_POINTS:
        raise SaesteerError(f"cannot read activations at {point!r}: use one of {', '.join(RESIDUAL_POINTS)}")
    captured: dict[int, torch.Tensor] = {}
    last = max(layers)

    def grab(layer: int) -> ResidualFn:
        def read(hidden: torch.Tensor) -> None:
            captured[layer] = hidden
            if layer == last:
                raise _StopForward

        return read

    with ExitStack() as stack:
        for layer in sorted(set(layers)):
            stack.enter_context(edit_residual(model, layer, grab(layer), point))
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    return captured


def residual_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    layer: int,
    point: str = "resid_post",
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The residual stream at `layer`, running only the layers up to it (no later layers, no lm_head)."""
    return residuals_at(model, input_ids, (layer,), point, attention_mask)[layer]
