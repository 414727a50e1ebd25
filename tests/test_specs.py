"""The torch-free spec layer: each method's label and strength, and one parse into the runnable class."""

from __future__ import annotations

import pytest

from saesteer import specs, steering
from saesteer.errors import SaesteerError

SAE = {"method": "sae", "sae": "s", "features": [5730], "values": [8.0]}
ACTADD = {"method": "actadd", "direction": "runs/refusal-direction.safetensors", "alpha": 8.0}


@pytest.mark.parametrize(
    ("spec", "label", "strength"),
    [
        ({"method": "none"}, "unsteered", None),
        ({"method": "system_prompt"}, "system prompt", None),
        (SAE, "SAE clamp f5730", "values"),
        (
            {**SAE, "decay": 0.9, "release_on": "apology", "positions": "prompt"},
            "SAE clamp f5730 (decay 0.9) (release on apology) (prompt only)",
            "values",
        ),
        ({**SAE, "mode": "add", "generated_tokens": 8}, "SAE add f5730 (first 8 tokens)", "values"),
        (ACTADD, "ActAdd (refusal-direction)", "alpha"),
        ({"method": "ablate", "direction": "d.safetensors"}, "ablate (d)", None),
        (
            {"method": "conditional", "steering": SAE, "detector": "g", "threshold": 4.5},
            "conditional SAE clamp f5730 (threshold 4.5)",
            "steering.values",
        ),
        ({"method": "reply_prefix", "stop": True}, "canned reply", None),
        ({"method": "reply_prefix"}, "reply prefix", None),
        (
            {"method": "stack", "steerings": [SAE, ACTADD]},
            "SAE clamp f5730 + ActAdd (refusal-direction)",
            None,
        ),
    ],
)
def test_each_method_names_itself_and_its_strength(spec, label, strength):
    parsed = specs.spec_from_dict(spec)
    assert parsed.label() == label and parsed.strength_path() == strength
    runnable = steering.steering_from_dict(spec)
    assert isinstance(runnable, type(parsed)) and runnable.to_dict() == parsed.to_dict()


def test_a_spec_is_parsed_once_into_runnable_parts():
    runnable = steering.steering_from_dict({"method": "conditional", "steering": SAE, "detector": "g"})
    assert type(runnable.inner) is steering.SAESteer  # the inner steering is built runnable, not as a spec
    stack = steering.steering_from_dict({"method": "stack", "steerings": [SAE, ACTADD]})
    assert [type(p) for p in stack.parts] == [steering.SAESteer, steering.ActAdd]
    assert set(steering.METHODS) == set(specs.SPECS)


def test_paths_are_replaced_in_nested_specs():
    spec = specs.spec_from_dict(
        {
            "method": "conditional",
            "steering": {"method": "stack", "steerings": [SAE, ACTADD]},
            "detector": "g",
        }
    )
    pinned = spec.with_paths(lambda path: f"/real/{path}")
    assert pinned["detector"] == "/real/g"
    assert [p.get("sae", p.get("direction")) for p in pinned["steering"]["steerings"]] == [
        "/real/s",
        "/real/runs/refusal-direction.safetensors",
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({**SAE, "release_on": "never"}, "unknown release_on"),
        ({**ACTADD, "positions": "middle"}, "unknown positions"),
        ({"method": "conditional", "steering": {"method": "system_prompt"}}, "rewrites the prompt"),
        ({"method": "stack", "steerings": []}, "one or more"),
        (
            {"method": "sae", "sae": "s", "features": [1], "values": [8.0], "extra": 1},
            "bad sae steering field extra",
        ),
    ],
)
def test_a_bad_spec_is_one_error_before_torch_is_needed(spec, message):
    with pytest.raises(SaesteerError, match=message):
        specs.spec_from_dict(spec)


def test_the_release_schedules_of_a_spec_are_the_ones_steering_can_run():
    assert set(steering.RELEASE_MARKERS) == set(specs.RELEASE_ON)
