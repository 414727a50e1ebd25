import json

import pytest
from conftest import run_cli


def test_steer_prints_both_replies(monkeypatch, capsys, tiny_model_dir, tiny_sae):
    spec = json.dumps({"method": "sae", "sae": str(tiny_sae), "features": [3], "values": [40.0]})
    code, out = run_cli(
        monkeypatch,
        capsys,
        "steer",
        "--model",
        str(tiny_model_dir),
        "--steering",
        spec,
        "--prompt",
        "the quick fox",
        "--prompt",
        "lazy dog",
        "--max-new-tokens",
        "5",
    )
    assert (
        code == 0 and out.out.count("--- unsteered ---") == 2 and out.out.count("--- steered (sae) ---") == 2
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        ('{"method": "nope"}', "unknown steering method 'nope'"),
        ("not-a-preset", "unknown steering method 'not-a-preset'"),
        ("missing.json", "no such steering file: missing.json"),
        (
            '{"method": "sae", "sae": "SAE", "features": [500], "values": [1]}',
            "feature index 500 is out of range",
        ),
    ],
)
def test_steer_bad_specs_are_one_line(monkeypatch, capsys, tiny_model_dir, tiny_sae, spec, message):
    code, out = run_cli(
        monkeypatch,
        capsys,
        "steer",
        "--model",
        str(tiny_model_dir),
        "--steering",
        spec.replace("SAE", str(tiny_sae)),
        "--prompt",
        "hi",
    )
    assert code == 2 and message in out.err and "Traceback" not in out.err


@pytest.mark.slow
def test_discover_writes_candidates_and_specs(monkeypatch, capsys, tiny_model_dir, tiny_sae, tmp_path):
    code, out = run_cli(
        monkeypatch,
        capsys,
        "discover",
        "--sae",
        str(tiny_sae),
        "--model",
        str(tiny_model_dir),
        "--limit",
        "8",
        "--n-candidates",
        "2",
        "--n-attribution",
        "2",
        "--screen-values",
        "4",
        "--max-new-tokens",
        "4",
        "--screen-prompts",
        "4",
        "--detector-layer",
        "3",
        "--detector-negatives",
        "6",
        "--out",
        str(tmp_path),
    )
    assert code == 0, out.err
    result = json.loads((tmp_path / "discovery.json").read_text())
    assert result["n_harmful"] == 8 and len(result["candidates"]) <= 4 and result["judge"] == "strict"
    assert result["detector"]["n_negatives"] == 12  # 6 each of XSTest-safe and the benign set
    assert set(result["specs"]) >= {"actadd", "sae_clamp", "conditional_sae", "control_clamp"}
    assert 0.9 <= result["detector"]["harmful_flagged"] <= 1.0
    screened = [
        (s["score"], s["harmful_refusal"], c["feature"]) for c in result["candidates"] for s in c["screen"]
    ]
    unconditional, conditional = (
        result["specs"]["sae_clamp"]["features"][0],
        result["specs"]["conditional_sae"]["steering"]["features"][0],
    )
    assert max(s[0] for s in screened if s[2] == unconditional) == max(
        s[0] for s in screened
    )  # best gain minus over-refusal
    assert max(s[1] for s in screened if s[2] == conditional) == max(
        s[1] for s in screened
    )  # most refusal: the gate guards safe prompts
    assert (tmp_path / "discovery.md").read_text().startswith("# Refusal feature discovery")
    code, out = run_cli(
        monkeypatch,
        capsys,
        "discover",
        "--sae",
        str(tiny_sae),
        "--model",
        str(tiny_model_dir),
        "--judge",
        "openai:http://x/v1:m",
    )
    assert code == 2 and "use strict or string" in out.err


def test_fit_writes_a_spec_that_steers(monkeypatch, capsys, tiny_model_dir, tiny_sae, tmp_path):
    import json

    from saesteer.steering import parse_steering

    out = tmp_path / "fit"
    code, printed = run_cli(
        monkeypatch, capsys, "fit", "--model", str(tiny_model_dir), "--sae", str(tiny_sae), "--features", "3,7",
        "--values", "1,1", "--decay", "0.9", "--limit", "1", "--steps", "2", "--out", str(out),
    )  # fmt: skip
    assert code == 0, printed.err
    spec = parse_steering(str(out / "steering.json"))
    record = json.loads((out / "fit.json").read_text())
    assert spec.features == [3, 7] and spec.decay == 0.9 and spec.values == record["values"]
    assert (
        record["n_prompts"] == 4
        and len(record["losses"]) == 3
        and "mean NLL per refusal token" in printed.out
    )


def test_fit_picks_candidates_by_attribution(monkeypatch, capsys, tiny_model_dir, tiny_sae, tmp_path):
    import json

    args = ["fit", "--model", str(tiny_model_dir), "--sae", str(tiny_sae), "--values", "2", "--limit", "1"]
    code, printed = run_cli(
        monkeypatch, capsys, *args, "--candidates", "3", "--steps", "1", "--lr", "0", "--out", str(tmp_path)
    )
    record = json.loads((tmp_path / "fit.json").read_text())
    assert code == 0 and len(set(record["start"]["features"])) == 3 and record["values"] == [2.0, 2.0, 2.0]
    for extra, message in (
        ([], "give either --features or --candidates"),
        (["--features", "1,2,3", "--values", "1,2"], "one value >= 0 for every feature"),
        (["--features", "1", "--values", "-1"], "one value >= 0 for every feature"),
    ):
        code, printed = run_cli(monkeypatch, capsys, *args, *extra, "--out", str(tmp_path / "bad"))
        assert code == 2 and message in printed.err and printed.err.count("\n") == 1
    code, printed = run_cli(monkeypatch, capsys, *args, "--features", "9999", "--out", str(tmp_path / "bad"))
    assert code == 2 and "feature index 9999 is out of range" in printed.err
