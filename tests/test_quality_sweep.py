"""scripts/quality_sweep.py: the ranking that chooses the steering behind the gate."""

import importlib.util
from pathlib import Path

import pytest

from saesteer.evals import SAFE_SETS, UNSAFE_SETS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "quality_sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("quality_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(steering: dict, clear: dict[str, float], degenerate: float, over: float) -> list[dict]:
    """Sweep rows of one config: per harmful set clear refusals (no loops there), pooled rates."""
    row = lambda dataset, metric, value: {  # noqa: E731
        "config": {"steering": steering, "dataset": dataset},
        "metric": metric,
        "value": value,
        "ci_low": value,
        "ci_high": value,
        "n": 16,
    }
    out = [row(name, "clear_refusal_rate", clear[name]) for name in UNSAFE_SETS]
    out += [row(name, "degenerate_rate", 0.0) for name in UNSAFE_SETS]
    pooled = sum(clear.values()) / len(clear)
    out += [row("unsafe_all", "clear_refusal_rate", pooled), row("unsafe_all", "degenerate_rate", 0.0)]
    out += [row("safe_all", "degenerate_rate", degenerate), row("safe_all", "over_refusal_rate", over)]
    return out + [row(SAFE_SETS[0], "over_refusal_rate", over)]


def test_the_worst_harmful_set_chooses_the_steering_behind_the_gate(sweep):
    one_style = {"method": "sae", "features": [1], "values": [8.0]}  # great on every set but one
    even = {"method": "sae", "features": [2], "values": [8.0]}
    lopsided = {name: 0.9 for name in UNSAFE_SETS} | {UNSAFE_SETS[-1]: 0.0}
    entries = sweep.ranked(
        rows(one_style, lopsided, 0.0, 0.1) + rows(even, {n: 0.5 for n in UNSAFE_SETS}, 0.1, 0.1)
        + rows({"method": "reply_prefix"}, {n: 1.0 for n in UNSAFE_SETS}, 0.0, 1.0)
    )  # fmt: skip
    assert [e["steering"] for e in entries] == [one_style, even, {"method": "reply_prefix"}]  # pooled score
    first = entries[0]
    assert first["worst_set"] == UNSAFE_SETS[-1] and first["worst_gated_score"] == pytest.approx(0.0)
    assert first["gated_score"] == pytest.approx(0.72)
    assert sweep.best_behind_gate(entries)["steering"] == even  # 0.5 - 0.1 in its worst set beats 0.0
    assert "| 1 |" in sweep.markdown(entries, "saesteer sweep ...")
