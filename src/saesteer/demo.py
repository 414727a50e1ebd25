"""`saesteer demo`: offline, on the default model and the shipped SAE, in a few minutes on 2 CPU cores.

Shows unsteered vs steered replies side by side, runs a small safety eval on TEST splits with 95% CIs
and writes the HTML report. Without shipped steering presets (another model, or a checkout without
the artefacts) it first trains a small SAE on the bundled corpus slice and discovers a refusal
feature on TRAIN prompts, with progress bars.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from saesteer.activations import CollectConfig, collect
from saesteer.artefacts import shipped_dir
from saesteer.cache import ResultCache
from saesteer.config import DemoConfig
from saesteer.evals import Decoding, EvalConfig, SteeredModel, append_rows, run_suites
from saesteer.evalsets import safety_prompts
from saesteer.features import DiscoverConfig, discover
from saesteer.models import DEFAULT_MODEL, LoadedModel, load_model
from saesteer.report import build_report, write_examples
from saesteer.steering import PRESETS, Steering, generate, parse_steering
from saesteer.trainer import TrainConfig, train

DEMO_SETS = (
    "advbench",
    "xstest_unsafe",
    "written_harmful",
    "xstest_safe",
    "written_benign",
)  # vendored: no ../shared needed


def fallback_presets(
    loaded: LoadedModel, out: Path, tokens: int, n_prompts: int
) -> tuple[dict[str, dict], Path]:
    """The pipeline's first stages in small: collect from the bundled corpus slice, train an SAE and run
    `features.discover` on TRAIN prompts; returns steering presets like the shipped ones and the discovery
    file."""
    layer = min(10, loaded.n_layers - 1)
    print(f"no shipped steering presets for {loaded.spec}: training a small SAE at layer {layer} first")
    acts, run = out / "fallback" / "acts", out / "fallback" / "sae"
    collect(CollectConfig(model=loaded.spec, layer=layer, tokens=tokens), acts, loaded=loaded)
    result = train(
        TrainConfig(
            activations=str(acts),
            out=str(run),
            expansion_factor=4,
            total_tokens=3 * tokens,
            batch_size=min(4096, tokens // 4),
            dead_tokens=tokens,
            resume=True,
        )
    )
    found = discover(
        DiscoverConfig(
            sae=str(run / "sae"),
            model=loaded.spec,
            limit=n_prompts,
            n_candidates=3,
            n_attribution=3,
            screen_prompts=min(12, n_prompts),
            screen_values=(8.0,),
            detector_layer=min(18, loaded.n_layers - 1),
            detector_negatives=n_prompts,
            judge="string",
            out=str(out / "fallback"),
        ),
        loaded,
    )
    specs, path = found.specs, out / "fallback" / "discovery.json"
    print(f"trained {result.sae.cfg.n_latents} latents; discovery in {path}")
    presets = {
        "refusal": specs.get("sae_clamp", specs["actadd"]),
        "refusal_conditional": specs.get("conditional_sae", specs["actadd"]),
    }
    return presets, path


def side_by_side(
    loaded: LoadedModel, methods: dict[str, Steering], prompts: list, max_new_tokens: int
) -> list[dict]:
    """Every prompt's reply under every method (unsteered first), as example rows for the report."""
    rows = []
    for name, steering in {"unsteered": Steering(), **methods}.items():
        replies = generate(loaded, [p.text for p in prompts], steering, max_new_tokens)
        spec = steering.to_dict()
        rows += [
            {"prompt": p.text, "label": p.label, "method": name, "steering": spec, "reply": r.strip()}
            for p, r in zip(prompts, replies)
        ]
    return rows


def print_side_by_side(rows: list[dict], width: int = 100) -> None:
    for prompt in dict.fromkeys(r["prompt"] for r in rows):
        mine = [r for r in rows if r["prompt"] == prompt]
        print(f"\n>>> [{mine[0]['label']}] {prompt}")
        for r in mine:
            reply = textwrap.shorten(r["reply"].replace("\n", " "), width) or "(empty)"
            print(f"  {r['method']:>20}: {reply}")


def run_demo(config: DemoConfig) -> tuple[Path, Path]:
    """Side-by-side replies, a small safety eval with CIs, and the HTML report; returns (html, markdown)."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    shipped = config.model == DEFAULT_MODEL and not config.train_sae and "refusal" in PRESETS

    def resolve(presets: dict[str, dict]) -> dict[str, Steering]:
        return {name: parse_steering(presets.get(name, name)) for name in config.methods}

    if shipped:  # a bad method fails before the model loads
        methods, discovery = resolve(PRESETS), shipped_dir() / "discovery.json"
    loaded = load_model(config.model, dtype=config.dtype)
    if not shipped:
        presets, discovery = fallback_presets(loaded, out, config.fallback_tokens, config.fallback_prompts)
        methods = resolve(presets)

    prompts = [  # harmful and benign, imperative and everyday (the written sets' test splits open with it)
        p
        for name in ("advbench", "written_harmful", "xstest_safe", "written_benign")
        for p in safety_prompts(name, "test")[: config.examples]
    ]
    examples = side_by_side(loaded, methods, prompts, config.max_new_tokens)
    print_side_by_side(examples)
    examples_path = write_examples(out / "examples.jsonl", examples)

    results = out / "results.jsonl"
    results.unlink(missing_ok=True)
    cache = ResultCache(out / "generations.cache.jsonl")
    for name, steering in {"unsteered": Steering(), **methods}.items():
        print(f"\nsafety eval ({name}): {config.limit} TEST prompts per set of {', '.join(DEMO_SETS)}")
        eval_config = EvalConfig(
            model=config.model,
            suites=("safety",),
            split="test",
            limit=config.limit,
            seed=config.seed,
            decoding=Decoding(config.max_new_tokens),
            safety_sets=DEMO_SETS,
        )
        run = run_suites(SteeredModel(loaded, steering, cache), eval_config)
        append_rows(results, run.rows)
        for row in run.rows:
            if row["metric"] in (
                "refusal_rate",
                "over_refusal_rate",
                "clear_refusal_rate",
                "degenerate_rate",
            ):
                c = row["config"]
                print(
                    f"  {c['dataset']:<16}{row['metric']:<20}{100 * row['value']:5.1f}%  "
                    f"[{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]  n={row['n']}"
                )
    return build_report(
        [results],
        out / "report",
        discovery=discovery if discovery.is_file() else None,
        examples=examples_path,
        title=f"saesteer demo: {loaded.spec}",
    )
