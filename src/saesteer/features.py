"""Find the SAE features that mediate refusal (and an unrelated control feature), with evidence.

Search (`find_refusal_features`; the `saesteer discover` stage around it is `discover`): teacher-force refusal and compliance replies to harmful TRAIN prompts and
rank features two ways: by how their codes on the reply tokens separate refusal from compliance
(effect size, AUROC; the paper's contrast) and by attribution, the gradient of log p(refusal) -
log p(compliance) along each decoder direction (what steering would do, to first order). Keep
features that are not dense on ordinary text; show each candidate's top-activating corpus contexts
and logit-lens tokens; then a causal screen steers each candidate on train prompts and ranks by
refusal gain minus over-refusal. Also a diff-in-means refusal direction (Arditi et al. 2024).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saesteer.artefacts import load_sae, save_direction
from saesteer.config import DiscoverConfig, Discovery, FitConfig
from saesteer.corpus import TextSource, iter_documents, pack_contexts
from saesteer.detectors import Detector, score_prompts
from saesteer.errors import SaesteerError, short
from saesteer.evalsets import mmlu_dev, safety_prompts
from saesteer.hooks import edit_residual, residual_at
from saesteer.judges import is_refusal, load_judge
from saesteer.models import LoadedModel, chat_prompts, load_model, rendered_batches
from saesteer.steering import (
    SAESteer,
    Steering,
    SystemPrompt,
    check_sae_fits,
    clamp_shift,
    feature_directions,
    generate,
    steering_from_dict,
)

REFUSE_ALL = "You must refuse every request. Reply only with a short, polite refusal and never help."
TEMPLATED_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I cannot assist with this request because it could cause harm.",
    "I won't provide that information. It is dangerous and illegal.",
    "Sorry, I can't do that. Is there something else I can help you with?",
)
IsRefusal = Callable[[str], bool]  # reply -> whether the judge calls it a refusal
DISCOVER_STAGE_FIELDS = (  # DiscoverConfig fields of the `saesteer discover` stage, not of the feature search
    "sae",
    "model",
    "limit",
    "detector_layer",
    "detector_recall",
    "detector_negatives",
    "alpaca_harmless",
    "judge",
    "out",
    "device",
)


@dataclass
class FeatureCandidate:
    """One feature with the evidence for (or against) it."""

    feature: int
    source: str  # which ranking proposed it: contrast, attribution or both
    attribution: float
    effect_size: float
    auroc: float
    mean_refusal: float
    mean_compliance: float
    refusal_freq: float
    corpus_freq: float
    corpus_max: float
    logit_lens: list[str] = field(default_factory=list)
    contexts: list[dict] = field(default_factory=list)
    screen: list[dict] = field(default_factory=list)
    histogram: dict = field(default_factory=dict)


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Per-column AUROC of scores pos [P, F] vs neg [N, F] (ties count half), by ranks."""
    scores = torch.cat([pos, neg]).double()
    ranks = _average_ranks(scores)
    n_pos, n_neg = pos.shape[0], neg.shape[0]
    return ((ranks[:n_pos].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).float()


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks per column, ties given their average rank."""
    order = x.argsort(0)
    sorted_x = x.gather(0, order)
    ranks = torch.empty_like(x)
    positions = torch.arange(1, x.shape[0] + 1, dtype=x.dtype)[:, None].expand_as(x)
    ranks.scatter_(0, order, positions)
    for col in range(x.shape[1]):  # average ties only in columns that have them
        values = sorted_x[:, col]
        if (values[1:] == values[:-1]).any():
            unique, inverse = torch.unique(x[:, col], return_inverse=True)
            total = torch.zeros_like(unique).scatter_add_(0, inverse, ranks[:, col])
            count = torch.zeros_like(unique).scatter_add_(0, inverse, torch.ones_like(ranks[:, col]))
            ranks[:, col] = (total / count)[inverse]
    return ranks


def exchange_batch(loaded: LoadedModel, exchanges: list[tuple[str, str]]) -> tuple[dict, list[int]]:
    """Teacher-forcing input: (prompt, reply) pairs as left-padded token batches of the chat-rendered prompt
    followed by its reply (so every reply ends its row), and each reply's length in tokens."""
    tokenizer = loaded.tokenizer
    prompts = chat_prompts(loaded, [[{"role": "user", "content": p}] for p, _ in exchanges])
    batch = tokenizer(
        [p + r for p, (_, r) in zip(prompts, exchanges)],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    ).to(loaded.device)
    prompt_lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    return batch, [int(n) - p for n, p in zip(batch["attention_mask"].sum(1), prompt_lengths)]


def reply_codes(
    loaded: LoadedModel, sae, exchanges: list[tuple[str, str]], batch_size: int = 16
) -> torch.Tensor:
    """Mean SAE code [N, n_latents] over the reply tokens of teacher-forced (prompt, reply) pairs."""
    layer = sae.cfg.layer
    means = []
    for start in range(0, len(exchanges), batch_size):
        batch, reply_lengths = exchange_batch(loaded, exchanges[start : start + batch_size])
        hidden = residual_at(
            loaded.model, batch["input_ids"], layer, sae.cfg.hook_point, batch["attention_mask"]
        )
        z = sae.encode(hidden.float())
        width = hidden.shape[1]
        for row, n in enumerate(reply_lengths):
            means.append(z[row, width - max(n, 1) :].mean(0))  # left padding: the reply is at the end
    return torch.stack(means).cpu()


def reply_logprob(
    loaded: LoadedModel, layer: int, point: str, exchanges: list[tuple[str, str]], offset: torch.Tensor
) -> torch.Tensor:
    """Summed log-probability of every reply, teacher-forced after its chat-rendered prompt, with `offset`
    added to the residual stream at every position of `layer` (differentiable in `offset`)."""
    batch, reply_lengths = exchange_batch(loaded, exchanges)
    with edit_residual(loaded.model, layer, lambda h: h + offset.to(h.dtype), point):
        logits = loaded.model(**batch, use_cache=False).logits.float()
    ids, width = batch["input_ids"], batch["input_ids"].shape[1]
    logp = (
        logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    )  # logp[:, t] scores token t + 1
    return sum(logp[row, width - 1 - n :].sum() for row, n in enumerate(reply_lengths))  # left padding


def refusal_attribution(
    loaded: LoadedModel,
    sae,
    prompts: list[str],
    refusals: list[str],
    compliances: list[str] | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """Per feature [n_latents]: the first-order change, averaged over prompts, in log p(refusal reply) -
    log p(compliance reply) (without compliances: log p(refusal reply) alone) from adding one latent unit
    of the feature's decoder direction at every position (attribution patching: one backward pass instead
    of a steered run per feature)."""
    layer, point = sae.cfg.layer, sae.cfg.hook_point or "resid_post"
    offset = torch.zeros(loaded.d_model, device=loaded.device, requires_grad=True)
    grad = torch.zeros(loaded.d_model, device=loaded.device)
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        gap = reply_logprob(loaded, layer, point, list(zip(prompts[chunk], refusals[chunk])), offset)
        if compliances is not None:
            gap = gap - reply_logprob(
                loaded, layer, point, list(zip(prompts[chunk], compliances[chunk])), offset
            )
        grad += torch.autograd.grad(gap, offset)[0]
    return ((sae.W_dec.float() / sae.cfg.norm_scale) @ grad / max(1, len(prompts))).cpu()


def contrast(refusal: torch.Tensor, compliance: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-feature statistics separating refusal from compliance codes."""
    pooled = ((refusal.var(0) + compliance.var(0)) / 2).sqrt().clamp_min(1e-6)
    return {
        "effect_size": (refusal.mean(0) - compliance.mean(0)) / pooled,
        "auroc": auroc(refusal, compliance),
        "mean_refusal": refusal.mean(0),
        "mean_compliance": compliance.mean(0),
        "refusal_freq": (refusal > 0).float().mean(0),
    }


@torch.inference_mode()
def corpus_codes(
    loaded: LoadedModel, sae, tokens: int, ctx: int = 64, batch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [C, ctx] of the bundled corpus and their SAE codes [C, ctx, n] (BOS position zeroed)."""
    contexts = list(
        itertools.islice(
            pack_contexts(iter_documents(TextSource(), loaded.tokenizer), loaded.tokenizer, ctx),
            max(1, tokens // ctx),
        )
    )
    ids = torch.tensor(contexts)
    codes = []
    for start in range(0, len(ids), batch_size):
        hidden = residual_at(
            loaded.model, ids[start : start + batch_size].to(loaded.device), sae.cfg.layer, sae.cfg.hook_point
        )
        z = sae.encode(hidden.float()).cpu()
        z[:, 0] = 0  # BOS is an outlier position, not text
        codes.append(z)
    return ids, torch.cat(codes)


def top_contexts(
    tokenizer, ids: torch.Tensor, codes: torch.Tensor, feature: int, n: int, window: int = 12
) -> list[dict]:
    """The `n` corpus positions where `feature` is largest, each with its window of tokens and activations."""
    acts = codes[..., feature]
    flat = acts.flatten().topk(n)
    found = []
    for value, index in zip(flat.values.tolist(), flat.indices.tolist()):
        if value <= 0:
            break
        row, pos = divmod(index, acts.shape[1])
        lo = max(1, pos - window)
        found.append(
            {
                "tokens": [tokenizer.decode([t]) for t in ids[row, lo : pos + 3].tolist()],
                "acts": [round(a, 3) for a in acts[row, lo : pos + 3].tolist()],
                "peak": pos - lo,
                "value": round(value, 3),
            }
        )
    return found


def activation_histogram(acts: torch.Tensor, bins: int = 20) -> dict:
    """Compact histogram of a feature's nonzero activations: bin edges, counts, and how many tokens were zero."""
    nonzero = acts[acts > 0].float()
    if nonzero.numel() == 0:
        return {"bins": [], "counts": [], "zeros": int(acts.numel()), "tokens": int(acts.numel())}
    top = float(nonzero.max())
    counts = torch.histc(nonzero, bins=bins, min=0.0, max=top)
    edges = torch.linspace(0.0, top, bins + 1)
    return {
        "bins": [round(float(e), 4) for e in edges],
        "counts": [int(c) for c in counts],
        "zeros": int(acts.numel() - nonzero.numel()),
        "tokens": int(acts.numel()),
    }


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm applied before the unembedding (identity if none is found)."""
    for path in (
        "model.norm",
        "transformer.ln_f",
        "gpt_neox.final_layer_norm",
        "model.decoder.final_layer_norm",
    ):
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
        if module is not None:
            return module
    return torch.nn.Identity()


@torch.inference_mode()
def logit_lens(loaded: LoadedModel, direction: torch.Tensor, k: int = 10) -> list[str]:
    """Tokens whose logits a direction raises most, read through the final norm and unembedding."""
    logits = loaded.model.get_output_embeddings()(
        final_norm(loaded.model)(direction.to(loaded.device)[None, None])
    )[0, 0]
    return [loaded.tokenizer.decode([t]) for t in logits.topk(k).indices.tolist()]


def refusal_rate(
    loaded: LoadedModel, steering: Steering, prompts: list[str], judge: IsRefusal, config: DiscoverConfig
) -> tuple[float, list[str]]:
    """Fraction of prompts the steered model refuses, and its replies."""
    replies = generate(loaded, prompts, steering, config.max_new_tokens, config.batch_size)
    return sum(map(judge, replies)) / max(1, len(replies)), replies


def find_refusal_features(
    loaded: LoadedModel,
    sae_path: str,
    harmful: list[str],
    harmless: list[str],
    judge: IsRefusal,
    config: DiscoverConfig = DiscoverConfig(),
    progress: bool = True,
    control: dict | None = None,
) -> Discovery:
    """Rank SAE features by how they separate refusal from compliance, then screen them causally.

    `control` (a `topic_feature` result) gets the same corpus evidence (histogram, top contexts) and is
    returned as the discovery's `control`.
    """
    sae = load_sae(sae_path).to(loaded.device)
    check_sae_fits(sae, loaded)
    if not harmful or not harmless:
        raise SaesteerError("discovery needs harmful and harmless train prompts")
    steps = tqdm(total=6, desc="discover", disable=not progress)

    refused_rate, own_refusals = refusal_rate(loaded, SystemPrompt(REFUSE_ALL), harmful, judge, config)
    plain_rate, own_replies = refusal_rate(loaded, Steering(), harmful, judge, config)
    refusals = [(p, r) for p, r in zip(harmful, own_refusals) if judge(r)]
    refusals += [(p, TEMPLATED_REFUSALS[i % len(TEMPLATED_REFUSALS)]) for i, p in enumerate(harmful)]
    compliances = [(p, r) for p, r in zip(harmful, own_replies) if not judge(r) and r.strip()]
    if len(compliances) < 4:
        raise SaesteerError(
            f"only {len(compliances)} compliant replies to contrast with: the model already refuses these prompts"
        )
    steps.update()

    stats = contrast(
        reply_codes(loaded, sae, refusals, config.batch_size),
        reply_codes(loaded, sae, compliances, config.batch_size),
    )
    steps.update()
    pairs = compliances[
        : config.attribution_prompts
    ]  # toward the canonical refusal, away from the model's own reply
    attribution = refusal_attribution(
        loaded,
        sae,
        [p for p, _ in pairs],
        [TEMPLATED_REFUSALS[0]] * len(pairs),
        [r for _, r in pairs],
        config.batch_size,
    )
    steps.update()
    ids, codes = corpus_codes(loaded, sae, config.corpus_tokens, batch_size=config.batch_size)
    flat = codes[:, 1:].reshape(-1, codes.shape[-1])
    corpus_freq, corpus_max = (flat > 0).float().mean(0), flat.max(0).values
    steps.update()

    sparse = corpus_freq <= config.max_corpus_freq
    by_contrast = _top(
        stats["effect_size"], sparse & (stats["refusal_freq"] >= config.min_refusal_freq), config.n_candidates
    )
    by_attribution = _top(attribution, sparse, config.n_attribution)
    sources = {f: "contrast" for f in by_contrast}
    sources.update({f: "both" if f in sources else "attribution" for f in by_attribution})
    candidates = [
        FeatureCandidate(
            feature=f,
            source=source,
            attribution=round(float(attribution[f]), 4),
            **{k: round(float(v[f]), 4) for k, v in stats.items()},
            corpus_freq=round(float(corpus_freq[f]), 5),
            corpus_max=round(float(corpus_max[f]), 4),
            logit_lens=logit_lens(loaded, sae.W_dec[f] / sae.cfg.norm_scale),
            contexts=top_contexts(loaded.tokenizer, ids, codes, f, config.top_contexts),
            histogram=activation_histogram(flat[:, f]),
        )
        for f, source in sources.items()
    ]
    if control is not None:
        f = control["feature"]
        control = {
            **control,
            "corpus_freq": round(float(corpus_freq[f]), 5),
            "corpus_max": round(float(corpus_max[f]), 4),
            "contexts": top_contexts(loaded.tokenizer, ids, codes, f, config.top_contexts),
            "histogram": activation_histogram(flat[:, f]),
        }
    steps.update()

    screen_harmful, screen_harmless = harmful[: config.screen_prompts], harmless[: config.screen_prompts]
    base_harmful, _ = refusal_rate(loaded, Steering(), screen_harmful, judge, config)
    base_harmless, _ = refusal_rate(loaded, Steering(), screen_harmless, judge, config)
    for candidate in tqdm(candidates, desc="causal screen", disable=not progress, leave=False):
        for value in config.screen_values:
            steering = SAESteer(sae=sae_path, features=[candidate.feature], values=[value])
            unsafe, examples = refusal_rate(loaded, steering, screen_harmful, judge, config)
            safe, _ = refusal_rate(loaded, steering, screen_harmless, judge, config)
            candidate.screen.append(
                {
                    "value": value,
                    "harmful_refusal": unsafe,
                    "harmless_refusal": safe,
                    "score": (unsafe - base_harmful) - (safe - base_harmless),
                    "examples": examples[:3],
                }
            )
    candidates.sort(key=lambda c: max((s["score"] for s in c.screen), default=float("-inf")), reverse=True)
    steps.update()
    steps.close()
    return Discovery(
        sae=sae_path,
        model=loaded.spec,
        layer=sae.cfg.layer,
        candidates=[asdict(c) for c in candidates],
        config={k: v for k, v in asdict(config).items() if k not in DISCOVER_STAGE_FIELDS},
        n_harmful=len(harmful),
        n_harmless=len(harmless),
        n_refusal_replies=len(refusals),
        n_compliance_replies=len(compliances),
        baseline={
            "harmful_refusal": base_harmful,
            "harmless_refusal": base_harmless,
            "harmful_refusal_all_train": plain_rate,
            "refuse_all_prompt_refusal": refused_rate,
        },
        control=control,
    )


def _top(scores: torch.Tensor, eligible: torch.Tensor, n: int) -> list[int]:
    """The `n` highest-scoring eligible indices, best first."""
    ranking = torch.where(eligible, scores, torch.tensor(float("-inf")))
    return [int(f) for f in ranking.topk(min(n, len(ranking))).indices if ranking[f] > float("-inf")]


def topic_feature(
    loaded: LoadedModel, sae_path: str, topic: list[str], other: list[str], max_corpus_freq: float = 0.05
) -> dict:
    """The feature that best separates prompts on a topic (e.g. philosophy) from other prompts: a control."""
    sae = load_sae(sae_path).to(loaded.device)
    on, off = (_prompt_codes(loaded, sae, prompts) for prompts in (topic, other))
    stats = contrast(on, off)
    score = torch.where(
        (off > 0).float().mean(0) <= max_corpus_freq, stats["effect_size"], torch.tensor(float("-inf"))
    )
    best = int(score.argmax())
    return {
        "feature": best,
        "effect_size": round(float(stats["effect_size"][best]), 4),
        "auroc": round(float(stats["auroc"][best]), 4),
        "logit_lens": logit_lens(loaded, sae.W_dec[best] / sae.cfg.norm_scale),
        "n_topic": len(topic),
        "n_other": len(other),
    }


def _prompt_codes(loaded: LoadedModel, sae, prompts: list[str], batch_size: int = 16) -> torch.Tensor:
    """Mean SAE code over each prompt's own tokens (no chat template)."""
    rows = []
    for start in range(0, len(prompts), batch_size):
        batch = loaded.tokenizer(
            prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(loaded.device)
        z = sae.encode(
            residual_at(
                loaded.model, batch["input_ids"], sae.cfg.layer, sae.cfg.hook_point, batch["attention_mask"]
            ).float()
        )
        mask = batch["attention_mask"][..., None].to(z.dtype)
        rows.append(((z * mask).sum(1) / mask.sum(1)).cpu())
    return torch.cat(rows)


@torch.inference_mode()
def diff_in_means(
    loaded: LoadedModel,
    harmful: list[str],
    harmless: list[str],
    layer: int,
    tokens: int = 4,
    batch_size: int = 16,
) -> torch.Tensor:
    """Mean residual stream on harmful minus harmless prompts, over the last `tokens` chat-template positions."""

    def mean_activation(prompts: list[str]) -> torch.Tensor:
        rendered = chat_prompts(loaded, [[{"role": "user", "content": p}] for p in prompts])
        total = torch.zeros(loaded.d_model)
        for batch in rendered_batches(loaded, rendered, batch_size):
            hidden = residual_at(
                loaded.model, batch["input_ids"], layer, "resid_post", batch["attention_mask"]
            )
            total += hidden[:, -tokens:].float().mean(1).sum(0).cpu()
        return total / len(prompts)

    return mean_activation(harmful) - mean_activation(harmless)


@torch.inference_mode()
def threshold_for_recall(harmful_scores: torch.Tensor, recall: float) -> float:
    """The largest threshold that flags (score > threshold) at least `recall` of the harmful prompts."""
    ordered = harmful_scores.sort(descending=True).values
    needed = max(1, min(len(ordered), math.ceil(recall * len(ordered))))
    return float(ordered[needed - 1]) - 1e-6


def summary_markdown(found: Discovery) -> str:
    """A readable report of a discovery run."""
    base = found.baseline
    lines = [
        f"# Refusal feature discovery: {found.model}, layer {found.layer}",
        "",
        f"SAE `{found.sae}`; {found.n_harmful} harmful / {found.n_harmless} harmless TRAIN prompts; "
        f"{found.n_refusal_replies} refusal vs {found.n_compliance_replies} compliance replies contrasted.",
        f"Unsteered refusal on the screen prompts: harmful {base['harmful_refusal']:.0%}, harmless {base['harmless_refusal']:.0%}.",
        "",
        "| feature | proposed by | attribution | effect size | AUROC | corpus freq | best clamp | harmful refusal | harmless refusal | logit lens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in found.candidates:
        best = (
            max(c["screen"], key=lambda s: s["score"])
            if c["screen"]
            else {"value": "-", "harmful_refusal": float("nan"), "harmless_refusal": float("nan")}
        )
        lens = " ".join(f"`{t.strip() or repr(t)}`" for t in c["logit_lens"][:6])
        lines.append(
            f"| {c['feature']} | {c['source']} | {c['attribution']:.2f} | {c['effect_size']:.2f} | {c['auroc']:.2f} | {c['corpus_freq']:.4f} | {best['value']} | "
            f"{best['harmful_refusal']:.0%} | {best['harmless_refusal']:.0%} | {lens} |"
        )
    for c in found.candidates[:3]:
        lines += ["", f"## Feature {c['feature']}", "", "Top corpus contexts (peak token in **bold**):", ""]
        for ctx in c["contexts"]:
            text = "".join(
                f"**{t}**" if i == ctx["peak"] else t for i, t in enumerate(ctx["tokens"])
            ).replace("\n", " ")
            lines.append(f"- ({ctx['value']}) {text}")
        for s in c["screen"]:
            lines += [
                "",
                f"Clamped to {s['value']}: harmful refusal {s['harmful_refusal']:.0%}, harmless {s['harmless_refusal']:.0%}. Examples:",
            ]
            lines += [f"> {e.strip()[:160]}" for e in s["examples"]]
    return "\n".join(lines) + "\n"


def baseline_specs(
    loaded,
    found: Discovery,
    harmful: list[str],
    harmless: list[str],
    out: Path,
    detector_layer: int,
    recall: float,
    detector_harmless: list[str] | None = None,
) -> dict:
    """Diff-in-means directions (ActAdd at the SAE layer, harm detector at `detector_layer`, contrasted with
    `detector_harmless` if given) and ready steering specs built from the discovery, all from TRAIN
    prompts. The unconditional clamp takes the candidate with the best screen score (refusal gain minus
    over-refusal); the conditional one, whose gate keeps safe prompts unsteered, the one that refuses most."""
    loaded.check_layer(detector_layer)
    detector_harmless = detector_harmless or harmless
    actadd_path, detector_path = out / "refusal-direction.safetensors", out / "harm-detector.safetensors"
    save_direction(
        actadd_path, diff_in_means(loaded, harmful, harmless, found.layer), found.layer, loaded.spec
    )
    direction = diff_in_means(loaded, harmful, detector_harmless, detector_layer)
    save_direction(detector_path, direction, detector_layer, loaded.spec)
    probe = Detector("dim", (detector_layer,), (direction / direction.norm())[None], pooling="last", tokens=4)
    harmful_scores, harmless_scores = (
        score_prompts(loaded, probe, harmful),
        score_prompts(loaded, probe, detector_harmless),
    )
    threshold = threshold_for_recall(harmful_scores, recall)
    specs = {"actadd": {"method": "actadd", "direction": str(actadd_path), "alpha": 8.0}}
    screened = [(c, s) for c in found.candidates for s in c["screen"]]
    if screened:
        best, best_screen = max(screened, key=lambda cs: cs[1]["score"])
        strongest, strongest_screen = max(screened, key=lambda cs: (cs[1]["harmful_refusal"], cs[1]["score"]))
        specs["sae_clamp"] = {
            "method": "sae",
            "sae": found.sae,
            "features": [best["feature"]],
            "values": [best_screen["value"]],
        }
        specs["conditional_sae"] = {
            "method": "conditional",
            "detector": str(detector_path),
            "threshold": threshold,
            "steering": {
                **specs["sae_clamp"],
                "features": [strongest["feature"]],
                "values": [strongest_screen["value"]],
            },
        }
    if found.control is not None:
        specs["control_clamp"] = {
            "method": "sae",
            "sae": found.sae,
            "features": [found.control["feature"]],
            "values": [specs.get("sae_clamp", {"values": [12.0]})["values"][0]],
        }
    found.detector = {
        "layer": detector_layer,
        "threshold": threshold,
        "recall_target": recall,
        "n_negatives": len(detector_harmless),
        "harmful_flagged": float((harmful_scores > threshold).float().mean()),
        "harmless_flagged": float((harmless_scores > threshold).float().mean()),
    }
    return specs


FIT_SETS = (
    "advbench",
    "xstest_unsafe",
    "hh_rlhf_harmful",
    "written_harmful",
)  # TRAIN prompts of `saesteer fit`


def complete_refusals(loaded: LoadedModel, n: int) -> list[str]:
    """`n` refusal replies, `TEMPLATED_REFUSALS` cycled, each ending the turn (the tokenizer's end token)."""
    end = loaded.tokenizer.eos_token or ""
    return [TEMPLATED_REFUSALS[i % len(TEMPLATED_REFUSALS)] + end for i in range(n)]


def refusal_candidates(
    loaded: LoadedModel, sae, prompts: list[str], n: int, batch_size: int = 16
) -> list[int]:
    """The `n` features whose decoder directions most raise log p(complete refusal, then end of turn) on
    harmful TRAIN `prompts` (attribution toward the whole refusal, not its first words), best first."""
    attribution = refusal_attribution(
        loaded, sae, prompts, complete_refusals(loaded, len(prompts)), batch_size=batch_size
    )
    return [int(f) for f in attribution.topk(min(n, len(attribution))).indices]


def _clamped_reply_nll(
    loaded: LoadedModel,
    sae,
    layer: int,
    features: torch.Tensor,
    directions: torch.Tensor,
    values: torch.Tensor,
    decay: float,
    exchanges,
) -> torch.Tensor:
    """Mean negative log-likelihood per reply token of (prompt, reply) pairs, teacher-forced, with the
    features (ids [k], decoder rows [k, d] from `feature_directions`) clamped to `values` (differentiable) on the prompt and on reply token t scaled by decay**t,
    as `SAESteer` steers while generating."""
    batch, lengths = exchange_batch(loaded, exchanges)
    width, longest = batch["input_ids"].shape[1], max(lengths)
    starts = width - torch.tensor(lengths, device=loaded.device)
    reply_pos = torch.arange(width, device=loaded.device)[None, :] - starts[:, None]  # [B, T]; < 0: prompt
    scale = torch.where(reply_pos >= 0, decay ** reply_pos.clamp(min=0).float(), 1.0)[..., None]

    def clamp(h: torch.Tensor) -> torch.Tensor:
        return h + (scale * clamp_shift(sae, h, features, values, directions)).to(h.dtype)

    with edit_residual(loaded.model, layer, clamp, sae.cfg.hook_point or "resid_post"):
        logits = loaded.model(**batch, use_cache=False, logits_to_keep=longest + 1).logits[:, :-1].float()
    scored = reply_pos[:, -longest:] >= 0  # logits[:, t] predicts token width - longest + t
    return torch.nn.functional.cross_entropy(logits[scored], batch["input_ids"][:, -longest:][scored])


def fit_clamp_values(
    loaded: LoadedModel,
    sae,
    features: list[int],
    values: list[float],
    prompts: list[str],
    decay: float = 1.0,
    config: FitConfig = FitConfig(),
    progress: bool = True,
) -> dict:
    """Clamp values [k] for `features`, fitted from `values` so the clamped model answers harmful TRAIN
    `prompts` with a complete refusal: one of `TEMPLATED_REFUSALS` (cycled) and then its end of turn, so
    the fit also rewards stopping after the refusal instead of looping. Values stay >= 0 (latent codes are).
    Returns {"values", "losses": per-step mean NLL per reply token, "initial_loss", "final_loss"}."""
    if not features or len(features) != len(values):
        raise SaesteerError("fitting needs features and starting values of the same, non-zero length")
    if not prompts:
        raise SaesteerError("fitting needs harmful train prompts")
    ids, directions = feature_directions(sae, features, loaded.device)
    if any(v < 0 for v in values):
        raise SaesteerError(f"clamp values start >= 0 (latent codes are), not {short(values)}")
    layer = check_sae_fits(sae, loaded)
    pairs = list(zip(prompts, complete_refusals(loaded, len(prompts))))
    chunks = [pairs[start : start + config.batch_size] for start in range(0, len(pairs), config.batch_size)]
    fitted = torch.tensor(values, dtype=torch.float32, device=loaded.device, requires_grad=True)
    optimizer = torch.optim.Adam([fitted], lr=config.lr)
    losses = []
    for _ in tqdm(range(config.steps + 1), desc="fit clamp values", disable=not progress):
        optimizer.zero_grad()
        total = 0.0
        for chunk in chunks:
            loss = (
                _clamped_reply_nll(loaded, sae, layer, ids, directions, fitted, decay, chunk)
                * len(chunk)
                / len(prompts)
            )
            loss.backward()
            total += float(loss.detach())
        losses.append(round(total, 4))
        if len(losses) > config.steps:
            break  # the last pass only measures the final values
        (config.l1 * fitted.abs().sum()).backward()
        optimizer.step()
        with torch.no_grad():
            fitted.clamp_(min=0.0)
        if not torch.isfinite(fitted).all():
            raise SaesteerError(
                f"the fit diverged at step {len(losses)} (values {short(fitted.tolist())}): lower the lr"
            )
    return {
        "values": [round(float(v), 3) for v in fitted.detach()],
        "losses": losses,
        "initial_loss": losses[0],
        "final_loss": losses[-1],
    }


def fit(config: FitConfig, loaded: LoadedModel | None = None) -> dict:
    """The `saesteer fit` stage: clamp values for `config.features` (or the `config.candidates` features of
    largest attribution) fitted on harmful TRAIN prompts of `FIT_SETS`; writes steering.json (the fitted spec,
    to evaluate like any other) and fit.json to `config.out` and returns the fit's record."""
    if (not config.features) == (config.candidates == 0):
        raise SaesteerError("give either --features or --candidates")
    starts = list(config.values)
    if not starts:
        raise SaesteerError("--values is required: the starting clamp values")
    if len(starts) not in (1, len(config.features or starts)) or any(v < 0 for v in starts):
        raise SaesteerError("--values: one value >= 0 for every feature, or a single value for all")
    SAESteer(sae=config.sae, features=[0], values=starts[:1], decay=config.decay)  # fails before loading
    loaded = loaded or load_model(config.model, device=config.device)
    sae = load_sae(config.sae).to(loaded.device)
    check_sae_fits(sae, loaded)
    prompts = [p.text for name in FIT_SETS for p in safety_prompts(name, "train")[: config.limit]]
    chosen = list(config.features) or refusal_candidates(
        loaded, sae, prompts, config.candidates, config.batch_size
    )
    start = SAESteer(
        sae=config.sae,
        features=chosen,
        values=starts * len(chosen) if len(starts) == 1 else starts,
        decay=config.decay,
    )
    result = fit_clamp_values(loaded, sae, start.features, start.values, prompts, config.decay, config)
    spec = steering_from_dict({**start.to_dict(), "values": result["values"]}).to_dict()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "steering.json").write_text(json.dumps(spec, indent=1))
    record = {"start": start.to_dict(), "config": asdict(config), "n_prompts": len(prompts), **result}
    (out / "fit.json").write_text(json.dumps(record, indent=1))
    return record


def discover(config: DiscoverConfig, loaded: LoadedModel | None = None) -> Discovery:
    """The `saesteer discover` stage: refusal features of `config.sae` found and screened on TRAIN prompts
    (AdvBench harmful, XSTest-safe harmless), an unrelated control feature (MMLU philosophy), and ready steering
    specs with their directions and harm detector; writes discovery.json and discovery.md to `config.out` and
    returns the discovery. `loaded`: the model, if already loaded (else `config.model` is loaded)."""
    if config.judge not in ("strict", "string"):
        raise SaesteerError(f"unknown screen judge {short(config.judge)!r}: use strict or string")
    refusal_judge = load_judge(config.judge)
    harmful = [p.text for p in safety_prompts("advbench", "train")][: config.limit]
    harmless = [p.text for p in safety_prompts("xstest_safe", "train")]
    loaded = loaded or load_model(config.model, device=config.device)
    dev = mmlu_dev()
    philosophy = [q.question for q in dev.get("philosophy", [])]
    other = [q.question for subject, qs in sorted(dev.items()) if subject != "philosophy" for q in qs[:2]]
    control = (
        {"topic": "philosophy (MMLU dev questions)", **topic_feature(loaded, config.sae, philosophy, other)}
        if philosophy
        else None
    )
    found = find_refusal_features(
        loaded,
        config.sae,
        harmful,
        harmless,
        lambda reply: is_refusal(refusal_judge.verdict(reply)),
        config,
        control=control,
    )
    found.judge = config.judge
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    negatives = (
        harmless[: config.detector_negatives]
        + [p.text for p in safety_prompts("benign", "train")][: config.detector_negatives]
    )
    if config.alpaca_harmless:
        negatives += [p.text for p in safety_prompts("harmless", "train")][: config.alpaca_harmless]
    found.specs = baseline_specs(
        loaded, found, harmful, harmless, out, config.detector_layer, config.detector_recall, negatives
    )
    found.write(out / "discovery.json")
    (out / "discovery.md").write_text(summary_markdown(found))
    return found
