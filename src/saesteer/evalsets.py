"""Evaluation sets with fixed, documented train/validation/test splits.

Vendored sets (permissive licences, `assets/evals/`, attribution in its SOURCE.md) always work;
non-vendorable sets (`harmless`: CC BY-NC Alpaca prompts, `harmful_mix`: MaliciousInstruct + TDC2023)
are read from `../shared/datasets` (or `$SAESTEER_SHARED_DATA`) at run time.

Splits never change between runs or machines. Unless a set ships its own splits, each item goes to a
split by its rank in sha256(f"{SPLIT_SEED}:{text}") order within its group (XSTest type, source,
...): the first 40% of a group is train, the next 20% validation, the last 40% test. Items of
refusal_direction's `harmful_train` (used for feature discovery) are pinned to train. Feature
discovery and clamp choice use train/validation only; reports use test.

| set | label | splits |
|---|---|---|
| advbench | unsafe | 40/20/40 by hash; the 117 behaviours in refusal_direction harmful_train pinned to train |
| harmful_mix | unsafe | MaliciousInstruct + TDC2023 (shared only), 40/20/40 by hash per source; harmful_train pinned |
| xstest_unsafe, xstest_safe | unsafe / safe | 40/20/40 by hash within each of the 18 XSTest types |
| harmless | safe | refusal_direction's own harmless_train / harmless_val / harmless_test (shared only; CC BY-NC, optional) |
| benign | safe | the shippable benign set: TruthfulQA, MMLU and GSM8K questions, requests the project wrote and benign twins of harmful train prompts; 40/20/40 by hash per source (`category`) |
| hh_rlhf_harmful, hh_rlhf_benign | unsafe / safe | first human turns of hh-rlhf red-team dialogues that the project labelled harmful / benign; split with their dialogue (as `hh_rlhf`) |
| written_harmful, written_benign | unsafe / safe | the project's own harmful requests and their benign twins, in three styles (`category`: everyday, framed, imperative); 40/20/40 by hash of the harmful side per style, so a pair shares its split |
| mmlu | - | validation = official val (10 per subject), test = official test (25 per subject, seeded); few-shot from dev |
| truthfulqa | - | classic v1 (817 questions): 30% validation / 70% test by hash (no train split) |
| gsm8k | - | validation = 200 seeded official-train problems, test = official test (1319) (no train split) |
| hh_rlhf | - | harmless-base test dialogues with >= 2 human turns (1650), 40/20/40 by hash |
| heldout_text | - | 80 public-domain book chunks not in the collect default slice (no splits) |
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TypeVar

from saesteer.config import SPLITS
from saesteer.errors import SaesteerError, short

SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.4, 0.2, 0.4)
LABELS = ("unsafe", "safe")
SAFETY_SETS = {
    "advbench": "unsafe",
    "harmful_mix": "unsafe",
    "xstest_unsafe": "unsafe",
    "hh_rlhf_harmful": "unsafe",
    "written_harmful": "unsafe",
    "xstest_safe": "safe",
    "benign": "safe",
    "hh_rlhf_benign": "safe",
    "written_benign": "safe",
    "harmless": "safe",
}
SHARED_ONLY = ("harmful_mix", "harmless")
PROMPT_COLUMNS = ("prompt", "goal", "instruction", "text", "question", "behavior", "query")
T = TypeVar("T")


@dataclass(frozen=True)
class Prompt:
    """A single-turn request to the model with its safety label."""

    text: str
    label: str
    dataset: str
    category: str = ""


@dataclass(frozen=True)
class MultipleChoice:
    """An MMLU question: four choices, `answer` is the index of the correct one."""

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str


@dataclass(frozen=True)
class TruthfulQAItem:
    """A TruthfulQA question with its MC1 (one true answer) and MC2 (several true) answer sets."""

    question: str
    mc1: tuple[tuple[str, int], ...]
    mc2: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class MathProblem:
    """A GSM8K problem; `answer` is the final number as written after '####'."""

    question: str
    answer: str


@dataclass(frozen=True)
class Dialogue:
    """The human turns of a multi-turn red-team conversation."""

    id: int
    human_turns: tuple[str, ...]


def shared_dir() -> Path:
    """Where the non-vendorable data sets live: $SAESTEER_SHARED_DATA, else ../shared/datasets of the repo."""
    env = os.environ.get("SAESTEER_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "datasets"


def shared_available(dataset: str) -> bool:
    return (shared_dir() / "refusal_direction").is_dir() if dataset in SHARED_ONLY else True


def _asset(name: str) -> list[dict]:
    with gzip.open(str(files("saesteer") / "assets" / "evals" / name), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _shared_json(relative: str, dataset: str) -> list[dict]:
    path = shared_dir() / relative
    if not path.is_file():
        raise SaesteerError(
            f"{dataset} is not vendored (licence) and {path} is missing: "
            "point $SAESTEER_SHARED_DATA at the shared datasets folder"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _check_split(split: str, allowed: Iterable[str] = SPLITS) -> str:
    allowed = tuple(allowed)
    if split not in allowed:
        raise SaesteerError(f"unknown split {short(split)!r}: use one of {', '.join(allowed)}")
    return split


def _hash_rank(text: str) -> str:
    return hashlib.sha256(f"{SPLIT_SEED}:{text}".encode()).hexdigest()


def split_items(
    items: list[T],
    split: str,
    text: Callable[[T], str],
    group: Callable[[T], str] = lambda _: "",
    pinned_train: Callable[[T], bool] = lambda _: False,
    fractions: tuple[float, float, float] = SPLIT_FRACTIONS,
) -> list[T]:
    """The items of `split`: hash-ranked within each group and cut by `fractions`; pinned items are train."""
    index = SPLITS.index(_check_split(split))
    groups: dict[str, list[T]] = defaultdict(list)
    for item in items:
        if not pinned_train(item):
            groups[group(item)].append(item)
    chosen = [item for item in items if pinned_train(item)] if split == "train" else []
    for name in sorted(groups):
        ranked = sorted(groups[name], key=lambda item: _hash_rank(text(item)))
        cuts = [
            0,
            round(len(ranked) * fractions[0]),
            round(len(ranked) * (fractions[0] + fractions[1])),
            len(ranked),
        ]
        chosen.extend(ranked[cuts[index] : cuts[index + 1]])
    return chosen


def _harmful_train() -> set[str]:
    return {
        d["instruction"]
        for d in _shared_json("refusal_direction/dataset/splits/harmful_train.json", "harmful_mix")
    }


def safety_prompts(dataset: str, split: str = "test") -> list[Prompt]:
    """The prompts of one safety set (see the module table) in one split."""
    _check_split(split)
    if dataset == "advbench":
        rows = _asset("advbench.jsonl.gz")
        chosen = split_items(
            rows, split, lambda r: r["prompt"], pinned_train=lambda r: r["in_refusal_direction_train"]
        )
        return [Prompt(r["prompt"], "unsafe", dataset) for r in chosen]
    if dataset in ("xstest_unsafe", "xstest_safe"):
        label = SAFETY_SETS[dataset]
        rows = [r for r in _asset("xstest.jsonl.gz") if r["label"] == label]
        return [
            Prompt(r["prompt"], label, dataset, r["type"])
            for r in split_items(rows, split, lambda r: r["prompt"], group=lambda r: r["type"])
        ]
    if dataset == "harmful_mix":
        train = _harmful_train()
        rows = [
            (d["instruction"], source)
            for source in ("malicious_instruct", "tdc2023")
            for d in _shared_json(f"refusal_direction/dataset/processed/{source}.json", dataset)
        ]
        chosen = split_items(
            rows, split, lambda r: r[0], group=lambda r: r[1], pinned_train=lambda r: r[0] in train
        )
        return [Prompt(text, "unsafe", dataset, source) for text, source in chosen]
    if dataset == "benign":
        chosen = split_items(
            _asset("benign.jsonl.gz"), split, lambda r: r["prompt"], group=lambda r: r["source"]
        )
        return [Prompt(r["prompt"], "safe", dataset, r["source"]) for r in chosen]
    if dataset in ("hh_rlhf_harmful", "hh_rlhf_benign"):
        wanted, label = ("harmful", "unsafe") if dataset == "hh_rlhf_harmful" else ("benign", "safe")
        chosen = split_items(
            _asset("hh_rlhf_dialogues.jsonl.gz"), split, lambda r: "\n".join(r["human_turns"])
        )
        return [
            Prompt(r["human_turns"][0], label, dataset) for r in chosen if r["first_turn_label"] == wanted
        ]
    if dataset in ("written_harmful", "written_benign"):
        side, label = ("harmful", "unsafe") if dataset == "written_harmful" else ("benign", "safe")
        chosen = split_items(
            _asset("written_pairs.jsonl.gz"), split, lambda r: r["harmful"], group=lambda r: r["style"]
        )
        return [Prompt(r[side], label, dataset, r["style"]) for r in chosen]
    if dataset == "harmless":
        name = {"train": "harmless_train", "validation": "harmless_val", "test": "harmless_test"}[split]
        return [
            Prompt(d["instruction"], "safe", dataset)
            for d in _shared_json(f"refusal_direction/dataset/splits/{name}.json", dataset)
        ]
    raise SaesteerError(f"unknown safety set {short(dataset)!r}: use one of {', '.join(SAFETY_SETS)}")


def mmlu(split: str = "test") -> list[MultipleChoice]:
    """MMLU questions: validation = official val subset, test = official test subset."""
    _check_split(split, ("validation", "test"))
    return [
        MultipleChoice(r["question"], tuple(r["choices"]), r["answer"], r["subject"])
        for r in _asset(f"mmlu_{split}.jsonl.gz")
    ]


def mmlu_dev() -> dict[str, list[MultipleChoice]]:
    """The 5 official dev questions per subject, the source of few-shot examples."""
    by_subject: dict[str, list[MultipleChoice]] = defaultdict(list)
    for r in _asset("mmlu_dev.jsonl.gz"):
        by_subject[r["subject"]].append(
            MultipleChoice(r["question"], tuple(r["choices"]), r["answer"], r["subject"])
        )
    return dict(by_subject)


def truthfulqa(split: str = "test") -> list[TruthfulQAItem]:
    """TruthfulQA (classic v1) MC1/MC2 questions."""
    _check_split(split, ("validation", "test"))
    rows = split_items(
        _asset("truthfulqa_mc.jsonl.gz"), split, lambda r: r["question"], fractions=(0.0, 0.3, 0.7)
    )
    return [
        TruthfulQAItem(r["question"], tuple(r["mc1_targets"].items()), tuple(r["mc2_targets"].items()))
        for r in rows
    ]


def gsm8k_final_answer(solution: str) -> str:
    """The number after '####' in a GSM8K solution, without thousands separators."""
    if "####" not in solution:
        raise SaesteerError(f"GSM8K solution without '####': {solution[:60]!r}")
    return solution.split("####")[-1].strip().replace(",", "")


def gsm8k(split: str = "test") -> list[MathProblem]:
    """GSM8K problems: validation = 200 seeded official-train problems, test = official test."""
    _check_split(split, ("validation", "test"))
    return [
        MathProblem(r["question"], gsm8k_final_answer(r["answer"])) for r in _asset(f"gsm8k_{split}.jsonl.gz")
    ]


def hh_rlhf_dialogues(split: str = "test") -> list[Dialogue]:
    """Multi-turn red-team dialogues (human turns only) from Anthropic HH-RLHF harmless-base test."""
    rows = split_items(_asset("hh_rlhf_dialogues.jsonl.gz"), split, lambda r: "\n".join(r["human_turns"]))
    return [Dialogue(r["id"], tuple(r["human_turns"])) for r in rows]


def heldout_text() -> list[str]:
    """Public-domain book chunks held out from the default collect slice, for perplexity and KL."""
    return [r["text"] for r in _asset("heldout_text.jsonl.gz")]


def subsample(items: list[T], limit: int | None, seed: int) -> list[T]:
    """At most `limit` items: the first `limit` of a seeded shuffle, kept in their original order, so a
    smaller limit is a subset of a larger one (all items, in order, when no limit)."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise SaesteerError(f"--limit must be at least 1, got {limit}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:limit])]


def _pick_column(columns: list[str], wanted: str | None, path: Path) -> str:
    lower = {c.strip().lower(): c for c in columns}
    if wanted is not None:
        if wanted.strip().lower() not in lower:
            raise SaesteerError(f"{path} has no column {short(wanted)!r}; columns: {', '.join(columns)}")
        return lower[wanted.strip().lower()]
    for name in PROMPT_COLUMNS:
        if name in lower:
            return lower[name]
    raise SaesteerError(
        f"{path}: no prompt column found (tried {', '.join(PROMPT_COLUMNS)}); pass --column; "
        f"columns: {', '.join(columns)}"
    )


def load_prompt_file(path: str | Path, label: str, column: str | None = None) -> list[Prompt]:
    """User prompts from .txt (one per line), .csv (header row) or .jsonl (objects or strings)."""
    path = Path(path)
    if label not in LABELS:
        raise SaesteerError(f"unknown label {short(label)!r}: use unsafe or safe")
    if not path.is_file():
        raise SaesteerError(f"no such prompts file: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise SaesteerError(f"cannot read {path}: not UTF-8 text") from None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines()]
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames:
            raise SaesteerError(f"{path} is empty")
        key = _pick_column(list(reader.fieldnames), column, path)
        prompts = [(row.get(key) or "").strip() for row in reader]
    elif suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise SaesteerError(f"{path} line {number} is not valid JSON") from None
        objects = [r for r in records if isinstance(r, dict)]
        key = _pick_column(sorted({k for r in objects for k in r}), column, path) if objects else None
        prompts = [r if isinstance(r, str) else str(r.get(key) or "") for r in records]
        prompts = [p.strip() for p in prompts]
    else:
        raise SaesteerError(f"cannot read prompts from {path}: use .txt, .csv or .jsonl")
    prompts = [p for p in prompts if p]
    if not prompts:
        raise SaesteerError(f"no prompts found in {path}")
    return [Prompt(p, label, f"user:{path.name}") for p in prompts]
