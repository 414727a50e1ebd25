"""Hostile CLI input: every bad argument or file is one `saesteer: error:` line and exit code 2, never a
traceback, and (where the check can run first) before any model is loaded."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_cli


def one_error_line(code, out, message=""):
    """Exit 2, no traceback, and exactly one `saesteer: error:` line containing `message`."""
    assert code == 2, (code, out.out[-500:], out.err[-2000:])
    assert "Traceback" not in out.err and "Traceback" not in out.out
    errors = [line for line in out.err.splitlines() if line.startswith("saesteer: error:")]
    assert len(errors) == 1, out.err[-2000:]
    assert message in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command loads a model (the checks under test must come first)."""
    import saesteer.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was rejected")

    monkeypatch.setattr(saesteer.models, "load_model", refuse)


# ------------------------------------------------------------------------- 1. SAE cfg.json of the wrong shape


@pytest.mark.parametrize("change, message", [
    (lambda cfg: {**cfg, "d_in": "abc"}, "d_in must be an integer"),
    (lambda cfg: {**cfg, "d_sae": 12.5}, "n_latents must be an integer"),
    (lambda cfg: [1, 2, 3], "must hold a JSON object"),
    (lambda cfg: {**cfg, "metadata": ["not", "a", "dict"]}, "malformed cfg.json"),
])
def test_sae_cfg_of_wrong_type_is_one_line(monkeypatch, capsys, tmp_path, tiny_sae, no_model, change, message):
    sae = tmp_path / "sae"
    shutil.copytree(tiny_sae, sae)
    cfg = json.loads((sae / "cfg.json").read_text())
    (sae / "cfg.json").write_text(json.dumps(change(cfg)))
    code, out = run_cli(monkeypatch, capsys, "evaluate-sae", "--sae", str(sae))
    one_error_line(code, out, message)


def test_binary_sae_cfg_is_one_line(monkeypatch, capsys, tmp_path, tiny_sae, no_model):
    sae = tmp_path / "sae"
    shutil.copytree(tiny_sae, sae)
    (sae / "cfg.json").write_bytes(bytes(range(256)) * 4)
    code, out = run_cli(monkeypatch, capsys, "evaluate-sae", "--sae", str(sae))
    one_error_line(code, out, "cannot read SAE")


# -------------------------------------------------------------- 2. steering spec fields of the wrong type


def test_steering_features_as_string_is_one_line(monkeypatch, capsys, tiny_model_dir, tiny_sae):
    """`features: "5"` (a string, not a list): the spec is refused as it is parsed. (Covered by the typed
    validation of steering specs in steering_from_dict.)"""
    spec = json.dumps({"method": "sae", "sae": str(tiny_sae), "features": "5", "values": [8.0]})
    code, out = run_cli(monkeypatch, capsys, "steer", "--steering", spec, "--prompt", "hi", "--model", str(tiny_model_dir),
                        "--max-new-tokens", "2", "--device", "cpu")
    one_error_line(code, out, "features")


# ------------------------------------------------------------------------- 3. binary files as input files


@pytest.fixture
def binary_file(tmp_path):
    path = tmp_path / "blob.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" + bytes(range(256)) * 8)
    return path


def test_binary_steering_file_is_one_line(monkeypatch, capsys, binary_file, no_model):
    code, out = run_cli(monkeypatch, capsys, "steer", "--steering", str(binary_file), "--prompt", "hi")
    one_error_line(code, out, "cannot read steering file")


def test_binary_train_config_is_one_line(monkeypatch, capsys, binary_file, tmp_path):
    code, out = run_cli(monkeypatch, capsys, "train", "--config", str(binary_file), "--out", str(tmp_path / "sae"))
    one_error_line(code, out, "cannot read training config")


def test_train_config_not_an_object_is_one_line(monkeypatch, capsys, tmp_path):
    (tmp_path / "c.json").write_text("[1, 2]")
    code, out = run_cli(monkeypatch, capsys, "train", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "sae"))
    one_error_line(code, out, "must be a JSON object")


def test_binary_report_results_is_one_line(monkeypatch, capsys, binary_file, tmp_path):
    code, out = run_cli(monkeypatch, capsys, "report", "--results", str(binary_file), "--out", str(tmp_path / "r"))
    one_error_line(code, out, "not UTF-8 text")


def test_binary_sweep_grid_is_one_line(monkeypatch, capsys, binary_file, tmp_path, no_model):
    code, out = run_cli(monkeypatch, capsys, "sweep", "--grid", str(binary_file), "--out", str(tmp_path / "s.jsonl"))
    one_error_line(code, out, "cannot parse sweep file")


# ---------------------------------------------------------------- 8. echoed user input is cut to a prefix


def test_short_cuts_long_values():
    from saesteer.errors import short

    assert short("abc") == "abc" and short(["a"]) == "['a']"
    assert short("x" * 1000) == "x" * 60 + "..." and short("y" * 100, limit=10) == "y" * 10 + "..."


@pytest.mark.parametrize("spec", [
    "p" * 900_000,  # an unknown preset / method name (too long to be a file name, too)
    json.dumps({"method": "m" * 900_000}),
    json.dumps({"method": "system_prompt", "k" * 900_000: 1}),
    "/nowhere/" + "d" * 900_000 + ".json",
    json.dumps({"method": "sae", "sae": "/nowhere/" + "s" * 900_000, "features": [1], "values": [1.0]}),
])
def test_huge_steering_input_is_not_echoed_whole(monkeypatch, capsys, tiny_model_dir, spec):
    code, out = run_cli(monkeypatch, capsys, "steer", "--steering", spec, "--prompt", "hi", "--model", str(tiny_model_dir),
                        "--max-new-tokens", "2", "--device", "cpu")
    line = one_error_line(code, out)
    assert len(line) < 600, len(line)
