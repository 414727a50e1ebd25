"""Steering methods behind one interface, so evals, the CLI and the server treat them alike.

A `Steering` may rewrite the conversation (`prepare`) and may edit the residual stream: `row_edits` gives
each rendered prompt its edits (`hooks.Edit`, called with the rows of each forward pass and their replies
so far), which `saesteer.engine` applies row by row while it generates; `with steering.applied(loaded):`
applies the same edits through hooks to the model's own forward passes (scoring, HF `generate`). Every
method serialises to JSON (`to_dict` / `steering_from_dict`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from saesteer import engine
from saesteer.artefacts import exists, layer_of, load_direction, load_sae, shipped_dir
from saesteer.detectors import Detector, gate_scores, load_detector
from saesteer.errors import SaesteerError, short
from saesteer.hooks import RESIDUAL_POINTS, Edit, EditFn, Rows, decoder_layers, edits_applied
from saesteer.judges import DECLINE_PHRASES, REFUSAL_MARKERS, normalise
from saesteer.models import LoadedModel, Messages, chat_prompts, left_padded
from saesteer.specs import (
    AblateSpec,
    ActAddSpec,
    ConditionalSpec,
    ReplyPrefixSpec,
    SAESpec,
    Spec,
    StackSpec,
    SystemPromptSpec,
    build,
)

T = TypeVar("T")


@dataclass
class Steering(Spec):
    """Unsteered: the base every runnable method extends. Each method is its spec (`saesteer.specs`: fields,
    checks, JSON form, label) plus the edits it makes."""

    @staticmethod
    def part(spec: dict) -> Steering:
        return steering_from_dict(spec)

    def edits(self, loaded: LoadedModel) -> list[Edit]:
        """The residual-stream edits this method makes (none for prompt-only methods)."""
        return []

    def row_edits(self, loaded: LoadedModel, prompts: list[list[int]]) -> list[list[Edit]]:
        """The edits of each rendered prompt (token ids), decided once per row: a conditional method's gate
        scores each prompt here; rows given the same edit objects are steered in one batched call."""
        return [self.edits(loaded)] * len(prompts)

    def _loaded(self, name: str, load: Callable[[], T]) -> T:
        """`load()`, once per steering object: what `check` loaded is what every later pass uses, so a server
        that checked a file never reads it again by its path."""
        kept = self.__dict__.setdefault("_kept", {})
        if name not in kept:
            kept[name] = load()
        return kept[name]

    def with_files(self, real: Callable[[str], str]) -> Steering:
        """The same steering reading each of its files at `real(path)` (a server pins the paths it checked)."""
        return steering_from_dict(self.with_paths(real))

    def check(self, loaded: LoadedModel) -> None:
        """Load this steering's files and check them against `loaded`: a bad file or setting raises
        SaesteerError here, never in the middle of a batch it shares."""
        self.edits(loaded)

    @contextmanager
    def applied(self, loaded: LoadedModel) -> Iterator[None]:
        """Inside the block, the model's own forward passes are steered (scoring, HF `generate`)."""
        with edits_applied(loaded.model, self.edits(loaded)):
            yield


@dataclass
class SystemPrompt(SystemPromptSpec, Steering):
    """Baseline: prepend (or replace) a safety system prompt (`specs.SystemPromptSpec`)."""


def _at_positions(positions: str, fn: EditFn) -> EditFn:
    """Restrict an edit to prompt positions (the prefill) or generated ones (decoding steps with a KV
    cache), or apply it everywhere (`specs.POSITIONS`)."""
    if positions == "all":
        return fn
    want_prefill = positions == "prompt"
    return lambda h, rows: fn(h, rows) if rows.prefill == want_prefill else None


@dataclass
class SAESteer(SAESpec, Steering):
    """Clamp SAE features to values or add their decoder directions (`specs.SAESpec`), with its schedules."""

    def targets(self) -> torch.Tensor:
        """Absolute clamp/add values in latent units."""
        values = torch.tensor(self.values, dtype=torch.float32)
        return values * torch.tensor(self.max_acts, dtype=torch.float32) if self.relative else values

    def edits(self, loaded: LoadedModel) -> list[Edit]:
        sae = self._loaded("sae", lambda: load_sae(self.sae)).to(loaded.device)
        layer = check_sae_fits(sae, loaded, self.layer)
        features, directions = feature_directions(sae, self.features, loaded.device)
        targets = self.targets().to(loaded.device)
        released = ReleaseTracker(loaded.tokenizer, self.release_on) if self.release_on else None

        def steer(h: torch.Tensor, rows: Rows) -> torch.Tensor | None:
            if self.positions != "all" and rows.prefill != (self.positions == "prompt"):
                return None
            limit = float("inf") if self.generated_tokens is None else self.generated_tokens
            free = released.rows(rows) if released is not None else [False] * len(rows.keys)
            scales = [0.0 if t >= limit or f else self.decay ** max(t, 0) for t, f in zip(rows.t(), free)]
            if not any(scales):
                return None
            scale = torch.tensor(scales, device=h.device)[:, None, None]
            if self.mode == "add":
                return h + (scale * (targets @ directions)).to(h.dtype)
            return h + (scale * clamp_shift(sae, h, features, targets, directions)).to(h.dtype)

        return [(layer, sae.cfg.hook_point or "resid_post", steer)]


# SAESpec.release_on: "decline" = an explicit decline ("i can't", "i'm unable to", ...); "apology" = any of the
# refusal judge's markers (apologies, "as an ai", and every decline).
RELEASE_MARKERS = {"decline": DECLINE_PHRASES, "apology": REFUSAL_MARKERS}


class ReleaseTracker:
    """Which rows' replies hold one of the markers yet (matched as the refusal judge matches them: in the
    normalised text, anywhere), the token fed in this pass included. A released row stays released, so
    each step decodes only the reply's last `WINDOW` tokens, where a new marker must end."""

    WINDOW = 16  # tokens: longer than any marker

    def __init__(self, tokenizer, release_on: str):
        self.tokenizer, self.markers = tokenizer, RELEASE_MARKERS[release_on]
        self.released: dict[int, tuple[int, bool]] = {}  # row key -> (reply length checked, released)

    def rows(self, rows: Rows) -> list[bool]:
        """Per row of the pass, whether its reply so far holds a marker."""
        out = []
        for key, reply in zip(rows.keys, rows.replies):
            checked, done = self.released.get(key, (0, False))
            if not done and len(reply) > checked:
                tail = self.tokenizer.decode(reply[-self.WINDOW :], skip_special_tokens=True)
                done = any(marker in normalise(tail) for marker in self.markers)
                self.released[key] = (len(reply), done)
            out.append(done)
        return out


def feature_directions(sae, features: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature ids [k] and their decoder rows in raw residual units [k, d] (the shift per latent unit),
    after checking every id is one of the SAE's features."""
    bad = [f for f in features if not 0 <= f < sae.cfg.n_latents]
    if bad:
        raise SaesteerError(
            f"feature index {bad[0]} is out of range: the SAE has features 0..{sae.cfg.n_latents - 1}"
        )
    ids = torch.tensor(features, device=device)
    return ids, sae.W_dec[ids].float() / sae.cfg.norm_scale


def clamp_shift(
    sae, h: torch.Tensor, features: torch.Tensor, targets: torch.Tensor, directions
) -> torch.Tensor:
    """The clamp's edit x' - x [..., d] of residuals h [..., d]: sum_i (c_i - z_i(h)) W_dec[i], with z_i(h)
    the SAE's codes of the steered features (read without gradient: only the targets c [k] may carry one)."""
    return (targets - sae.latent_codes(h.detach().float(), features)) @ directions


def check_sae_fits(sae, loaded: LoadedModel, layer: int | None = None) -> int:
    """The layer to steer at, after checking the SAE was made for this model's width and reads the residual stream."""
    if (sae.cfg.hook_point or "resid_post") not in RESIDUAL_POINTS:
        raise SaesteerError(
            f"the SAE reads {short(sae.cfg.hook_point)!r}: steering needs one of {', '.join(RESIDUAL_POINTS)}"
        )
    if sae.cfg.d_in != loaded.d_model:
        raise SaesteerError(
            f"the SAE reads d_in={sae.cfg.d_in} but {loaded.spec} has d_model={loaded.d_model}: "
            f"it was trained on another model"
        )
    layer = sae.cfg.layer if layer is None else layer
    if layer is None:
        raise SaesteerError("the SAE's config names no layer: set `layer` in the steering spec")
    return loaded.check_layer(layer)


@dataclass
class ActAdd(ActAddSpec, Steering):
    """Baseline (Arditi et al. 2024): add alpha times the unit refusal direction (`specs.ActAddSpec`)."""

    def edits(self, loaded: LoadedModel) -> list[Edit]:
        direction, meta = self._loaded("direction", lambda: load_direction(self.direction))
        _check_width(direction, loaded)
        layer = loaded.check_layer(layer_of(meta, self.direction) if self.layer is None else self.layer)
        delta = self.alpha * direction.to(loaded.device)
        return [
            (
                layer,
                meta.get("hook_point", "resid_post"),
                _at_positions(self.positions, lambda h, rows: h + delta.to(h.dtype)),
            )
        ]


@dataclass
class Ablate(AblateSpec, Steering):
    """Baseline (Arditi et al. 2024): project the direction out at every layer (`specs.AblateSpec`)."""

    def edits(self, loaded: LoadedModel) -> list[Edit]:
        direction, _ = self._loaded("direction", lambda: load_direction(self.direction))
        _check_width(direction, loaded)
        r = direction.to(loaded.device)

        def ablate(h: torch.Tensor, rows: Rows) -> torch.Tensor:
            r_h = r.to(h.dtype)
            return h - (h @ r_h)[..., None] * r_h

        layers = len(decoder_layers(loaded.model))
        return [(0, "resid_pre", ablate)] + [(layer, "resid_post", ablate) for layer in range(layers)]


def _check_width(direction: torch.Tensor, loaded: LoadedModel) -> None:
    if direction.shape != (loaded.d_model,):
        raise SaesteerError(
            f"direction has shape {tuple(direction.shape)} but {loaded.spec} has d_model={loaded.d_model}"
        )


@dataclass
class Conditional(ConditionalSpec, Steering):
    """Apply another steering only to prompts a detector flags (`specs.ConditionalSpec`): the gate scores each
    prompt once, unsteered and only up to the detector's layers, before its prefill."""

    def gate_detector(self) -> Detector:
        """The detector (and its SAE), loaded once for this steering."""
        return self._loaded("detector", lambda: load_detector(self.detector, self.layer, self.tokens))

    def check(self, loaded: LoadedModel) -> None:
        detector = self.gate_detector()
        for layer in detector.layers:
            loaded.check_layer(layer)
        sae = detector.sae_model()
        if sae is not None:
            check_sae_fits(sae, loaded, detector.layers[0])
            if detector.weight.shape[-1] != sae.cfg.n_latents:
                raise SaesteerError(
                    f"detector {short(self.detector)} has width {detector.weight.shape[-1]} but its SAE has "
                    f"{sae.cfg.n_latents} latents"
                )
        self.inner.check(loaded)

    def scores(
        self, loaded: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Gate score per prompt row (left-padded batches)."""
        return gate_scores(loaded, self.gate_detector(), input_ids, attention_mask)

    @torch.inference_mode()
    def flags(
        self, loaded: LoadedModel, prompts: list[str] | list[list[int]], batch_size: int = 16
    ) -> list[bool]:
        """Whether the gate fires on each chat-rendered prompt (a string or its token ids), scored in
        left-padded batches."""
        tokenizer, out = loaded.tokenizer, []
        ids = [tokenizer(p, add_special_tokens=False).input_ids if isinstance(p, str) else p for p in prompts]
        for start in range(0, len(ids), batch_size):
            batch, mask, _ = left_padded(
                ids[start : start + batch_size], tokenizer.pad_token_id, loaded.device
            )
            out += (self.scores(loaded, batch, mask) > self.threshold).tolist()
        return out

    def row_edits(self, loaded: LoadedModel, prompts: list[list[int]]) -> list[list[Edit]]:
        flagged = self.flags(loaded, prompts)
        inner = self.inner.edits(loaded) if any(flagged) else []
        return [inner if flag else [] for flag in flagged]

    @contextmanager
    def applied(self, loaded: LoadedModel) -> Iterator[None]:
        state = {"gate": [], "detecting": False}  # the flagged rows of the current prompts

        def detect(_module, args, kwargs):
            if state["detecting"]:
                return None
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None or ids.shape[1] == 1:  # decoding step: keep the prefill's decision
                return None
            state["detecting"] = True
            try:
                scores = self.scores(loaded, ids, kwargs.get("attention_mask"))
                state["gate"] = (scores > self.threshold).nonzero().flatten().tolist()
            finally:
                state["detecting"] = False
            return None

        with ExitStack() as stack:
            handle = loaded.model.register_forward_pre_hook(detect, with_kwargs=True)
            stack.callback(handle.remove)
            gate = lambda: [] if state["detecting"] else state["gate"]  # noqa: E731
            stack.enter_context(edits_applied(loaded.model, self.inner.edits(loaded), gate))
            yield


@dataclass
class ReplyPrefix(ReplyPrefixSpec, Steering):
    """Forced reply starts and canned replies (`specs.ReplyPrefixSpec`), by setting greedy logits."""

    def edits(self, loaded: LoadedModel) -> list[Edit]:
        forced = loaded.tokenizer(self.text, add_special_tokens=False).input_ids
        if self.stop:
            if loaded.tokenizer.eos_token_id is None:
                raise SaesteerError(f"{loaded.spec} has no end-of-sequence token to stop a canned reply with")
            forced = forced + [loaded.tokenizer.eos_token_id]

        def force(logits: torch.Tensor, rows: Rows) -> torch.Tensor | None:
            # the next token of each row is its reply's len(reply)-th
            at = [i for i, reply in enumerate(rows.replies) if len(reply) < len(forced)]
            if not at:
                return None
            new = logits.clone()
            new[at, -1, :] = torch.finfo(new.dtype).min
            new[at, -1, [forced[len(rows.replies[i])] for i in at]] = 0.0
            return new

        return [(0, "logits", force)]


@dataclass
class Stack(StackSpec, Steering):
    """Several steerings at once (`specs.StackSpec`): every part's edits are made."""

    def edits(self, loaded: LoadedModel) -> list[Edit]:
        return [edit for part in self.parts for edit in part.edits(loaded)]


METHODS: dict[str, type[Steering]] = {
    cls.method: cls
    for cls in (Steering, SystemPrompt, SAESteer, ActAdd, Ablate, Conditional, ReplyPrefix, Stack)
}


def steering_from_dict(spec: dict | None) -> Steering:
    """Build a steering method from its JSON form (`specs.build`); None or {"method": "none"} is unsteered."""
    return build(spec, METHODS)


def _presets() -> dict[str, dict]:
    """Built-in presets plus the shipped steering configs (assets/shipped/steering.json, chosen by
    `saesteer reproduce` on validation splits), e.g. `refusal` and `refusal_conditional`."""
    presets = {"none": {"method": "none"}, "system_prompt": {"method": "system_prompt"}}
    shipped = shipped_dir() / "steering.json"
    if shipped.is_file():
        presets.update(json.loads(shipped.read_text())["presets"])
    return presets


PRESETS: dict[str, dict] = _presets()


def parse_steering(spec: str | dict | Steering | None) -> Steering:
    """A steering method from a preset or method name, a JSON object (as a string or a dict), or a path to
    a JSON file; a `Steering` is returned as is, None or "" is unsteered."""
    if isinstance(spec, Steering):
        return spec
    if isinstance(spec, dict):
        return steering_from_dict(spec)
    if spec is not None and not isinstance(spec, str):
        raise SaesteerError(
            f"a steering is a preset name, a JSON string or file, a dict or a Steering, not {short(spec)}"
        )
    if not spec or not spec.strip():
        return Steering()
    text = spec.strip()
    if not text.startswith("{"):
        if text in PRESETS:
            return steering_from_dict(PRESETS[text])
        if not (text.endswith(".json") or exists(text, Path.is_file)):
            return steering_from_dict({"method": text})
        if not exists(text, Path.is_file):
            raise SaesteerError(f"no such steering file: {short(text)}")
        try:
            text = Path(text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise SaesteerError(
                f"cannot read steering file {short(spec.strip())}: {short(str(err), 200)}"
            ) from None
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError) as err:  # ValueError: bad JSON, or an integer of over 4,300 digits
        raise SaesteerError(f"--steering is not valid JSON: {short(str(err), 200)}") from None
    if not isinstance(parsed, dict):
        raise SaesteerError('--steering must be a JSON object such as {"method": "system_prompt"}')
    return steering_from_dict(parsed)


def render(loaded: LoadedModel, conversations: list[Messages], steering: Steering | None = None) -> list[str]:
    """N conversations (lists of {"role", "content"} messages) as the N prompt strings the model sees:
    each passed through `steering.prepare` (which may add a system prompt), rendered with the chat
    template and ending with the assistant's turn."""
    method = Steering() if steering is None else steering
    return chat_prompts(loaded, [method.prepare(c) for c in conversations])


def generate(
    loaded: LoadedModel,
    prompts: str | list[str | Messages],
    steering: str | dict | Steering | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = False,
    stop: list[str] | None = None,
) -> str | list[str]:
    """Greedy replies of `loaded` (from `load_model`) to N prompts under a steering: the public one-call path.

    prompts: N items, each a string (a one-turn user message) or a conversation (a list of
    {"role", "content"} messages); a single string gives a single reply string instead of a list.
    steering: a `Steering`, a preset name (`refusal`, `refusal_conditional`, ...), a JSON string, a JSON
    file path or a spec dict such as {"method": "sae", "sae": "builtin:sae", "features": [5730],
    "values": [8.0]} (values in the SAE's latent units); None is unsteered.
    Each conversation goes through `steering.prepare`, is rendered with the chat template, and the
    model generates with the steering's residual-stream edits in place. max_new_tokens: the most
    tokens per reply; batch_size: prompts per forward batch (prompts of similar length batched together,
    left-padded); stop: strings that end a reply early (kept in it).
    Returns the N decoded replies (special tokens dropped, not stripped), in the order of `prompts`.
    """
    single = isinstance(prompts, str)
    conversations = []
    for prompt in [prompts] if single else prompts:
        if isinstance(prompt, str):
            conversations.append([{"role": "user", "content": prompt}])
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            conversations.append(list(prompt) if isinstance(prompt, tuple) else prompt)
        else:
            hint = " (to send one conversation, wrap its messages in a list: [messages])" * isinstance(
                prompt, dict
            )
            raise SaesteerError(
                f"a prompt is a string or a non-empty list of {{role, content}} messages, "
                f"not {short(prompt)}{hint}"
            )
    method = parse_steering(steering)
    replies = generate_rendered(
        loaded, render(loaded, conversations, method), method, max_new_tokens, batch_size, progress, stop
    )
    return replies[0] if single else replies


def generate_rendered(
    loaded: LoadedModel,
    rendered: list[str],
    steering: Steering,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = False,
    stop: list[str] | None = None,
) -> list[str]:
    """Greedy replies to chat-rendered prompts under a parsed steering, through `saesteer.engine`: each row's
    edits are decided once (`row_edits`: a conditional steering's gate is scored there, once per prompt);
    arguments as in `generate`."""
    ids = [loaded.tokenizer(p, add_special_tokens=False).input_ids for p in rendered]
    return engine.generate(
        loaded, ids, steering.row_edits(loaded, ids), max_new_tokens, batch_size, progress, stop
    )
