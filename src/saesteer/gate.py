"""The `saesteer gate` stage: harm detectors (`saesteer.detectors`) trained on development prompts, chosen by
leave-one-source-out validation, with a guaranteed threshold.

Validation (`leave_one_source_out`) uses development prompts only (train + validation splits). For each
fold in `FOLDS` in turn: train on the other sources, set the threshold on them, and report each left-out
source's recall (harmful) or false-positive rate (benign) with a Clopper-Pearson 95% CI. A harmful source
leaves together with the benign source written in its style (AdvBench with its benign twins, XSTest-unsafe
with XSTest-safe, each written style's harmful side with its twins), so a fold asks whether the detector
finds harm in a style it has never seen, rather than whether benign examples of that style taught it
that the style is benign. Sets that are not shipped (`harmful_mix`, the Alpaca `harmless` set) are never
trained on; when ../shared is present they are scored in every fold as extra held-out sources.

Threshold (`guaranteed_threshold`): the lowest threshold at which the one-sided 95% Clopper-Pearson upper
bound of the false-positive rate of EACH benign source is at most `max_fpr`, computed on cross-fitted
(out-of-fold) scores so that the bound is not fooled by training fit. It is fixed before test is scored.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from sklearn.linear_model import LogisticRegression
from tqdm.auto import tqdm

from saesteer.artefacts import load_sae
from saesteer.config import Candidate, GateConfig
from saesteer.detectors import (
    Detector,
    features_of,
    load_detector,
    pool,
    position_weights,
    score_prompts,
)
from saesteer.errors import SaesteerError
from saesteer.evalsets import safety_prompts, shared_available, subsample
from saesteer.hooks import residuals_at
from saesteer.models import LoadedModel, chat_prompts, load_model, tokenized
from saesteer.stats import clopper_pearson, upper_bound
from saesteer.steering import Conditional, parse_steering

STYLES = ("everyday", "framed", "imperative")  # the styles of the project's written harmful/benign pairs
HARMFUL_SOURCES = ("advbench", "xstest_unsafe", "hh_rlhf_harmful", *(f"written_harmful:{s}" for s in STYLES))
BENIGN_SOURCES = (
    "xstest_safe",
    "hh_rlhf_benign",
    "benign:truthfulqa",
    "benign:mmlu",
    "benign:gsm8k",
    "benign:written",
    "benign:benign_twins",
    *(f"written_benign:{s}" for s in STYLES),
)
FOLDS = (
    ("advbench", "benign:benign_twins"),
    ("xstest_unsafe", "xstest_safe"),
    ("hh_rlhf_harmful", "hh_rlhf_benign"),
    *((f"written_harmful:{s}", f"written_benign:{s}") for s in STYLES),
    ("benign:truthfulqa",),
    ("benign:mmlu",),
    ("benign:gsm8k",),
    ("benign:written",),
)  # leave-one-source-out folds: a harmful source leaves with the benign source of its style; any other source alone
HELD_OUT_SOURCES = (
    "harmful_mix",
    "harmless",
)  # not shipped: never trained on, scored when ../shared is present
HARMFUL_HELD_OUT = ("harmful_mix",)
DEV_SPLITS = ("train", "validation")
HELD_OUT_LIMIT = 1000  # prompts scored per held-out source (a seeded sample of the large Alpaca set)


# ---------------------------------------------------------------- data and features


def source_prompts(
    source: str, splits: tuple[str, ...], limit: int | None = None, seed: int = 0
) -> list[str]:
    """Prompts of one source (`set` or `set:category`) in the given splits; a seeded sample when `limit`."""
    name, _, category = source.partition(":")
    texts = [
        p.text
        for split in splits
        for p in safety_prompts(name, split)
        if not category or p.category == category
    ]
    return subsample(texts, limit, seed) if limit else texts


@dataclass
class Pool:
    """Prompts by source, with their pooled features: features[(layer, pooling, tokens, sae)] is [n, width]."""

    sources: list[str]
    labels: np.ndarray  # 1 harmful, 0 benign, per prompt
    texts: list[str]
    features: dict = field(default_factory=dict)

    def select(self, keep: np.ndarray) -> "Pool":
        index = np.flatnonzero(keep)
        return Pool(
            [self.sources[i] for i in index],
            self.labels[index],
            [self.texts[i] for i in index],
            {key: value[index] for key, value in self.features.items()},
        )


def build_pool(prompts: dict[str, list[str]], harmful: set[str]) -> Pool:
    sources = [s for s, texts in prompts.items() for _ in texts]
    return Pool(
        sources,
        np.array([s in harmful for s in sources], dtype=np.int64),
        [t for texts in prompts.values() for t in texts],
    )


def feature_keys(candidates: tuple[Candidate, ...], sae: str | None) -> list[tuple]:
    return sorted(
        {
            (layer, c.pooling, c.tokens if c.pooling == "last" else 0, sae if c.kind == "sae_probe" else None)
            for c in candidates
            for layer in c.layers
        },
        key=str,
    )


@torch.inference_mode()
def extract_features(
    loaded: LoadedModel, pool_: Pool, keys: list[tuple], batch_size: int = 16, desc: str = "features"
) -> None:
    """Fill `pool_.features` for every key with one early-exit forward pass per batch."""
    layers = tuple(sorted({k[0] for k in keys}))
    rendered = chat_prompts(loaded, [[{"role": "user", "content": t}] for t in pool_.texts])
    parts: dict[tuple, list[torch.Tensor]] = {k: [] for k in keys}
    for start in tqdm(range(0, len(rendered), batch_size), desc=desc, leave=False):
        batch = tokenized(loaded, rendered[start : start + batch_size])
        hidden = residuals_at(loaded.model, batch["input_ids"], layers, "resid_post", batch["attention_mask"])
        for key in keys:
            layer, pooling, tokens, sae = key
            weights = position_weights(loaded, batch["input_ids"], batch["attention_mask"], pooling, tokens)
            encoded = features_of(hidden[layer].float(), sae)
            parts[key].append(pool(encoded, weights, pooling).cpu())
    pool_.features.update({k: torch.cat(v).numpy() for k, v in parts.items()})


# ---------------------------------------------------------------- fitting


def _source_weights(pool_: Pool) -> np.ndarray:
    """Sample weights: each class weighs 1, split evenly over its sources, then over each source's prompts."""
    weights = np.zeros(len(pool_.sources))
    for label in (0, 1):
        names = sorted({s for s, y in zip(pool_.sources, pool_.labels) if y == label})
        for name in names:
            members = np.array([s == name for s in pool_.sources])
            weights[members] = 1.0 / (len(names) * members.sum())
    return weights * len(weights) / 2


def _key(candidate: Candidate, layer: int, sae: str | None) -> tuple:
    return (
        layer,
        candidate.pooling,
        candidate.tokens if candidate.pooling == "last" else 0,
        sae if candidate.kind == "sae_probe" else None,
    )


def fit(candidate: Candidate, pool_: Pool, sae: str | None = None, seed: int = 0) -> Detector:
    """Train one candidate on a pool (features already extracted)."""
    rows, biases = [], []
    weights = _source_weights(pool_)
    for layer in candidate.layers:
        x, y = pool_.features[_key(candidate, layer, sae)], pool_.labels
        if candidate.kind == "dim":
            direction = np.average(x[y == 1], 0, weights[y == 1]) - np.average(x[y == 0], 0, weights[y == 0])
            rows.append(direction / np.linalg.norm(direction))
            biases.append(0.0)
            continue
        mean, std = x.mean(0), x.std(0) + 1e-6
        sparse = candidate.kind == "sae_probe"
        model = LogisticRegression(
            C=candidate.c,
            l1_ratio=1.0 if sparse else 0.0,
            solver="liblinear" if sparse else "lbfgs",
            max_iter=3000,
            random_state=seed,
        )
        model.fit((x - mean) / std, y, sample_weight=weights)
        coef = model.coef_[0] / std
        rows.append(coef / len(candidate.layers))
        biases.append((float(model.intercept_[0]) - float(coef @ mean)) / len(candidate.layers))
    return Detector(
        candidate.kind,
        candidate.layers,
        torch.tensor(np.stack(rows), dtype=torch.float32),
        float(sum(biases)),
        candidate.pooling,
        candidate.tokens,
        sae if candidate.kind == "sae_probe" else None,
    )


def pooled_scores(
    detector: Detector, pool_: Pool, candidate: Candidate, sae: str | None = None
) -> np.ndarray:
    """Scores from cached features; equal to `Detector.scores` on the same prompts (single-turn)."""
    total = np.full(len(pool_.texts), detector.bias)
    for row, layer in zip(detector.weight.numpy(), detector.layers):
        total += pool_.features[_key(candidate, layer, sae)] @ row
    return total


def out_of_fold_scores(
    candidate: Candidate, pool_: Pool, sae: str | None, folds: int, seed: int
) -> np.ndarray:
    """Each prompt scored by a detector trained without it (folds stratified by source)."""
    rng = np.random.default_rng(seed)
    fold_of = np.zeros(len(pool_.texts), dtype=np.int64)
    for name in sorted(set(pool_.sources)):
        members = np.flatnonzero([s == name for s in pool_.sources])
        fold_of[rng.permutation(members)] = np.arange(len(members)) % folds
    scores = np.zeros(len(pool_.texts))
    for k in range(folds):
        detector = fit(candidate, pool_.select(fold_of != k), sae, seed)
        held = pool_.select(fold_of == k)
        scores[fold_of == k] = pooled_scores(detector, held, candidate, sae)
    return scores


# ---------------------------------------------------------------- thresholds and intervals


def guaranteed_threshold(benign_scores: dict[str, np.ndarray], max_fpr: float) -> dict:
    """The lowest threshold at which every benign source's 95% upper bound on its false-positive rate
    (score > threshold) is at most `max_fpr`. A source too small for the bound even at zero false
    positives is listed in `infeasible` and forces the threshold above all its scores."""
    threshold, infeasible = -np.inf, []
    for name, scores in benign_scores.items():
        ordered = np.sort(scores)[::-1]
        allowed = max(
            (k for k in range(len(ordered)) if upper_bound(k, len(ordered)) <= max_fpr), default=None
        )
        if allowed is None:
            infeasible.append(name)
            allowed = 0
        threshold = max(threshold, float(ordered[allowed]))
    return {
        "threshold": threshold,
        "max_fpr": max_fpr,
        "rule": "one-sided 95% Clopper-Pearson upper bound of each benign "
        "source's false-positive rate <= max_fpr, on out-of-fold scores",
        "infeasible": infeasible,
    }


def rate(flags: np.ndarray) -> dict:
    k, n = int(flags.sum()), len(flags)
    low, high = clopper_pearson(k, n)
    return {"rate": k / n if n else float("nan"), "k": k, "n": n, "ci_low": low, "ci_high": high}


# ---------------------------------------------------------------- validation and choice


def train_with_threshold(candidate: Candidate, pool_: Pool, config: GateConfig) -> tuple[Detector, dict]:
    """Fit on the whole pool; the threshold from its out-of-fold scores (benign sources only)."""
    oof = out_of_fold_scores(candidate, pool_, config.sae, config.folds, config.seed)
    benign = {
        name: oof[np.array([s == name for s in pool_.sources])]
        for name in sorted(set(pool_.sources))
        if name not in HARMFUL_SOURCES and name not in HELD_OUT_SOURCES
    }
    gate = guaranteed_threshold(benign, config.max_fpr)
    harmful = oof[pool_.labels == 1]
    gate["oof_recall"] = float((harmful > gate["threshold"]).mean())
    return fit(candidate, pool_, config.sae, config.seed), gate


def leave_one_source_out(candidate: Candidate, dev: Pool, held_out: Pool | None, config: GateConfig) -> dict:
    """Per left-out vendored source: recall (harmful) or false-positive rate (benign); plus the
    never-trained-on held-out sources, scored by each fold's detector (their worst fold is reported)."""
    folds = {}
    extra: dict[str, list[dict]] = {}
    present = set(dev.sources)
    paired = [kept for kept in (tuple(s for s in fold if s in present) for fold in FOLDS) if kept]
    alone = [(s,) for s in sorted(present - {s for fold in FOLDS for s in fold})]
    for fold in paired + alone:
        left_out = np.array([s in fold for s in dev.sources])
        detector, gate = train_with_threshold(candidate, dev.select(~left_out), config)
        scores = pooled_scores(detector, dev.select(left_out), candidate, config.sae)
        sources = np.array(dev.sources, dtype=object)[left_out]
        for source in fold:
            folds[source] = {
                "label": "harmful" if source in HARMFUL_SOURCES else "benign",
                "threshold": gate["threshold"],
                "fold": list(fold),
                **rate(scores[sources == source] > gate["threshold"]),
            }
        if held_out is not None:
            for name in sorted(set(held_out.sources)):
                members = held_out.select(np.array([s == name for s in held_out.sources]))
                extra.setdefault(name, []).append(
                    rate(pooled_scores(detector, members, candidate, config.sae) > gate["threshold"])
                )
    harmful = {s: f for s, f in folds.items() if f["label"] == "harmful"}
    benign = {s: f for s, f in folds.items() if f["label"] == "benign"}
    worst_recall, worst_fpr = (
        min(harmful, key=lambda s: harmful[s]["rate"]),
        max(benign, key=lambda s: benign[s]["rate"]),
    )
    worst_extra = {
        name: (min if name in HARMFUL_HELD_OUT else max)(runs, key=lambda r: r["rate"])
        for name, runs in extra.items()
    }
    return {
        "candidate": asdict(candidate),
        "name": candidate.name,
        "folds": folds,
        "worst_recall": harmful[worst_recall]["rate"],
        "worst_recall_source": worst_recall,
        "worst_fpr": benign[worst_fpr]["rate"],
        "worst_fpr_source": worst_fpr,
        "held_out": worst_extra,
    }


def rank_key(result: dict, target_fpr: float, target_recall: float) -> tuple:
    """Worst case first: meeting both targets on every left-out source; then leximin over the folds'
    successes (recall of each harmful fold, 1 - FPR of each benign fold, sorted ascending), so the worst
    fold decides and the next worst breaks ties."""
    meets = result["worst_fpr"] <= target_fpr and result["worst_recall"] >= target_recall
    successes = sorted(
        f["rate"] if f["label"] == "harmful" else 1 - f["rate"] for f in result["folds"].values()
    )
    return (meets, *successes)


# ---------------------------------------------------------------- the whole procedure


def resolve_layers(candidate: Candidate, loaded: LoadedModel, sae: str | None) -> Candidate | None:
    """The candidate with absolute layers (fractions of depth rounded; a `sae_probe` at its SAE's layer),
    or None when it cannot run on this model."""
    if candidate.kind == "sae_probe":
        try:
            cfg = load_sae(sae).cfg if sae else None
        except SaesteerError:
            cfg = None
        fits = (
            cfg is not None
            and cfg.d_in == loaded.d_model
            and cfg.layer is not None
            and 0 <= cfg.layer < loaded.n_layers
        )
        return replace(candidate, layers=(cfg.layer,)) if fits else None
    layers = tuple(
        dict.fromkeys(
            min(loaded.n_layers - 1, round(x * loaded.n_layers)) if isinstance(x, float) else x
            for x in candidate.layers
        )
    )
    return replace(candidate, layers=layers) if all(0 <= x < loaded.n_layers for x in layers) else None


def prompt_sets(
    config: GateConfig, splits: tuple[str, ...]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(vendored sources, held-out sources available here): prompts of the given splits per source."""
    vendored = {
        s: source_prompts(s, splits, config.limit, config.seed) for s in (*HARMFUL_SOURCES, *BENIGN_SOURCES)
    }
    held = {
        s: source_prompts(s, splits, min(config.limit or HELD_OUT_LIMIT, HELD_OUT_LIMIT), config.seed)
        for s in HELD_OUT_SOURCES
        if shared_available(s)
    }
    return vendored, held


def _features(
    loaded: LoadedModel, prompts: dict[str, list[str]], keys: list[tuple], path: Path, config: GateConfig
) -> Pool:
    """The pool of `prompts` with features, read from `path` when an earlier run wrote the same ones."""
    pool_ = build_pool(prompts, set(HARMFUL_SOURCES) | set(HARMFUL_HELD_OUT))
    digest = json.dumps([pool_.texts, [list(map(str, k)) for k in keys], loaded.spec])
    if path.is_file():
        with safe_open(str(path), "np") as f:
            if (f.metadata() or {}).get("digest") == hash_text(digest):
                stored = load_file(str(path))
                pool_.features = {k: stored[json.dumps(list(map(str, k)))] for k in keys}
                return pool_
    extract_features(loaded, pool_, keys, config.batch_size, desc=path.stem)
    save_file(
        {json.dumps(list(map(str, k))): np.ascontiguousarray(v) for k, v in pool_.features.items()},
        str(path),
        metadata={"digest": hash_text(digest)},
    )
    return pool_


def hash_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def per_source_rates(scores: dict[str, np.ndarray], threshold: float) -> dict[str, dict]:
    harmful = set(HARMFUL_SOURCES) | set(HARMFUL_HELD_OUT)
    return {
        name: {"label": "harmful" if name in harmful else "benign", **rate(values > threshold)}
        for name, values in scores.items()
    }


STAGE_FIELDS = ("model", "out", "baseline", "device")  # where the stage runs, not what the gate is


def _settings(config: GateConfig) -> dict:
    """The fields that decide the gate (gate.json's `config`, compared on resume): all but `STAGE_FIELDS`."""
    return {k: v for k, v in asdict(config).items() if k not in STAGE_FIELDS}


def run_gate(
    loaded: LoadedModel, config: GateConfig, out: Path, baseline: tuple[str, float] | None = None
) -> dict:
    """Leave-one-source-out validation of every candidate, the choice by worst fold, the chosen detector
    trained on all development prompts with its guaranteed threshold (out/detector.safetensors), then, with
    the threshold fixed, its recall and false-positive rate per source on TEST prompts. `baseline` (a
    detector file and its threshold, e.g. the old shipped detector) is scored beside it on dev and test."""
    out.mkdir(parents=True, exist_ok=True)
    done = out / "gate.json"
    if done.is_file():  # an earlier run with the same settings: nothing to redo
        earlier = json.loads(done.read_text())
        same = (
            json.loads(json.dumps(_settings(config))) == earlier["config"] and earlier["model"] == loaded.spec
        )
        if same and (baseline is None or earlier.get("baseline", {}).get("detector") == baseline[0]):
            return earlier
    candidates = list(
        dict.fromkeys(c for c in (resolve_layers(c, loaded, config.sae) for c in config.candidates) if c)
    )
    if not candidates:
        raise SaesteerError(f"no gate candidate fits {loaded.spec} ({loaded.n_layers} layers)")
    keys = feature_keys(tuple(candidates), config.sae)
    vendored, held = prompt_sets(config, DEV_SPLITS)
    dev = _features(loaded, vendored, keys, out / "features-dev.safetensors", config)
    held_pool = _features(loaded, held, keys, out / "features-held-out.safetensors", config) if held else None
    results = [
        leave_one_source_out(c, dev, held_pool, config) for c in tqdm(candidates, desc="leave-one-source-out")
    ]
    ranked = sorted(results, key=lambda r: rank_key(r, config.target_fpr, config.target_recall), reverse=True)
    chosen = next(c for c in candidates if c.name == ranked[0]["name"])
    detector, gate = train_with_threshold(chosen, dev, config)
    detector.save(
        out / "detector.safetensors", loaded.spec, threshold=gate["threshold"], candidate=chosen.name
    )
    test_vendored, test_held = prompt_sets(config, ("test",))
    test = {**test_vendored, **test_held}
    scored = {
        "chosen": {
            name: score_prompts(loaded, detector, texts, config.batch_size).numpy()
            for name, texts in tqdm(test.items(), desc="test scores")
        }
    }
    summary = {
        "config": _settings(config),
        "model": loaded.spec,
        "loso": results,
        "ranking": [r["name"] for r in ranked],
        "chosen": chosen.name,
        "threshold": gate,
        "test": {"chosen": per_source_rates(scored["chosen"], gate["threshold"])},
    }
    if baseline is not None:
        old = load_detector(baseline[0])
        summary["baseline"] = {
            "detector": baseline[0],
            "threshold": baseline[1],
            "dev": per_source_rates(
                {
                    name: score_prompts(loaded, old, texts, config.batch_size).numpy()
                    for name, texts in {**vendored, **held}.items()
                },
                baseline[1],
            ),
            "test": per_source_rates(
                {
                    name: score_prompts(loaded, old, texts, config.batch_size).numpy()
                    for name, texts in test.items()
                },
                baseline[1],
            ),
        }
    (out / "gate.json").write_text(json.dumps(summary, indent=2))
    (out / "gate.md").write_text(gate_markdown(summary))
    return summary


def gate(config: GateConfig, loaded: LoadedModel | None = None) -> dict:
    """The `saesteer gate` stage: `run_gate` on `config.model` (or `loaded`) into `config.out`, with the
    detector and threshold of the conditional steering `config.baseline` (if any) scored beside the new one;
    returns the summary (gate.json)."""
    if not 0 < config.max_fpr < 1:
        raise SaesteerError(f"--max-fpr must be between 0 and 1, not {config.max_fpr}")
    old = None
    if config.baseline is not None:
        spec = parse_steering(config.baseline)
        if not isinstance(spec, Conditional):
            raise SaesteerError(f"--baseline must be a conditional steering, not {spec.method}")
        old = (spec.detector, spec.threshold)
    loaded = loaded or load_model(config.model, device=config.device)
    return run_gate(loaded, config, Path(config.out), old)


def ship_gate(detector: Path, threshold: float, dest: Path, steering: dict | None = None) -> dict:
    """Install a gate in the shipped presets at `dest` (assets/shipped): the detector becomes
    `harm-gate.safetensors` and `refusal_conditional` gates its steering with it; with `steering`, that
    steering also becomes `refusal` and the one `refusal_conditional` gates. Replaced presets are kept once
    as `<name>_previous`. Returns the new `refusal_conditional`."""
    path = dest / "steering.json"
    if not path.is_file():
        raise SaesteerError(f"no shipped presets at {path}: run `saesteer reproduce --ship {dest}` first")
    shipped = json.loads(path.read_text())
    presets = shipped["presets"]
    if "refusal_conditional" not in presets:
        raise SaesteerError(f"{path} has no refusal_conditional preset to gate")
    shutil.copyfile(detector, dest / "harm-gate.safetensors")
    for name in ("refusal", "refusal_conditional"):
        if name in presets and f"{name}_previous" not in presets:
            presets[f"{name}_previous"] = presets[name]
    inner = steering or presets["refusal_conditional"]["steering"]
    if steering is not None:
        presets["refusal"] = steering
    presets["refusal_conditional"] = {
        "method": "conditional",
        "steering": inner,
        "detector": "builtin:harm-gate.safetensors",
        "threshold": threshold,
        "layer": None,
        "tokens": 4,
    }
    path.write_text(json.dumps(shipped, indent=2))
    return presets["refusal_conditional"]


def _cell(r: dict) -> str:
    return f"{100 * r['rate']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] (n={r['n']})"


def gate_markdown(summary: dict) -> str:
    """The leave-one-source-out table (every candidate, worst folds) and the test table."""
    sources = sorted(
        {s for r in summary["loso"] for s in r["folds"]}, key=lambda s: (s not in HARMFUL_SOURCES, s)
    )
    held = sorted({s for r in summary["loso"] for s in r["held_out"]})
    lines = [
        f"# Harm gate: {summary['model']}",
        "",
        "Leave-one-source-out on development prompts (train + validation splits): each column is a source left out of "
        "training and threshold; harmful columns give recall, benign columns the false-positive rate, in % with "
        f"Clopper-Pearson 95% CIs. Threshold rule: {summary['threshold']['rule']} (max_fpr {summary['config']['max_fpr']}).",
        "Held-out columns (never trained on) give each candidate's worst fold.",
        "",
        "| candidate | worst recall | worst FPR | "
        + " | ".join(sources + [f"{h} (held out)" for h in held])
        + " |",
        "|---|---|---|" + "---|" * (len(sources) + len(held)),
    ]
    for name in summary["ranking"]:
        r = next(x for x in summary["loso"] if x["name"] == name)
        cells = [_cell(r["folds"][s]) if s in r["folds"] else "-" for s in sources] + [
            _cell(r["held_out"][h]) for h in held
        ]
        lines.append(
            f"| {name}{' (chosen)' if name == summary['chosen'] else ''} | {100 * r['worst_recall']:.1f} "
            f"({r['worst_recall_source']}) | {100 * r['worst_fpr']:.1f} ({r['worst_fpr_source']}) | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        f"Chosen: **{summary['chosen']}**, trained on all development prompts; threshold "
        f"{summary['threshold']['threshold']:.4g} (out-of-fold harmful recall {100 * summary['threshold']['oof_recall']:.1f}%).",
        "",
        "## TEST prompts (threshold fixed before scoring)",
        "",
        "| source | chosen detector |" + (" old detector |" if "baseline" in summary else ""),
        "|---|---|" + ("---|" if "baseline" in summary else ""),
    ]
    for name, r in summary["test"]["chosen"].items():
        old = f" {_cell(summary['baseline']['test'][name])} |" if "baseline" in summary else ""
        lines.append(
            f"| {name} ({r['label']}: {'recall' if r['label'] == 'harmful' else 'FPR'}) | {_cell(r)} |{old}"
        )
    return "\n".join(lines) + "\n"
