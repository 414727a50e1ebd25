"""The `saesteer gate` stage: feature pools, probes, the guaranteed threshold and leave-one-source-out."""

from __future__ import annotations

import numpy as np
import pytest

from saesteer import detectors, gate, stats
from saesteer.errors import SaesteerError
from saesteer.gate import Candidate, GateConfig, Pool
from saesteer.models import chat_prompts
from saesteer.steering import Conditional

HARMFUL = ["the quick brown fox jumps", "quick quick fox", "brown fox over the fox", "the fox jumps quick"]


BENIGN = ["lazy dog sleeps", "the lazy dog", "sparse autoencoders steer models", "models over the lazy dog"]


@pytest.fixture(scope="module")
def tiny_pool(tiny_loaded):
    pool = gate.build_pool({"advbench": HARMFUL, "xstest_safe": BENIGN}, {"advbench"})
    keys = gate.feature_keys(
        (Candidate("probe", (1,), "user"), Candidate("ensemble", (1, 3), "last", 2)), None
    )
    gate.extract_features(tiny_loaded, pool, keys, batch_size=3)
    return pool


@pytest.mark.parametrize(
    "candidate",
    [
        Candidate("dim", (1,), "user"),
        Candidate("probe", (1,), "user", c=10.0),
        Candidate("ensemble", (1, 3), "last", 2),
    ],
)
def test_cached_feature_scores_equal_live_scores_and_survive_a_save(
    tiny_loaded, tiny_pool, tmp_path, candidate, one_thread
):
    detector = gate.fit(candidate, tiny_pool)
    cached = gate.pooled_scores(detector, tiny_pool, candidate)
    live = detectors.score_prompts(tiny_loaded, detector, HARMFUL + BENIGN, batch_size=3).numpy()
    assert np.allclose(cached, live, atol=1e-4)
    detector.save(tmp_path / "d.safetensors", "tiny", threshold=0.5)
    loaded_back = detectors.load_detector(str(tmp_path / "d.safetensors"))
    assert loaded_back.layers == candidate.layers and loaded_back.meta["threshold"] == "0.5"
    assert np.allclose(
        detectors.score_prompts(tiny_loaded, loaded_back, HARMFUL + BENIGN).numpy(), live, atol=1e-5
    )
    if candidate.kind != "dim":  # a probe separates its own training prompts
        assert cached[:4].min() > cached[4:].max()


def test_clopper_pearson_and_the_guaranteed_threshold():
    low, high = stats.clopper_pearson(0, 10)
    assert low == 0.0 and high == pytest.approx(0.3085, abs=1e-4)  # 1 - 0.025 ** (1 / 10)
    assert stats.upper_bound(0, 150) == pytest.approx(1 - 0.05 ** (1 / 150))
    scores = {"a": np.arange(150, dtype=float), "b": np.arange(300, dtype=float) / 10}
    found = gate.guaranteed_threshold(scores, max_fpr=0.05)
    for values in scores.values():
        k = int((values > found["threshold"]).sum())
        assert stats.upper_bound(k, len(values)) <= 0.05
    # one less would break the bound on the source that decides it (a: the highest scores)
    k_a = int((scores["a"] > found["threshold"]).sum())
    assert stats.upper_bound(k_a + 1, 150) > 0.05 and found["infeasible"] == []
    tiny = gate.guaranteed_threshold({"small": np.array([1.0, 2.0, 3.0])}, max_fpr=0.05)
    assert tiny["infeasible"] == ["small"] and tiny["threshold"] == 3.0


def _synthetic_pool(seed=0) -> Pool:
    """Two harmful and two benign sources in 8 dims: harm lives on dim 0; source style on dim 1 (which
    a probe must not lean on: benign source `styled` shares the harmful sources' style)."""
    rng = np.random.default_rng(seed)
    groups = {
        "advbench": (3, 2),
        "xstest_unsafe": (3, 2),
        "xstest_safe": (0, 0),
        "benign:benign_twins": (0, 2),
    }
    sources, labels, feats = [], [], []
    for name, (harm, style) in groups.items():
        x = rng.normal(size=(120, 8))
        x[:, 0] += harm
        x[:, 1] += style
        sources += [name] * 120
        labels += [int(harm > 0)] * 120
        feats.append(x)
    pool = Pool(sources, np.array(labels), [f"p{i}" for i in range(len(sources))])
    pool.features[(0, "user", 0, None)] = np.concatenate(feats).astype(np.float32)
    return pool


def test_leave_one_source_out_reports_each_left_out_source_and_the_worst_fold():
    pool = _synthetic_pool()
    config = GateConfig(candidates=(), max_fpr=0.1, folds=3)
    result = gate.leave_one_source_out(Candidate("probe", (0,), "user", c=1.0), pool, None, config)
    assert set(result["folds"]) == set(pool.sources)
    # a harmful source leaves with the benign source of its style: one detector, one threshold per pair
    pairs = {s: tuple(f["fold"]) for s, f in result["folds"].items()}
    assert pairs["advbench"] == pairs["benign:benign_twins"] == ("advbench", "benign:benign_twins")
    assert pairs["xstest_unsafe"] == pairs["xstest_safe"] == ("xstest_unsafe", "xstest_safe")
    assert result["folds"]["advbench"]["threshold"] == result["folds"]["benign:benign_twins"]["threshold"]
    assert {f["label"] for s, f in result["folds"].items() if s in ("advbench", "xstest_unsafe")} == {
        "harmful"
    }
    assert all(f["n"] == 120 for f in result["folds"].values())
    assert result["worst_recall"] == min(
        f["rate"] for f in result["folds"].values() if f["label"] == "harmful"
    )
    assert result["worst_fpr"] == max(f["rate"] for f in result["folds"].values() if f["label"] == "benign")
    assert result["worst_recall"] > 0.8  # harm on dim 0 transfers across harmful sources
    # trained on the other pair only, where style separates the classes as well as harm does: the twins fold is worst
    assert (
        result["worst_fpr_source"] == "benign:benign_twins"
        and result["worst_fpr"] > 2 * result["folds"]["xstest_safe"]["rate"]
    )


def _result(recalls, fprs):
    folds = {f"h{i}": {"label": "harmful", "rate": r} for i, r in enumerate(recalls)}
    folds.update({f"b{i}": {"label": "benign", "rate": f} for i, f in enumerate(fprs)})
    return {"folds": folds, "worst_recall": min(recalls), "worst_fpr": max(fprs)}


def test_candidates_rank_by_their_worst_fold_then_the_next_worst():
    meets = _result([0.7, 0.9], [0.03, 0.0])
    floor_but_better_next = _result([0.0, 0.6], [0.1, 0.0])
    floor = _result([0.0, 0.5], [0.1, 0.0])
    recalls_more_but_over_refuses = _result([0.95, 0.99], [0.4, 0.0])
    ranked = sorted(
        [floor, recalls_more_but_over_refuses, floor_but_better_next, meets],
        key=lambda r: gate.rank_key(r, 0.03, 0.7),
        reverse=True,
    )
    # worst successes: meets 0.7 (and meets both targets), over-refuser 0.6, the floors 0.0 (then 0.6 > 0.5)
    assert ranked == [meets, recalls_more_but_over_refuses, floor_but_better_next, floor]


def test_source_weights_give_each_class_and_source_equal_mass():
    pool = Pool(["a"] * 10 + ["b"] * 30 + ["c"] * 5, np.array([1] * 40 + [0] * 5), [""] * 45)
    weights = gate._source_weights(pool)
    assert weights[:10].sum() == pytest.approx(weights[10:40].sum()) == pytest.approx(weights[40:].sum() / 2)


def test_gate_cli_trains_validates_and_saves_a_usable_detector(
    monkeypatch, capsys, tiny_model_dir, tmp_path, one_thread
):
    import json

    from conftest import run_cli

    out = tmp_path / "gate"
    code, captured = run_cli(
        monkeypatch,
        capsys,
        "gate",
        "--model",
        str(tiny_model_dir),
        "--sae",
        "",
        "--limit",
        "6",
        "--out",
        str(out),
    )
    assert code == 0, captured.err
    summary = json.loads((out / "gate.json").read_text())
    vendored = set(gate.HARMFUL_SOURCES) | set(gate.BENIGN_SOURCES)
    assert all(set(r["folds"]) == vendored for r in summary["loso"]) and len(summary["loso"]) >= 5
    assert (
        summary["chosen"] == summary["ranking"][0]
        and "| candidate | worst recall |" in (out / "gate.md").read_text()
    )
    kinds = {r["candidate"]["kind"] for r in summary["loso"]}
    assert kinds == {"dim", "probe", "ensemble"} and all(
        max(r["candidate"]["layers"]) < 4 for r in summary["loso"]
    )  # no SAE: no sae_probe
    assert set(summary["test"]["chosen"]) >= vendored and all(
        r["n"] <= 6 for r in summary["test"]["chosen"].values()
    )
    conditional = Conditional(
        steering={"method": "none"},
        detector=str(out / "detector.safetensors"),
        threshold=summary["threshold"]["threshold"],
    )
    assert conditional.scores(*_loaded_batch(tiny_model_dir)).shape == (2,)
    code, captured = run_cli(monkeypatch, capsys, "gate", "--model", str(tiny_model_dir), "--max-fpr", "2")
    assert code == 2 and "--max-fpr" in captured.err and "Traceback" not in captured.err


def _loaded_batch(model_dir):
    from saesteer.models import load_model

    loaded = load_model(str(model_dir))
    batch = loaded.tokenizer(
        chat_prompts(loaded, [[{"role": "user", "content": t}] for t in ("hi", "lazy dog")]),
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    return loaded, batch["input_ids"], batch["attention_mask"]


def test_ship_gate_installs_the_detector_and_keeps_the_replaced_presets(tmp_path):
    import json

    dest = tmp_path / "shipped"
    dest.mkdir()
    old = {
        "method": "conditional",
        "steering": {"method": "sae", "sae": "builtin:sae", "features": [1], "values": [8.0]},
        "detector": "builtin:harm-detector.safetensors",
        "threshold": 19.5,
        "layer": None,
        "tokens": 4,
    }
    (dest / "steering.json").write_text(
        json.dumps({"presets": {"refusal": old["steering"], "refusal_conditional": old}})
    )
    (tmp_path / "d.safetensors").write_bytes(b"detector")
    new_inner = {
        "method": "sae",
        "sae": "builtin:sae",
        "features": [1],
        "values": [8.0],
        "generated_tokens": 8,
    }
    preset = gate.ship_gate(tmp_path / "d.safetensors", 3.5, dest, new_inner)
    presets = json.loads((dest / "steering.json").read_text())["presets"]
    assert (
        preset == presets["refusal_conditional"]
        and preset["threshold"] == 3.5
        and preset["steering"] == new_inner
    )
    assert presets["refusal"] == new_inner and presets["refusal_previous"] == old["steering"]
    assert (
        presets["refusal_conditional_previous"] == old
        and (dest / "harm-gate.safetensors").read_bytes() == b"detector"
    )
    gate.ship_gate(tmp_path / "d.safetensors", 4.0, dest)  # again: the first previous presets stay
    presets = json.loads((dest / "steering.json").read_text())["presets"]
    assert (
        presets["refusal_conditional_previous"] == old
        and presets["refusal_conditional"]["steering"] == new_inner
    )
    with pytest.raises(SaesteerError, match="no shipped presets"):
        gate.ship_gate(tmp_path / "d.safetensors", 1.0, tmp_path / "nowhere")


def test_sae_code_probe_scores_equal_live_scores(tiny_loaded, tiny_sae, one_thread):
    sae = str(tiny_sae)
    pool = gate.build_pool({"advbench": HARMFUL, "xstest_safe": BENIGN}, {"advbench"})
    candidate = Candidate("sae_probe", (1,), "user", c=10.0)
    gate.extract_features(tiny_loaded, pool, gate.feature_keys((candidate,), sae), batch_size=3)
    detector = gate.fit(candidate, pool, sae)
    assert detector.sae == sae and detector.weight.shape == (1, 128)
    cached = gate.pooled_scores(detector, pool, candidate, sae)
    live = detectors.score_prompts(tiny_loaded, detector, HARMFUL + BENIGN, batch_size=3).numpy()
    assert np.allclose(cached, live, atol=1e-4)
