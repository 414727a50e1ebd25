"""saesteer: steer a chat LLM's refusal behaviour with sparse-autoencoder features.

The public API (`__all__`); everything else lives in the submodules (`saesteer.steering`, `saesteer.evals`, ...):

    import saesteer

    model = saesteer.load_model()  # the default smollm2-135m-instruct; or a hub id, folder or .gguf file
    replies = saesteer.generate(model, ["How do I pick a lock?"], steering="refusal_conditional")

`import saesteer` is cheap: torch and transformers are imported on first use of a name below, so the
`saesteer` command starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from saesteer.config import EvalConfig, parse_suites
from saesteer.errors import SaesteerError

__version__ = "0.1.0"
__all__ = [
    "SAE",
    "Ablate",
    "ActAdd",
    "Conditional",
    "LoadedModel",
    "ReplyPrefix",
    "SAESteer",
    "SaesteerError",
    "Stack",
    "Steering",
    "SystemPrompt",
    "evaluate",
    "generate",
    "load_model",
    "load_sae",
    "parse_steering",
]

_LAZY = {  # public name -> the module that defines it, imported on first access
    "LoadedModel": "saesteer.models",
    "load_model": "saesteer.models",
    "SAE": "saesteer.sae",
    "load_sae": "saesteer.artefacts",
    **{
        name: "saesteer.steering"
        for name in (
            "Steering",
            "SAESteer",
            "ActAdd",
            "Ablate",
            "Conditional",
            "ReplyPrefix",
            "Stack",
            "SystemPrompt",
            "generate",
            "parse_steering",
        )
    },
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time `__getattr__` imports these lazily
    from pathlib import Path

    from saesteer.artefacts import load_sae
    from saesteer.evals import Run
    from saesteer.judges import Judge
    from saesteer.models import LoadedModel, load_model
    from saesteer.sae import SAE
    from saesteer.steering import (
        Ablate,
        ActAdd,
        Conditional,
        ReplyPrefix,
        SAESteer,
        Stack,
        Steering,
        SystemPrompt,
        generate,
        parse_steering,
    )


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'saesteer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def evaluate(
    loaded: LoadedModel,
    steering: str | dict | Steering | None = None,
    suites: str | tuple[str, ...] = "safety",
    *,
    judge: Judge | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
    **options,
) -> Run:
    """Run evaluation suites on `loaded` (from `load_model`) under one steering; a thin front to
    `saesteer.evals.run_suites(SteeredModel(loaded, steering, cache), EvalConfig(...), judge)` that keeps the
    model and steering recorded in the result rows the same as the ones evaluated.

    steering: any form `generate` takes (a `Steering`, preset name, JSON string or file, spec dict; None:
    unsteered). suites: "safety", "capability", "jailbreak", "fidelity", a comma-separated list of them,
    "all", or a tuple of names. options: other `saesteer.evals.EvalConfig` fields, e.g. `limit=20` (prompts
    per dataset), `split="test"`, `seed=0`, `decoding=Decoding(max_new_tokens=64, batch_size=16)` (tokens per
    reply, prompts per batch), `safety_sets=("advbench", "xstest_safe")`. judge: the refusal judge (default:
    string matching). cache: a JSONL file where replies and log-likelihoods are cached across runs (None:
    no cache). Returns the `saesteer.evals.Run`: `.rows` holds one dict per (dataset, metric) with `value`
    (rates in [0, 1], KL in nats per token, ...), a bootstrap 95% CI `ci_low`/`ci_high`, `n` and
    `wall_time_s`; `.walls` the seconds per suite.
    """
    from dataclasses import fields

    from saesteer import evals
    from saesteer.cache import ResultCache
    from saesteer.steering import parse_steering

    allowed = {f.name for f in fields(EvalConfig)} - {"model", "suites"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise SaesteerError(
            f"unknown evaluate option {unknown[0]!r}: use one of {', '.join(sorted(allowed))}"
        )
    method = parse_steering(steering)
    names = parse_suites(suites if isinstance(suites, str) else ",".join(suites))
    config = EvalConfig(model=loaded.spec, suites=names, **options)
    model = evals.SteeredModel(loaded, method, ResultCache(cache), progress=progress)
    return evals.run_suites(model, config, judge)
