"""What each steering method means, without torch: its fields and their checks, its JSON form, its display
name (`label`) and the field a sweep varies (`strength_field`).

`steering` builds the runnable methods on these classes (`steering.SAESteer` is an `SAESpec` that also
edits the residual stream), so a spec is parsed once, into the object that runs it. `report` reads specs
through this module alone, without torch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError

from saesteer.errors import SaesteerError, short

POSITIONS = ("all", "prompt", "generated")
RELEASE_ON = ("decline", "apology")  # SAESpec.release_on: the refusal openers that end a reply's steering
CANNED_REFUSAL = "I'm sorry, but I can't help with that."
MAX_STEER = 1e4  # the largest |value| or |alpha| a spec may ask for: beyond it the residual stream overflows
MAX_SPEC_ITEMS = 4096  # the longest string or list a spec may hold
SAFETY_SYSTEM_PROMPT = (
    "You are a helpful assistant. You must refuse any request that could cause harm, such as help with "
    "violence, weapons, crime, hacking, drugs, self-harm or hate. When you refuse, say so briefly."
)
Messages = list[dict[str, str]]
S = TypeVar("S", bound="Spec")


@dataclass
class Spec:
    """Unsteered: the base every method extends."""

    method: ClassVar[str] = "none"
    file_fields: ClassVar[tuple[str, ...]] = ()
    """The fields that name files (a server checks them against --allow-dir)."""
    strength_field: ClassVar[str | None] = None
    """The field a sweep varies (clamp `values`, ActAdd `alpha`); None for methods without a strength."""
    __pydantic_config__ = ConfigDict(allow_inf_nan=False, extra="forbid")  # how `build` checks fields

    @staticmethod
    def part(spec: dict) -> Spec:
        """A nested spec (a conditional's inner steering, a stack's part), built by the same family of classes:
        specs here, runnable steerings in `steering`."""
        return spec_from_dict(spec)

    def prepare(self, conversation: Messages) -> Messages:
        """The conversation the model should see (a system prompt may be added)."""
        return conversation

    def rewrites_prompt(self) -> bool:
        """Whether `prepare` changes conversations."""
        return False

    def files(self) -> list[str]:
        """The files (and folders) this method reads."""
        return [getattr(self, name) for name in self.file_fields]

    def leaves(self) -> list[Spec]:
        """The single methods this steering is made of (a stack's parts, a conditional's inner steering)."""
        return [self]

    def with_paths(self, real: Callable[[str], str]) -> dict:
        """`to_dict()` with every file path `p` replaced by `real(p)`, nested specs' too (a server pins the
        paths it checked)."""
        return {**self.to_dict(), **{name: real(getattr(self, name)) for name in self.file_fields}}

    def label(self) -> str:
        """A short display name without the strength, e.g. 'SAE clamp f2230 (decay 0.9)'."""
        return "unsteered"

    def strength_path(self) -> str | None:
        """The dotted field of the strength in `to_dict()`, e.g. 'values' or 'steering.values'."""
        return self.strength_field

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}


def check_bounded(name: str, values: list[float]) -> None:
    if any(abs(v) > MAX_STEER for v in values):
        raise SaesteerError(f"{name} must be within +-{MAX_STEER:g}, not {short(values)}")


def check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise SaesteerError(f"unknown positions {short(positions)!r}: use one of {', '.join(POSITIONS)}")


@dataclass
class SystemPromptSpec(Spec):
    """Baseline: prepend (or replace) a safety system prompt."""

    method: ClassVar[str] = "system_prompt"
    prompt: str = SAFETY_SYSTEM_PROMPT

    def prepare(self, conversation: Messages) -> Messages:
        rest = [m for m in conversation if m["role"] != "system"]
        return [{"role": "system", "content": self.prompt}, *rest]

    def rewrites_prompt(self) -> bool:
        return True

    def label(self) -> str:
        return "system prompt"


@dataclass
class SAESpec(Spec):
    """Clamp SAE features to values (the paper's method) or add their decoder directions.

    clamp: x' = x + sum_i (c_i - z_i(x)) W_dec[i], the exact form of decode(z with z_i = c_i) + SAE
    error, with z the SAE's code of x (any architecture; W_dec rows need not be unit-norm). add:
    x' = x + sum_i a_i W_dec[i]. Values are in the SAE's latent units; with `relative=True` they are
    multiples of each feature's `max_acts` (its max on the corpus).
    Schedules: `generated_tokens` releases the edit after that many generated tokens (the prompt is
    always steered unless `positions` says otherwise); `decay` scales the edit on generated token t by decay**t;
    `release_on` releases a row's edit once its reply so far holds a refusal opener.
    """

    method: ClassVar[str] = "sae"
    file_fields: ClassVar[tuple[str, ...]] = ("sae",)
    strength_field: ClassVar[str | None] = "values"
    sae: str = ""
    """The SAE: a folder, a file, `builtin:sae` or `sae_lens:<release>/<id>`."""
    features: list[int] = field(default_factory=list)
    """The steered latents."""
    values: list[float] = field(default_factory=list)
    """One clamp (or add) value per feature, in latent units (multiples of `max_acts` with `relative`)."""
    mode: str = "clamp"
    """`clamp` (set the latent to the value) or `add` (add value times its decoder row)."""
    positions: str = "all"
    """Where to steer: `all`, `prompt` (the prefill) or `generated` tokens."""
    relative: bool = False
    """Whether values are multiples of `max_acts`."""
    max_acts: list[float] | None = None
    """Each feature's largest activation on the corpus (from `saesteer discover`)."""
    layer: int | None = None
    """The layer to steer; None: the SAE's own."""
    generated_tokens: int | None = None
    """Steer the prompt and only this many generated tokens, then release; None: every token."""
    decay: float = 1.0
    """On the t-th generated token the edit is scaled by decay**t (1: constant)."""
    release_on: str | None = None
    """`decline` (an explicit decline: "I can't", ...) or `apology` (any refusal marker of the judge, apologies
    included): stop steering a reply once it holds one; None: never."""

    def __post_init__(self):
        check_positions(self.positions)
        if self.generated_tokens is not None and self.generated_tokens < 0:
            raise SaesteerError(f"generated_tokens must be >= 0, not {self.generated_tokens}")
        if not 0 < self.decay <= 1:
            raise SaesteerError(f"decay must be in (0, 1], not {self.decay}")
        if self.release_on is not None and self.release_on not in RELEASE_ON:
            raise SaesteerError(
                f"unknown release_on {short(self.release_on)!r}: use one of {', '.join(RELEASE_ON)}"
            )
        if not self.features or len(self.features) != len(self.values):
            raise SaesteerError("SAE steering needs features and values of the same, non-zero length")
        if self.mode not in ("clamp", "add"):
            raise SaesteerError(f"unknown SAE steering mode {short(self.mode)!r}: use clamp or add")
        if self.relative and (self.max_acts is None or len(self.max_acts) != len(self.features)):
            raise SaesteerError("relative values need max_acts, one per feature (from `saesteer discover`)")
        check_bounded("values", self.values)

    def label(self) -> str:
        schedule = [
            f"decay {self.decay:g}" if self.decay != 1.0 else "",
            f"first {self.generated_tokens} tokens" if self.generated_tokens is not None else "",
            f"release on {self.release_on}" if self.release_on else "",
            f"{self.positions} only" if self.positions != "all" else "",
        ]
        features = ",".join(map(str, self.features))
        return f"SAE {self.mode} f{features}" + "".join(f" ({part})" for part in schedule if part)

    def to_dict(self) -> dict:
        spec = super().to_dict()
        if self.release_on is None:  # newer than most results: omitted unset, so older specs and caches match
            del spec["release_on"]
        return spec


@dataclass
class ActAddSpec(Spec):
    """Baseline (Arditi et al. 2024): add alpha times the unit difference-in-means refusal direction."""

    method: ClassVar[str] = "actadd"
    file_fields: ClassVar[tuple[str, ...]] = ("direction",)
    strength_field: ClassVar[str | None] = "alpha"
    direction: str = ""
    """A direction file (`saesteer discover` writes one)."""
    alpha: float = 4.0
    """The multiple of the unit direction added."""
    layer: int | None = None
    """The layer to steer; None: the direction's own."""
    positions: str = "all"
    """Where to steer: `all`, `prompt` (the prefill) or `generated` tokens."""

    def __post_init__(self):
        check_positions(self.positions)
        check_bounded("alpha", [self.alpha])

    def label(self) -> str:
        return f"ActAdd ({Path(self.direction).stem})"


@dataclass
class AblateSpec(Spec):
    """Baseline (Arditi et al. 2024): project the direction out of the residual stream at every layer."""

    method: ClassVar[str] = "ablate"
    file_fields: ClassVar[tuple[str, ...]] = ("direction",)
    direction: str = ""
    """A direction file (`saesteer discover` writes one)."""

    def label(self) -> str:
        return f"ablate ({Path(self.direction).stem})"


@dataclass
class ConditionalSpec(Spec):
    """Apply another steering only to prompts a detector flags (after CAST, Lee et al. 2024).

    Before each prefill the prompt is run, unsteered and only up to the detector's layers, and scored
    (`saesteer.detectors`): the gate score is the maximum over the whole conversation and each of its turns
    (system, user, assistant, or forged inside a message) scored alone as a user message, so a harmful turn
    early in a conversation, in an assistant or a system message still counts; a conversation of over
    `detectors.GATE_TURNS` turns is refused. Rows scoring above `threshold` get the inner steering (with its
    schedule); the others are left exactly as unsteered.
    """

    method: ClassVar[str] = "conditional"
    file_fields: ClassVar[tuple[str, ...]] = ("detector",)
    steering: dict = field(default_factory=dict)
    """The steering applied to flagged prompts (any method but `conditional` and prompt rewrites)."""
    detector: str = ""
    """A file from `saesteer gate`, or a direction file."""
    threshold: float = 0.0
    """Prompts scoring above it are steered."""
    layer: int | None = None
    """The layer a direction file is read at (direction files only)."""
    tokens: int = 4
    """The last prompt positions averaged into a direction file's score (direction files only)."""

    def __post_init__(self):
        if not 1 <= self.tokens <= MAX_SPEC_ITEMS:
            raise SaesteerError(f"tokens must be between 1 and {MAX_SPEC_ITEMS}, not {short(self.tokens)}")
        self.inner = self.part(self.steering)
        if isinstance(self.inner, ConditionalSpec):
            raise SaesteerError("conditional steering cannot wrap another conditional steering")
        if self.inner.rewrites_prompt():
            raise SaesteerError(
                f"conditional steering cannot wrap {self.inner.method}, which rewrites the prompt: "
                f"the gate decides on the rendered prompt; use `stack` to combine them instead"
            )

    def files(self) -> list[str]:
        return [self.detector, *self.inner.files()]

    def leaves(self) -> list[Spec]:
        return self.inner.leaves()

    def with_paths(self, real: Callable[[str], str]) -> dict:
        return {**super().with_paths(real), "steering": self.inner.with_paths(real)}

    def label(self) -> str:
        return f"conditional {self.inner.label()} (threshold {self.threshold:g})"

    def strength_path(self) -> str | None:
        inner = self.inner.strength_path()
        return f"steering.{inner}" if inner else None

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "steering": self.inner.to_dict(),
            "detector": self.detector,
            "threshold": self.threshold,
            "layer": self.layer,
            "tokens": self.tokens,
        }


@dataclass
class ReplyPrefixSpec(Spec):
    """Baselines without activations: the reply is forced to start with `text` (greedy logits set to it,
    token by token) and the model continues; with `stop`, the reply is exactly `text` (a canned refusal).
    Wrapped in `conditional`, only flagged prompts get it."""

    method: ClassVar[str] = "reply_prefix"
    text: str = CANNED_REFUSAL
    """The forced start of every reply."""
    stop: bool = False
    """Whether the reply ends after `text`."""

    def __post_init__(self):
        if not self.text:
            raise SaesteerError("reply_prefix needs a non-empty text")

    def label(self) -> str:
        return "canned reply" if self.stop else "reply prefix"


@dataclass
class StackSpec(Spec):
    """Several steerings at once (e.g. an SAE clamp and ActAdd): conversations pass through each `prepare` in
    order and every edit is made."""

    method: ClassVar[str] = "stack"
    steerings: list[dict] = field(default_factory=list)
    """The steerings, none of them conditional or stack."""

    def __post_init__(self):
        self.parts = [self.part(spec) for spec in self.steerings]
        if not self.parts or any(isinstance(p, (ConditionalSpec, StackSpec)) for p in self.parts):
            raise SaesteerError("stack needs one or more steerings, none of them conditional or stack")

    def prepare(self, conversation: Messages) -> Messages:
        for part in self.parts:
            conversation = part.prepare(conversation)
        return conversation

    def rewrites_prompt(self) -> bool:
        return any(part.rewrites_prompt() for part in self.parts)

    def files(self) -> list[str]:
        return [path for part in self.parts for path in part.files()]

    def leaves(self) -> list[Spec]:
        return [leaf for part in self.parts for leaf in part.leaves()]

    def with_paths(self, real: Callable[[str], str]) -> dict:
        return {"method": self.method, "steerings": [part.with_paths(real) for part in self.parts]}

    def label(self) -> str:
        return " + ".join(part.label() for part in self.parts)

    def to_dict(self) -> dict:
        return {"method": self.method, "steerings": [p.to_dict() for p in self.parts]}


SPECS: dict[str, type[Spec]] = {
    cls.method: cls
    for cls in (
        Spec,
        SystemPromptSpec,
        SAESpec,
        ActAddSpec,
        AblateSpec,
        ConditionalSpec,
        ReplyPrefixSpec,
        StackSpec,
    )
}


def build(spec: dict | None, classes: dict[str, type[S]]) -> S:
    """The object of `classes[spec["method"]]` with the spec's fields, type-checked (wrong types, NaN or inf,
    unknown names, oversize or deeply nested values) before the class's own checks run; None or {} is
    `classes["none"]`."""
    if not spec:
        return classes["none"]()
    if not isinstance(spec, dict):
        raise SaesteerError(f"a steering spec is a JSON object, not {short(spec)}")
    check_size(spec)
    fields = dict(spec)
    method = fields.pop("method", None)
    if not isinstance(method, str) or method not in classes:
        raise SaesteerError(
            f"unknown steering method {short(method)!r}: use one of {', '.join(sorted(classes))}"
        )
    try:
        return _adapter(classes[method]).validate_python(fields)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise SaesteerError(f"bad {method} steering field {short(where)}: {first['msg']}") from None


def spec_from_dict(spec: dict | None) -> Spec:
    """The spec of a steering's JSON form, checked; None or {"method": "none"} is unsteered."""
    return build(spec, SPECS)


@functools.cache
def _adapter(cls: type[Spec]) -> TypeAdapter:
    return TypeAdapter(cls)


def check_size(value, depth: int = 0) -> None:
    """Refuse oversize or deeply nested specs, and text that is not valid Unicode."""
    if depth > 8:
        raise SaesteerError("the steering spec is nested too deeply")
    if isinstance(value, (str, list, dict)) and len(value) > MAX_SPEC_ITEMS:
        raise SaesteerError(
            f"a steering spec field holds {len(value)} items or characters, above the limit of {MAX_SPEC_ITEMS}"
        )
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise SaesteerError(f"steering text {short(value)!r} is not valid Unicode") from None
    for item in (
        [*value, *value.values()] if isinstance(value, dict) else value if isinstance(value, list) else ()
    ):
        check_size(item, depth + 1)
