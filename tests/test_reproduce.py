"""The reproduction pipeline: choices on validation rows, the goal check, SAE data licensing rules, and
(slow, real model) the tiny preset end to end."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest
import torch
from conftest import SHARED, needs_default_model

from saesteer import reproduce
from saesteer.config import Discovery
from saesteer.errors import SaesteerError
from saesteer.evalsets import hh_rlhf_dialogues
from saesteer.report import markdown_cell, strength

SAE = {"method": "sae", "sae": "s", "features": [7], "values": [8.0]}
CONTROL = {"method": "sae", "sae": "s", "features": [3], "values": [8.0]}
DISCOVERY = Discovery(sae="runs/x/sae", model="m", layer=6, candidates=[], control={"feature": 3})


def _row(steering: dict, suite: str, dataset: str, metric: str, value: float) -> dict:
    return {
        "config": {"steering": steering, "suite": suite, "dataset": dataset, "split": "validation"},
        "metric": metric,
        "value": value,
        "ci_low": value - 0.05,
        "ci_high": value + 0.05,
        "n": 40,
    }


def _safety(steering: dict, unsafe: float, safe: float) -> list[dict]:
    return [
        _row(steering, "safety", "unsafe_all", "refusal_rate", unsafe),
        _row(steering, "safety", "safe_all", "over_refusal_rate", safe),
    ]


def test_method_names_and_strength():
    assert DISCOVERY.role(SAE) == "sae_clamp"
    assert DISCOVERY.role(CONTROL) == "control_clamp"
    cond = {"method": "conditional", "steering": {**SAE, "values": [12.0]}, "detector": "d", "threshold": 1.0}
    assert DISCOVERY.role(cond) == "conditional_sae"
    # one strength, the report's: a conditional steering's is the clamp value it gates with, not its threshold
    assert strength(cond) == (12.0, "12")
    assert strength({"method": "actadd", "direction": "d", "alpha": 30.0}) == (30.0, "30")
    assert strength({"method": "none"}) is None


def test_choose_maximises_refusal_minus_over_refusal_and_copies_the_value_to_the_control():
    rows = (
        _safety({"method": "none"}, 0.05, 0.02)
        + _safety({**SAE, "values": [4.0]}, 0.30, 0.05)
        + _safety({**SAE, "values": [8.0]}, 0.70, 0.20)  # 0.50: best
        + _safety({**SAE, "values": [16.0]}, 0.90, 0.60)
        + _safety({**CONTROL, "values": [4.0]}, 0.10, 0.02)  # best control on its own, but not used
        + _safety({**CONTROL, "values": [8.0]}, 0.05, 0.10)
    )
    chosen = reproduce.choose(rows, DISCOVERY)
    assert chosen["sae_clamp"]["values"] == [8.0]
    assert chosen["control_clamp"]["values"] == [8.0] and chosen["control_clamp"]["features"] == [3]
    assert chosen["none"] == {"method": "none"}


def _quality(steering: dict, clear: float, degenerate: float, safe: float) -> list[dict]:
    return _safety(steering, 0.9, safe) + [
        _row(steering, "safety", "unsafe_all", "clear_refusal_rate", clear),
        _row(steering, "safety", "unsafe_all", "degenerate_rate", degenerate),
    ]


def test_choose_ranks_by_clear_refusals_minus_degeneration_and_over_refusal_and_keeps_the_schedule():
    decayed = {**SAE, "decay": 0.9}
    rows = (
        _quality(SAE, 0.30, 0.50, 0.05)  # refuses as often, but mostly by breaking down: -0.25
        + _quality(decayed, 0.40, 0.10, 0.05)  # 0.25: best
        + _quality({**decayed, "values": [16.0]}, 0.60, 0.10, 0.40)  # clear, but over-refuses: 0.10
        + _quality(CONTROL, 0.0, 0.0, 0.0)
    )
    chosen = reproduce.choose(rows, DISCOVERY)
    assert chosen["sae_clamp"] == decayed
    assert chosen["control_clamp"] == {**CONTROL, "decay": 0.9}  # the SAE clamp's value and schedule


def test_validation_grid_sweeps_the_decay_schedule_of_both_sae_clamps(tmp_path):
    from saesteer.artefacts import save_direction

    save_direction(tmp_path / "d.safetensors", torch.ones(4), layer=1, model="m")
    discovery = Discovery(
        sae="s",
        model="m",
        layer=1,
        candidates=[],
        specs={
            "actadd": {"method": "actadd", "direction": str(tmp_path / "d.safetensors"), "alpha": 1.0},
            "sae_clamp": SAE,
            "control_clamp": CONTROL,
            "conditional_sae": {"method": "conditional", "steering": SAE, "detector": "old", "threshold": 0},
        },
    )
    gate = reproduce.GateChoice("gate.safetensors", 1.5)
    config = reproduce.ReproduceConfig(clamp_values=(8.0,), actadd_multipliers=(1.0,), decays=(1.0, 0.9))
    grid = reproduce.validation_grid(discovery, gate, config)
    clamps = [g for g in grid if g["method"] == "sae" and g["features"] == [7]]
    gated = [g["steering"] for g in grid if g["method"] == "conditional"]
    assert clamps == gated == [SAE, {**SAE, "decay": 0.9}]  # the constant clamp's spec is unchanged
    assert [g for g in grid if g.get("features") == [3]] == [CONTROL]
    assert {(g["detector"], g["threshold"]) for g in grid if g["method"] == "conditional"} == {
        ("gate.safetensors", 1.5)
    }


def test_choose_breaks_ties_towards_weaker_steering():
    rows = _safety({**SAE, "values": [12.0]}, 0.5, 0.1) + _safety({**SAE, "values": [6.0]}, 0.5, 0.1)
    assert reproduce.choose(rows, DISCOVERY)["sae_clamp"]["values"] == [6.0]


def test_choose_sweeps_a_conditional_clamp_under_a_fixed_threshold():
    cond = {"method": "conditional", "steering": SAE, "detector": "d", "threshold": 2.0}
    rows = [
        r
        for value, unsafe in ((4.0, 0.3), (8.0, 0.6), (12.0, 0.6))
        for r in _safety({**cond, "steering": {**SAE, "values": [value]}}, unsafe, 0.02)
    ]
    assert reproduce.choose(rows, DISCOVERY)["conditional_sae"]["steering"]["values"] == [
        8.0
    ]  # tie with 12: the weaker


def test_results_tables_use_the_report_labels_cells_and_strength():
    cond = {"method": "conditional", "steering": SAE, "detector": "d", "threshold": 2.5}
    rows = (
        _safety({"method": "none"}, 0.05, 0.02)
        + _safety(SAE, 0.5, 0.1)
        + _safety({**SAE, "values": [12.0]}, 0.8, 0.4)
    )
    rows += _safety(cond, 0.45, 0.03) + [_row(SAE, "safety", "advbench", "refusal_rate", 0.7)]
    lines = reproduce.results_table(rows, DISCOVERY, reproduce.TEST_COLUMNS).splitlines()
    assert (
        lines[0]
        == "| method | steering | strength | unsafe refusal ↑ | over-refusal ↓ | AdvBench refusal ↑ |"
    )
    assert lines[2] == f"| none | unsteered | – | {markdown_cell(rows[0])} | {markdown_cell(rows[1])} | – |"
    assert [line.split(" | ")[:3] for line in lines[3:]] == [
        ["| sae\\_clamp", "SAE clamp f7", "8"],
        ["| sae\\_clamp", "SAE clamp f7", "12"],
        ["| conditional\\_sae", "conditional SAE clamp f7 (threshold 2.5)", "8"],
    ]
    assert "0.500 [0.450, 0.550] n=40" in lines[3]  # the report's cell: a fraction with its CI and n


def _capability(steering: dict, mmlu: float) -> list[dict]:
    return [
        _row(steering, "capability", "mmlu", "accuracy", mmlu),
        _row(steering, "safety", "xstest_safe", "over_refusal_rate", 0.02),
    ]


def test_goal_check_states_gain_over_refusal_and_capability():
    rows = (
        _safety({"method": "none"}, 0.05, 0.02)
        + _capability({"method": "none"}, 0.40)
        + _safety(SAE, 0.50, 0.03)
        + _capability(SAE, 0.395)
        + _safety(CONTROL, 0.90, 0.30)
        + _capability(CONTROL, 0.30)
    )
    table = reproduce.by_method(rows, DISCOVERY)
    lines = reproduce.goal_check(table)
    sae_line = next(line for line in lines if line.startswith("| sae_clamp"))
    control_line = next(line for line in lines if line.startswith("| control_clamp"))
    assert (
        "+45.0" in sae_line and "+1.0" in sae_line and "MMLU -0.5" in sae_line and sae_line.endswith("yes |")
    )
    assert "+28.0" in control_line and control_line.endswith("no |")  # over-refusal +28 pts, MMLU -10


def test_tradeoff_plot_is_written(tmp_path):
    cond = {"method": "conditional", "steering": SAE, "detector": "d", "threshold": 2.5}
    validation = (
        _safety({"method": "none"}, 0.05, 0.02)
        + _safety(SAE, 0.5, 0.1)
        + _safety({**SAE, "values": [12.0]}, 0.8, 0.4)
    )
    validation += _safety(cond, 0.4, 0.03) + _safety(
        {**cond, "steering": {**SAE, "values": [12.0]}}, 0.6, 0.05
    )
    reproduce.plot_tradeoff(validation, _safety(SAE, 0.45, 0.12), DISCOVERY, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sae_data_leaves_out_held_out_text_and_eval_dialogues(tmp_path):
    shared = tmp_path / "shared"
    (shared / "corpus").mkdir(parents=True)
    for name in ("books-000.jsonl", "gutenberg-001.jsonl"):
        (shared / "corpus" / name).write_text(json.dumps({"text": "some text"}) + "\n")
    held_out = {d.id for split in ("validation", "test") for d in hh_rlhf_dialogues(split)}
    (shared / "hh_rlhf_harmless/harmless-base").mkdir(parents=True)
    with gzip.open(shared / "hh_rlhf_harmless/harmless-base/test.jsonl.gz", "wt") as f:
        for i in range(40):
            f.write(json.dumps({"chosen": f"\n\nHuman: question {i}\n\nAssistant: answer {i}"}) + "\n")
    info = reproduce.build_sae_data(shared, tmp_path / "data")
    assert info["corpus_files"] == ["books-000.jsonl"]
    kept = [json.loads(line) for line in (tmp_path / "data" / "hh_rlhf_chat.jsonl").read_text().splitlines()]
    kept_ids = {int(d["messages"][0]["content"].split()[-1]) for d in kept}
    assert kept_ids == set(range(40)) - held_out and kept_ids
    refusals = (tmp_path / "data" / "advbench_train_refusals.jsonl").read_text().splitlines()
    assert json.loads(refusals[0])["messages"][1]["role"] == "assistant"
    assert not list(
        (tmp_path / "data").glob("*.json")
    )  # the summary sits beside the folder, not read as data


@pytest.mark.slow
@needs_default_model
@pytest.mark.skipif(
    not (SHARED / "corpus").is_dir(),
    reason=f"needs the SAE training corpus of the shared datasets, missing at {SHARED}/corpus",
)
def test_tiny_reproduce_end_to_end(tmp_path):
    """The whole pipeline on the real default model with tiny n: every stage runs and writes its file."""
    out = tmp_path / "repro"
    cmd = [
        sys.executable,
        "-m",
        "saesteer",
        "reproduce",
        "--preset",
        "tiny",
        "--shared",
        str(SHARED),
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in (
        "commands.sh",
        "timings.json",
        "sae-l6/metrics.json",
        "discover/discovery.json",
        "validation.jsonl",
        "chosen.json",
        "test-strict.jsonl",
        "test-string.jsonl",
        "results.md",
        "tradeoff.png",
    ):
        assert (out / name).is_file(), name
    results = (out / "results.md").read_text()
    assert "| none |" in results and "Goal check" in results and "FVU" in results
    methods = {
        json.loads(line)["config"]["steering"]["method"]
        for line in (out / "test-strict.jsonl").read_text().splitlines()
    }
    assert {"none", "system_prompt", "actadd"} <= methods
    suites = {
        json.loads(line)["config"]["suite"] for line in (out / "test-strict.jsonl").read_text().splitlines()
    }
    assert suites == {"safety", "capability", "jailbreak", "fidelity"}
    tried = [
        json.loads(line)["config"]["steering"] for line in (out / "validation.jsonl").read_text().splitlines()
    ]
    decayed = [t.get("steering", t) for t in tried if t.get("steering", t).get("decay") == 0.9]
    assert decayed and {t["method"] for t in tried if t.get("steering", t) in decayed} == {
        "sae",
        "conditional",
    }


def test_the_stages_share_one_model_load(monkeypatch):
    loads = []
    monkeypatch.setattr(reproduce, "load_model", lambda spec: loads.append(spec) or object())
    reproduce._load.cache_clear()
    try:
        assert reproduce._load("m") is reproduce._load("m") and loads == ["m"]
    finally:
        reproduce._load.cache_clear()


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '{"sae": "s", "model": "m", "layer": 6, "candidates": [], "baseline": null}',
            "baseline is not an object",
        ),
        (
            '{"sae": "s", "model": "m", "layer": 6, "candidates": [], "control": 3}',
            "control is not an object",
        ),
        ('{"sae": "s", "model": "m", "layer": "6", "candidates": []}', "layer is not an integer"),
        ('{"sae": "s", "model": "m", "candidates": []}', "no layer"),
        ("[1, 2]", "not a discovery file"),
    ],
)
def test_a_malformed_discovery_file_is_one_error(tmp_path, text, message):
    path = tmp_path / "discovery.json"
    path.write_text(text)
    with pytest.raises(SaesteerError, match=message):
        Discovery.read(path)
