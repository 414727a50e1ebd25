"""Every stage's settings, one dataclass each, with a docstring under every field: the one source of each
default. Plain data without torch, so `import saesteer.config` is cheap; the stage modules import their
config from here, and the CLI builds its options from these fields."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from saesteer.errors import SaesteerError, TrainError, short

if TYPE_CHECKING:
    from saesteer.evalsets import Prompt
    from saesteer.judges import ChatBackend

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_DATA = "builtin:corpus-slice"
SELECT_DTYPES = ("float32", "bfloat16")  # TrainConfig.dtype: names of torch dtypes
SUITES = ("safety", "capability", "jailbreak", "fidelity")  # EvalConfig.suites
SPLITS = ("train", "validation", "test")  # of every prompt set
RESIDUAL_POINTS = ("resid_post", "resid_pre")  # where activations are read (collect, detectors, SAEs)


@dataclass(frozen=True)
class TextSource:
    """Where documents come from and how to turn a record into text.

    Records holding a `messages` list are always chat-formatted. A folder's files are read round-robin,
    one record from each in turn, so any prefix of the stream mixes all of them.
    """

    data: str = DEFAULT_DATA
    """file/folder of .txt/.jsonl/.json(.gz), hf:<dataset id>, or builtin:corpus-slice (shipped)"""
    field: str = "text"
    """text field of JSON records"""
    chat: str | None = None
    """'prompt_field,response_field': chat-format records with the model's template; 'transcript': `field` is a
    'Human: ... Assistant: ...' dialogue (hh-rlhf style), rendered the same way"""
    split: str = "train"
    """split of an hf: dataset"""
    passes: int = 1
    """read the data this many times over (if more tokens are needed than one pass holds; packing offsets differ
    between passes)"""


@dataclass
class CollectConfig:
    """What to collect. `tokens` counts model input tokens (n_tokens in the manifest is what was kept)."""

    model: str = DEFAULT_MODEL
    """default alias, hub id, local folder or .gguf file"""
    layer: int = 10
    """decoder layer whose residual stream is collected"""
    hook_point: str = "resid_post"
    """resid_post (layer output) or resid_pre (layer input)"""
    data: TextSource = field(default_factory=TextSource)
    """where the text comes from and how records become text"""
    tokens: int = 100_000
    """model input tokens to process"""
    ctx: int = 256
    """context length (each starts with BOS)"""
    batch_size: int = 8
    """contexts per forward pass"""
    contexts_per_shard: int = 256
    """contexts per safetensors shard"""
    dtype: str = "bfloat16"
    """cache dtype: bfloat16 or float16"""
    drop_special: bool = True
    """drop BOS/EOS/special-token positions (their norms are outliers)"""
    device: str | None = None
    """cpu, cuda, mps (default: best available)"""

    def __post_init__(self):
        if self.layer < 0:
            raise SaesteerError(f"layer must be 0 or more, not {self.layer}")
        if self.hook_point not in RESIDUAL_POINTS:
            raise SaesteerError(
                f"unknown hook point {short(self.hook_point)!r}: use {' or '.join(RESIDUAL_POINTS)}"
            )


@dataclass
class TrainConfig:
    """Everything that determines a training run."""

    activations: str = "runs/activations"
    """activation cache folder (saesteer collect); not read when `model` is given"""
    model: str | None = None
    """stream the activations of this model instead (default alias, hub id, local folder or .gguf): computed as
    `collect` would compute them, as training reads them, never written to disk"""
    layer: int = CollectConfig.layer
    """streamed layer (with `model`)"""
    hook_point: str = CollectConfig.hook_point
    """streamed hook point: resid_post or resid_pre (with `model`)"""
    data: TextSource = field(default_factory=TextSource)
    """streamed text (with `model`)"""
    ctx: int = CollectConfig.ctx
    """tokens per streamed context (with `model`)"""
    stream_batch_size: int = CollectConfig.batch_size
    """contexts per forward pass when streaming"""
    contexts_per_shard: int = CollectConfig.contexts_per_shard
    """contexts per streamed shard; 4 shards are shuffled together (the shuffle buffer)"""
    drop_special: bool = CollectConfig.drop_special
    """leave out special-token positions when streaming"""
    out: str = "runs/sae"
    """output folder: checkpoint.safetensors and sae/ (the final SAE, SAELens format)"""
    n_latents: int | None = None
    """SAE width (default: expansion_factor * d_model)"""
    expansion_factor: int = 8
    """latents per model dimension"""
    k: int = 32
    """active latents per token"""
    batch_size: int = 4096
    """tokens per optimizer step, over all ranks"""
    total_tokens: int = 20_000_000
    """total training tokens"""
    lr: float | None = None
    """learning rate (default: Gao et al.'s 2e-4 / sqrt(n_latents / 2^14))"""
    warmup_steps: int = 100
    """linear learning-rate warmup steps"""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's beta1 and beta2"""
    adam_eps: float = 6.25e-10
    """Adam's epsilon"""
    grad_clip: float = 1.0
    """gradient norm clipping bound (0: no clipping)"""
    auxk_coef: float = 1 / 32
    """AuxK loss coefficient"""
    dead_tokens: int = 10_000_000
    """tokens without firing before a latent counts as dead"""
    init_tokens: int = 65_536
    """sample for the normalisation scale and b_dec's geometric median"""
    seed: int = 0
    """initialisation and data-order seed"""
    checkpoint_every: int = 500
    """steps between checkpoints"""
    log_every: int = 20
    """steps between progress-bar loss updates"""
    dtype: str = "float32"
    """the dense encoder matmul that chooses each token's top-k latents: float32, or bfloat16 (faster on CPUs
    with AVX512-BF16 and on GPUs); the chosen latents' values, the loss, the gradients and the weights stay
    float32"""
    resume: bool = False
    """continue from out/checkpoint.safetensors if it exists"""
    device: str | None = None
    """cpu or cuda (default: cuda:LOCAL_RANK if available, else cpu)"""

    def stream_config(self) -> CollectConfig:
        """The collection that streaming reads (`model` given): as many tokens as training takes."""
        return CollectConfig(
            model=self.model,
            layer=self.layer,
            hook_point=self.hook_point,
            data=self.data,
            tokens=self.total_tokens,
            ctx=self.ctx,
            batch_size=self.stream_batch_size,
            contexts_per_shard=self.contexts_per_shard,
            drop_special=self.drop_special,
            device=self.device,
        )

    def __post_init__(self):
        self.adam_betas = tuple(self.adam_betas)
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise TrainError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if not (self.adam_eps > 0 and self.grad_clip >= 0 and self.warmup_steps >= 0):
            raise TrainError("adam_eps must be positive, grad_clip and warmup_steps 0 or more")
        if self.dtype not in SELECT_DTYPES:
            raise TrainError(f"dtype must be one of {', '.join(SELECT_DTYPES)}, got {self.dtype!r}")
        for name in (
            "k",
            "batch_size",
            "total_tokens",
            "expansion_factor",
            "checkpoint_every",
            "log_every",
            "init_tokens",
        ):
            if getattr(self, name) <= 0:
                raise TrainError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def steps(self) -> int:
        return self.total_tokens // self.batch_size


@dataclass
class DiscoverConfig:
    """Sizes and thresholds of the discovery run; every prompt list it reads is a TRAIN split."""

    n_candidates: int = 8
    """features ranked best by contrast to screen causally"""
    n_attribution: int = 8
    """... and ranked best by attribution (a feature in both is screened once)"""
    attribution_prompts: int = 64
    """harmful TRAIN prompts (with a compliant reply) for the attribution gradient"""
    max_corpus_freq: float = 0.05
    """drop features firing on more than this fraction of corpus tokens"""
    min_refusal_freq: float = 0.2
    """... or on fewer than this fraction of refusal replies"""
    corpus_tokens: int = 16_384
    """corpus tokens encoded for feature frequencies and top contexts"""
    top_contexts: int = 5
    """top-activating corpus contexts kept per feature"""
    screen_values: tuple[float, ...] = (8.0, 16.0)
    """clamp values tried in the causal screen"""
    screen_prompts: int = 24
    """harmful and harmless TRAIN prompts per screen config"""
    max_new_tokens: int = 64
    """tokens generated per reply, judged for refusal (loops show only in longer replies)"""
    batch_size: int = 16
    """prompts per generation or forward batch"""
    sae: str = ""
    """SAE folder (SAELens or sparsify format)"""
    model: str = DEFAULT_MODEL
    """default alias, hub id, local folder or .gguf file"""
    limit: int | None = None
    """use at most this many harmful TRAIN prompts (default: all)"""
    detector_layer: int = 18
    """layer of the conditional-steering harm detector (a diff-in-means direction)"""
    detector_recall: float = 0.9
    """share of harmful TRAIN prompts the detector must flag"""
    detector_negatives: int | None = None
    """use at most this many TRAIN prompts of each benign source (XSTest-safe, the shipped benign set) as the
    detector's negatives (default: all)"""
    alpaca_harmless: int = 0
    """Alpaca-derived harmless TRAIN prompts (CC BY-NC, needs ../shared) added to the detector's negatives"""
    judge: str = "strict"
    """refusal judge of the screen: strict or string (it judges replies without their prompts)"""
    out: str = "runs/discover"
    """folder for discovery.json, discovery.md and directions"""
    device: str | None = None
    """cpu, cuda, mps (default: best available)"""


@dataclass
class SAEEvalConfig:
    """What `saesteer evaluate-sae` measures: an SAE spliced into its model, on held-out text."""

    sae: str = ""
    """SAE folder (SAELens, sparsify, Gemma Scope), .npz file or saelens:<release>/<id>"""
    model: str | None = None
    """model to splice into (default: the one the SAE was trained on)"""
    data: str | None = None
    """held-out text source (default: the SAE's training text, after the cached part)"""
    contexts: int = 64
    """held-out contexts to evaluate"""
    ctx: int | None = None
    """context length (default: the training cache's)"""
    batch_size: int = 8
    """contexts per forward pass"""
    device: str | None = None
    """cpu, cuda, mps (default: best available)"""
    out: str | None = None
    """also write the metrics to this JSON file"""


@dataclass
class FitConfig:
    """What `saesteer fit` runs: clamp values fitted by gradient descent toward a complete refusal."""

    steps: int = 30
    """Adam steps on the values"""
    lr: float = 0.5
    """Adam learning rate, in latent units"""
    l1: float = 0.0
    """penalty per latent unit of sum |value|: pushes the values of unneeded features to 0"""
    batch_size: int = 16
    """prompts per forward and backward pass"""
    values: tuple[float, ...] = ()
    """starting clamp values (one value: for every feature)"""
    features: tuple[int, ...] = ()
    """SAE features to clamp together, e.g. 5730,5904"""
    candidates: int = 0
    """instead of `features`: the features with the largest attribution toward a complete refusal on the same
    TRAIN prompts"""
    sae: str = "builtin:sae"
    """SAE folder, or builtin:sae (the shipped one)"""
    model: str = DEFAULT_MODEL
    """default alias, hub id, local folder or .gguf file"""
    decay: float = 1.0
    """the clamp's schedule while generating: decay**t on generated token t"""
    limit: int = 16
    """harmful TRAIN prompts per set (advbench, xstest_unsafe, hh_rlhf_harmful, written_harmful)"""
    out: str = "runs/fit"
    """folder for steering.json (the fitted spec) and fit.json"""
    device: str | None = None
    """cpu, cuda, mps (default: best available)"""


@dataclass(frozen=True)
class Candidate:
    """One detector recipe tried in leave-one-source-out validation."""

    kind: str
    """dim (difference of means), probe (logistic), ensemble (a probe per layer, averaged) or sae_probe (SAE codes)"""
    layers: tuple
    """decoder layers; a float in (0, 1) is a fraction of the model's depth"""
    pooling: str = "user"
    """user (mean over the user's message), max (per-feature max over it) or last (mean over the last `tokens`
    positions)"""
    tokens: int = 4
    """positions averaged by `last` pooling"""
    c: float = 0.1
    """inverse regularisation strength of the logistic probes"""

    @property
    def name(self) -> str:
        pool = f"last{self.tokens}" if self.pooling == "last" else self.pooling
        reg = f" C={self.c:g}" if self.kind != "dim" else ""
        return f"{self.kind} L{'+'.join(map(str, self.layers))} {pool}{reg}"


@dataclass
class GateConfig:
    """What `saesteer gate` trains and how it chooses."""

    candidates: tuple[Candidate, ...] = (
        Candidate("dim", (0.6,), "last", 4),  # the old detector: the baseline row
        Candidate("dim", (0.6,), "user"),
        Candidate("probe", (0.4,), "last", 4),
        Candidate("probe", (0.6,), "last", 4),
        Candidate("probe", (0.2,), "user"),
        Candidate("probe", (0.4,), "user"),
        Candidate("probe", (0.6,), "user"),
        Candidate("probe", (0.8,), "user"),
        Candidate("ensemble", (0.2, 0.4, 0.6, 0.8), "user"),
        Candidate("ensemble", (0.2, 0.4, 0.6, 0.8), "last", 4),
        Candidate("probe", (0.4,), "user", c=0.01),
        Candidate("probe", (0.4,), "user", c=1.0),
        Candidate("probe", (0.6,), "user", c=0.01),
        Candidate("probe", (0.6,), "max"),
        Candidate("sae_probe", (), "user", c=0.05),
        Candidate("sae_probe", (), "max", c=0.05),
    )
    """detector recipes compared; layers as fractions of the model's depth (0.6 = layer 18 of 30), a `sae_probe`
    reads the SAE's own layer"""
    sae: str | None = "builtin:sae"
    """SAE for the sparse SAE-code probe candidates (skipped if empty or its width does not fit the model)"""
    max_fpr: float = 0.05
    """bound on the 95% upper confidence bound of each benign source's false-positive rate"""
    target_fpr: float = 0.03
    """a candidate meets the bar when its worst left-out benign source stays at or below this"""
    target_recall: float = 0.7
    """... and its worst left-out harmful source reaches this"""
    folds: int = 3
    """cross-fitting folds for the out-of-fold threshold scores"""
    limit: int | None = None
    """development prompts per source (default: all)"""
    batch_size: int = 16
    """prompts per forward pass"""
    seed: int = 0
    """seed of the prompt samples, folds and probe fits"""
    model: str = DEFAULT_MODEL
    """default alias, hub id, local folder or .gguf file"""
    out: str = "runs/gate"
    """folder for detector.safetensors, gate.json and gate.md"""
    baseline: str | None = None
    """a conditional steering (preset, JSON or file) whose detector and threshold are scored beside the new
    one, e.g. refusal_conditional"""
    device: str | None = None
    """cpu, cuda, mps (default: best available)"""


@dataclass(frozen=True)
class Decoding:
    """Greedy decoding settings (part of every cache key and result row)."""

    max_new_tokens: int = 64
    """greedy reply length (safety, jailbreak, degeneration)"""
    batch_size: int = 16
    """generation batch size"""


@dataclass
class EvalConfig:
    """What to evaluate: one model under one steering, some suites, one split."""

    model: str = DEFAULT_MODEL
    """default alias, hub id, local folder or .gguf file"""
    suites: tuple[str, ...] = ("safety",)
    """suites to run: safety, capability, jailbreak, fidelity"""
    split: str = "test"
    """train, validation or test (report on test; tune on train/validation)"""
    limit: int | None = 100
    """items per dataset (a seeded sample; None: all)"""
    limits: dict[str, int] = field(default_factory=dict)
    """per-dataset overrides of `limit`, e.g. {"mmlu": 100}"""
    seed: int = 0
    """seed of the item samples and bootstrap CIs"""
    decoding: Decoding = field(default_factory=Decoding)
    """greedy reply length and generation batch size"""
    gsm8k_max_new_tokens: int = 256
    """greedy reply length for GSM8K"""
    mmlu_shots: int = 5
    """MMLU few-shot examples from the dev set"""
    score_batch_size: int = 8
    """batch size of log-likelihood scoring (MMLU, TruthfulQA, text fidelity)"""
    jailbreak_turns: int = 4
    """user turns per jailbreak conversation (Crescendo always ends on the goal)"""
    attacker: ChatBackend | None = None
    """chat model that writes Crescendo's escalating turns (default: the built-in templated escalation)"""
    fidelity_tokens: int = 256
    """tokens per held-out text in the fidelity suite (KL and perplexity)"""
    bootstrap: int = 1000
    """bootstrap resamples per 95% CI"""
    user_prompts: list[Prompt] | None = None
    """your own labelled prompts, evaluated instead of the built-in safety sets"""
    user_prompts_name: str | None = None
    """dataset name of `user_prompts` in result rows (default: user)"""
    safety_sets: tuple[str, ...] | None = None
    """safety sets to evaluate (default: every available set)"""
    quality_judge: str = "rules"
    """reply quality (clear refusal, degenerate, ...): `rules` or an LLM judge spec"""

    def __post_init__(self):
        unknown = [s for s in self.suites if s not in SUITES]
        if unknown:
            raise SaesteerError(f"unknown suite {short(unknown[0])!r}: use {', '.join(SUITES)}")
        if self.limit is not None and self.limit < 1:
            raise SaesteerError(f"limit must be 1 or more (None: all), not {self.limit}")
        if self.split not in SPLITS:
            raise SaesteerError(f"unknown split {short(self.split)!r}: use one of {', '.join(SPLITS)}")


@dataclass
class EvaluateConfig:
    """What `saesteer eval` runs: one steering, evaluated on `eval`'s suites."""

    steering: str | None = None
    """JSON string, JSON file or method name (default: unsteered)"""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """the suites, split, sizes and decoding"""
    out: str = "runs/eval.jsonl"
    """results JSONL (rows are appended)"""
    replies: str | None = None
    """also write every judged reply (prompt, reply, verdict) to this JSONL"""
    cache: str | None = None
    """generation cache file (default: <out>.cache.jsonl)"""
    judge: str = "string"
    """string, strict (apology + offer of help = compliance), a local chat model spec, or
    openai:<base url>/v1:<model>"""
    agreement_sample: int = 50
    """with an LLM judge: replies re-judged by the string judge for kappa"""
    attacker: str | None = None
    """Crescendo attacker: local chat model spec or openai:<url>/v1:<model> (default: the built-in templated
    escalation)"""
    device: str | None = None
    """cpu, cuda, mps (default: best available)"""
    dtype: str | None = None
    """float32 or bfloat16 (default: float32 on CPU, bfloat16 on GPUs that support it); bfloat16 is faster on
    CPUs with AVX512-BF16 but changes most replies"""


@dataclass(frozen=True)
class RowConfig:
    """What a result row measured: the settings a sweep resumes by, with the sample size."""

    model: str
    """the model's identity (its spec, and `@bfloat16` when not float32)"""
    steering: dict
    """the steering's spec (`Steering.to_dict`)"""
    suite: str
    """safety, capability, jailbreak, fidelity, or judge (judge agreement)"""
    dataset: str
    """the prompt set or benchmark"""
    split: str
    """train, validation or test"""
    limit: int | None
    """the items asked for (None: all)"""
    n: int
    """the items measured"""
    decoding: dict
    """greedy reply length and generation batch size (`Decoding`)"""
    seed: int
    """seed of the item sample and the bootstrap"""
    judge: str
    """the refusal judge"""


@dataclass(frozen=True)
class ResultRow:
    """One measured number with its bootstrap 95% CI: one JSON line of a results file (eval, sweep, reproduce);
    `saesteer report` reads these files."""

    config: RowConfig
    """what was measured"""
    metric: str
    """e.g. refusal_rate, clear_refusal_rate, accuracy, kl"""
    value: float
    """the point estimate (rates in [0, 1], KL in nats per token, ...)"""
    ci_low: float
    """lower end of the 95% CI"""
    ci_high: float
    """upper end of the 95% CI"""
    n: int
    """the items measured"""
    wall_time_s: float
    """seconds the suite took"""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Discovery:
    """What `saesteer discover` found: one discovery.json. `features.discover` writes it, `reproduce`, the demo
    and `report` read it."""

    sae: str
    """the SAE searched"""
    model: str
    """the model it reads"""
    layer: int
    """the SAE's layer"""
    candidates: list[dict]
    """refusal feature candidates (`features.FeatureCandidate` as dicts), best screen score first"""
    config: dict = field(default_factory=dict)
    """the search settings (`DiscoverConfig`'s fields but the stage's own)"""
    n_harmful: int = 0
    """harmful TRAIN prompts searched"""
    n_harmless: int = 0
    """harmless TRAIN prompts searched"""
    n_refusal_replies: int = 0
    """refusal replies teacher-forced"""
    n_compliance_replies: int = 0
    """compliance replies teacher-forced"""
    baseline: dict[str, float] = field(default_factory=dict)
    """unsteered refusal rates on the TRAIN prompts"""
    control: dict | None = None
    """the unrelated control feature (MMLU philosophy), if one was found"""
    judge: str = "strict"
    """the refusal judge of the screen"""
    detector: dict = field(default_factory=dict)
    """the diff-in-means harm detector's layer, threshold and flag rates"""
    specs: dict[str, dict] = field(default_factory=dict)
    """ready steering specs by role: actadd, sae_clamp, conditional_sae, control_clamp"""

    @classmethod
    def from_dict(cls, data: dict, source: str = "discovery") -> Discovery:
        """A discovery from its JSON object; keys of older files that no field holds are left out."""
        if not isinstance(data, dict) or not isinstance(data.get("candidates"), list):
            raise SaesteerError(f"{short(source)}: not a discovery file (no candidates)")
        missing = [name for name in ("sae", "model", "layer") if name not in data]
        if missing:
            raise SaesteerError(f"{short(source)}: not a discovery file (no {', '.join(missing)})")
        found = cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
        for f in fields(cls):  # the JSON types of each field (the nested statistics are read as they come)
            value, kind = getattr(found, f.name), _DISCOVERY_TYPES[f.name]
            if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                raise SaesteerError(f"{short(source)}: discovery field {f.name} is not {_TYPE_NAMES[kind]}")
        return found

    @classmethod
    def read(cls, path: str | Path) -> Discovery:
        """The discovery.json at `path`; a missing, unreadable or malformed file raises SaesteerError."""
        path = Path(path)
        if not path.is_file():
            raise SaesteerError(f"no such discovery file: {short(str(path))}")
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))
        except OSError as err:
            raise SaesteerError(f"cannot read discovery file {short(str(path))}: {err.strerror}") from None
        except UnicodeDecodeError:
            raise SaesteerError(f"cannot read discovery file {short(str(path))}: not UTF-8 text") from None
        except json.JSONDecodeError as err:
            raise SaesteerError(f"{short(str(path))}:{err.lineno}: malformed JSON ({err.msg})") from None

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def role(self, spec: dict) -> str:
        """The name of a steering config in reproduce's tables: none, system_prompt, actadd, sae_clamp,
        control_clamp (a clamp of the control feature), conditional_sae."""
        method = spec.get("method", "none")
        if method == "sae":
            control = (self.control or {}).get("feature")
            return "control_clamp" if spec.get("features") == [control] else "sae_clamp"
        return {"conditional": "conditional_sae"}.get(method, method)


_DISCOVERY_TYPES = {
    "sae": str,
    "model": str,
    "layer": int,
    "candidates": list,
    "config": dict,
    "n_harmful": int,
    "n_harmless": int,
    "n_refusal_replies": int,
    "n_compliance_replies": int,
    "baseline": dict,
    "control": (dict, type(None)),
    "judge": str,
    "detector": dict,
    "specs": dict,
}
_TYPE_NAMES = {
    str: "text",
    int: "an integer",
    list: "a list",
    dict: "an object",
    (dict, type(None)): "an object",
}


# The keys a results file's rows must hold to be reported (files written before a field was added lack it).
RESULT_KEYS = (
    *(f.name for f in fields(ResultRow) if f.name != "wall_time_s"),
    *(f"config.{name}" for name in ("model", "steering", "suite", "dataset", "split", "seed")),
)


def parse_limits(text: str) -> tuple[int | None, dict[str, int]]:
    """'100' or '50,mmlu=100,gsm8k=20': a default per-dataset limit and per-dataset overrides (0 = all)."""
    default: int | None = None
    overrides: dict[str, int] = {}
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            if "=" in part:
                name, value = part.split("=", 1)
                overrides[name.strip()] = int(value)
            else:
                default = int(part)
    except ValueError:
        raise SaesteerError(
            f"bad --limit {short(text)!r}: use N or N,dataset=M,... (e.g. 50,mmlu=100)"
        ) from None
    if any(v < 0 for v in [*overrides.values(), default or 0]):
        raise SaesteerError(f"bad --limit {short(text)!r}: limits must be 0 (all) or more")
    return default or None, {k: v or 10**9 for k, v in overrides.items()}


def parse_suites(text: str) -> tuple[str, ...]:
    """'all', one suite, or a comma-separated list."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if names == ["all"]:
        return SUITES
    unknown = [s for s in names if s not in SUITES]
    if unknown or not names:
        raise SaesteerError(
            f"unknown suite {short(', '.join(map(repr, unknown)) or repr(text))}: use {', '.join(SUITES)} or all"
        )
    return tuple(names)


@dataclass
class SweepConfig:
    """What `saesteer sweep` runs: a grid of steering configs, each evaluated like `saesteer eval`."""

    grid: str = ""
    """JSON/YAML list of steering dicts and/or {'grid': {field: [values]}}"""
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(split="validation"))
    """what each config is evaluated on (sweeps choose settings: the validation split)"""
    out: str = "runs/sweep.jsonl"
    """results JSONL; configs already in it are skipped"""
    cache: str | None = None
    """generation cache file (default: <out>.cache.jsonl)"""
    judge: str = "string"
    """string, strict (apology + offer of help = compliance), a local chat model spec, or
    openai:<base url>/v1:<model>"""
    device: str | None = None
    """cpu, cuda, mps (default: best available)"""
    dtype: str | None = None
    """float32 or bfloat16 (default: float32 on CPU, bfloat16 on GPUs that support it)"""


@dataclass
class ReportConfig:
    """What `saesteer report` renders."""

    results: tuple[str, ...] = ()
    """eval/sweep results JSONL files"""
    discovery: str | None = None
    """discovery.json from `saesteer discover` (feature dashboards)"""
    examples: str | None = None
    """example generations JSONL (saesteer.report.write_examples)"""
    out: str = "runs/report"
    """folder for report.html, report.md and the plot PNGs"""
    title: str = "saesteer report"
    """title of the report"""
    screenshot: bool = False
    """also render report.html in headless Chromium to report.png and check it"""


@dataclass
class ServeConfig:
    """Server settings; `steering` is the default for requests that name none (preset, JSON or file)."""

    model_name: str | None = None
    """model name reported in the API (default: the model spec)"""
    steering: str | None = None
    """default steering for requests that name none: preset, JSON spec or JSON file"""
    max_tokens: int = 512
    """largest max_tokens a request may ask for"""
    default_max_tokens: int = 128
    """max_tokens of requests that set none (capped at max_tokens)"""
    max_prompt_tokens: int = 2048
    """longest prompt accepted, in tokens"""
    max_batch_size: int = 16
    """most requests generated together (a continuous batch)"""
    max_body_bytes: int = 1 << 20
    """largest request body accepted, in bytes"""
    body_seconds: float = 30.0
    """longest a request may take to send its body"""
    header_seconds: float = 10.0
    """longest a connection may take to send a request's headers (a slow client is then disconnected)"""
    max_edits: int = 64
    """most residual-stream edits one request's steering may make: an SAE clamp counts one per feature, any
    other method (a stack's part, a conditional's inner steering) one"""
    max_files: int = 4
    """most distinct files (SAEs, directions, detectors) one request's steering may name"""
    allow_dirs: list[str] = field(default_factory=list)
    """folders whose files (SAEs, directions, detectors) requests may name, besides the shipped artefacts
    (presets always work)"""
    api_key: str | None = None
    """require `Authorization: Bearer <api_key>` on every request, the API docs included"""

    def __post_init__(self):
        for name in (
            "max_tokens",
            "default_max_tokens",
            "max_prompt_tokens",
            "max_batch_size",
            "max_body_bytes",
            "max_edits",
            "max_files",
        ):
            if getattr(self, name) < 1:
                raise SaesteerError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("body_seconds", "header_seconds"):
            if not getattr(self, name) > 0:
                raise SaesteerError(f"{name} must be positive, not {getattr(self, name)}")
        if self.api_key is not None and not self.api_key.strip():
            raise SaesteerError("the API key is empty: give a non-empty key, or none to serve without one")


@dataclass
class DemoConfig:
    """What the demo runs; the sizes keep it short on a CPU."""

    model: str = DEFAULT_MODEL
    """default alias, hub id, local folder or .gguf file"""
    dtype: str | None = None
    """float32 or bfloat16 (default: float32 on CPU, bfloat16 on GPUs that support it; bfloat16 changes most
    replies)"""
    out: str = "runs/demo"
    """folder for results, examples and the HTML report"""
    methods: tuple[str, ...] = ("refusal", "refusal_conditional")
    """steering presets, JSON specs or files to compare"""
    examples: int = 3
    """harmful and safe TEST prompts shown side by side"""
    limit: int = 32
    """TEST prompts per safety set in the small eval"""
    max_new_tokens: int = 64
    """greedy reply length (loops grow with the reply: shorter replies hide them)"""
    seed: int = 0
    """seed of the eval's prompt samples and bootstrap CIs"""
    train_sae: bool = False
    """train a small SAE instead of using the shipped one (even when presets are shipped)"""
    fallback_tokens: int = 200_000
    """activations collected for the fallback SAE (trained for 3 epochs)"""
    fallback_prompts: int = 48
    """harmful and harmless TRAIN prompts for the fallback discovery"""


@dataclass
class LayerScanConfig:
    """Which layers and ActAdd strengths to try, on how many prompts."""

    layers: tuple[int, ...] = (4, 6, 8, 10, 12, 14)
    """decoder layers scanned"""
    multipliers: tuple[float, ...] = (8.0,)
    """ActAdd alpha = multiplier x |diff-in-means| at that layer; 1x and 2x barely change this model (measured:
    <= 6% refusal at every layer 4-18), so the scan uses 8x"""
    train_prompts: int = 64
    """harmful and harmless TRAIN prompts for the direction"""
    val_prompts: int = 24
    """harmful and harmless VALIDATION prompts to judge the steered replies"""
    max_new_tokens: int = 40
    """tokens generated per judged reply"""


@dataclass
class ReproduceConfig:
    """Sizes of every stage. `full` is the reported run; `quick` and `tiny` (CI) shrink n."""

    out: str = "runs/reproduce"
    """output folder (rerun to resume)"""
    shared: str = "../shared/datasets"
    """the shared datasets folder with the SAE training corpus, which is not shipped"""
    model: str = DEFAULT_MODEL
    """default alias, hub id, local folder or .gguf file"""
    layer: int | None = None
    """decoder layer of the SAE and the steering (default: the layer scan's choice)"""
    scan: LayerScanConfig | None = field(default_factory=LayerScanConfig)
    """the layer scan (None: skip it and use `layer`)"""
    collect: CollectConfig = field(default_factory=lambda: CollectConfig(tokens=4_000_000))
    """the activations collected for the SAE (its model, layer and data are the run's)"""
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            total_tokens=10_000_000, expansion_factor=12, k=32, dead_tokens=2_000_000
        )
    )
    """the SAE's training: 10M tokens (several epochs of the collected 4M), 12 x 576 = 6,912 latents (15.9 MB in
    bf16, within the shipping budget); its activations, folder and seed are the run's"""
    sae_eval: SAEEvalConfig = field(default_factory=lambda: SAEEvalConfig(contexts=64))
    """the SAE's held-out evaluation (its SAE and output are the run's)"""
    discover: DiscoverConfig = field(
        default_factory=lambda: DiscoverConfig(n_candidates=4, screen_values=(8.0, 16.0), screen_prompts=16)
    )
    """discovery on TRAIN prompts (its SAE, model, folder, judge and reply length are the run's)"""
    gate: GateConfig = field(default_factory=GateConfig)
    """the harm gate of the conditional method (its SAE, model and folder are the run's)"""
    select_limit: int = 24
    """VALIDATION prompts per safety set"""
    clamp_values: tuple[float, ...] = (4.0, 8.0, 12.0, 16.0)
    """SAE clamp values compared on VALIDATION"""
    decays: tuple[float, ...] = (1.0, 0.9)
    """schedules of the SAE clamps (plain and conditional) compared on VALIDATION: the edit on generated token
    t is scaled by decay**t (1: the paper's constant clamp)"""
    actadd_multipliers: tuple[float, ...] = (4.0, 8.0, 16.0)
    """ActAdd strengths compared on VALIDATION, x |diff-in-means|"""
    test_limit: str = "100,mmlu=60,truthfulqa=60,gsm8k=16,hh_rlhf=24,crescendo_advbench=16,heldout_text=24"
    """TEST items per dataset (as `saesteer eval --limit`)"""
    mmlu_shots: int = 3
    """MMLU few-shot examples from the dev set"""
    max_new_tokens: int = 64
    """judged reply length: loops grow with length, so shorter replies hide them"""
    judge: str = "strict"
    """refusal judge of discovery and the evaluations"""
    seed: int = 0
    """seed of every sample, SAE initialisation and bootstrap"""
