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
    import importlib
    import pkgutil

    import saesteer
    import saesteer.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was rejected")

    # Import every module first, so none binds the stand-in at import time, and patch every binding.
    real = saesteer.models.load_model
    for info in pkgutil.iter_modules(saesteer.__path__):
        if info.name == "__main__":
            continue
        try:
            module = importlib.import_module(f"saesteer.{info.name}")
        except ImportError:  # an optional extra (the server) that is not installed
            continue
        if getattr(module, "load_model", None) is real:
            monkeypatch.setattr(module, "load_model", refuse)


# ------------------------------------------------------------------------- 1. SAE cfg.json of the wrong shape


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda cfg: {**cfg, "d_in": "abc"}, "d_in must be an integer"),
        (lambda cfg: {**cfg, "d_sae": 12.5}, "n_latents must be an integer"),
        (lambda cfg: [1, 2, 3], "must hold a JSON object"),
        (lambda cfg: {**cfg, "metadata": ["not", "a", "dict"]}, "malformed cfg.json"),
    ],
)
def test_sae_cfg_of_wrong_type_is_one_line(
    monkeypatch, capsys, tmp_path, tiny_sae, no_model, change, message
):
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
    code, out = run_cli(
        monkeypatch,
        capsys,
        "steer",
        "--steering",
        spec,
        "--prompt",
        "hi",
        "--model",
        str(tiny_model_dir),
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
    )
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
    code, out = run_cli(
        monkeypatch, capsys, "train", "--config", str(binary_file), "--out", str(tmp_path / "sae")
    )
    one_error_line(code, out, "cannot read --config")


def test_train_config_not_an_object_is_one_line(monkeypatch, capsys, tmp_path):
    (tmp_path / "c.json").write_text("[1, 2]")
    code, out = run_cli(
        monkeypatch, capsys, "train", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "sae")
    )
    one_error_line(code, out, "must be a JSON object")


def test_binary_report_results_is_one_line(monkeypatch, capsys, binary_file, tmp_path):
    code, out = run_cli(
        monkeypatch, capsys, "report", "--results", str(binary_file), "--out", str(tmp_path / "r")
    )
    one_error_line(code, out, "not UTF-8 text")


def test_binary_sweep_grid_is_one_line(monkeypatch, capsys, binary_file, tmp_path, no_model):
    code, out = run_cli(
        monkeypatch, capsys, "sweep", "--grid", str(binary_file), "--out", str(tmp_path / "s.jsonl")
    )
    one_error_line(code, out, "cannot parse sweep file")


# ---------------------------------------------------------------- 8. echoed user input is cut to a prefix


def test_short_cuts_long_values():
    from saesteer.errors import short

    assert short("abc") == "abc" and short(["a"]) == "['a']"
    assert short("x" * 1000) == "x" * 60 + "..." and short("y" * 100, limit=10) == "y" * 10 + "..."


@pytest.mark.parametrize(
    "spec",
    [
        "p" * 900_000,  # an unknown preset / method name (too long to be a file name, too)
        json.dumps({"method": "m" * 900_000}),
        json.dumps({"method": "system_prompt", "k" * 900_000: 1}),
        "/nowhere/" + "d" * 900_000 + ".json",
        json.dumps({"method": "sae", "sae": "/nowhere/" + "s" * 900_000, "features": [1], "values": [1.0]}),
    ],
)
def test_huge_steering_input_is_not_echoed_whole(monkeypatch, capsys, tiny_model_dir, spec):
    code, out = run_cli(
        monkeypatch,
        capsys,
        "steer",
        "--steering",
        spec,
        "--prompt",
        "hi",
        "--model",
        str(tiny_model_dir),
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
    )
    line = one_error_line(code, out)
    assert len(line) < 600, len(line)


# ------------------------------------------------- 4. --out checked for writability before the expensive work

# verb -> (arguments besides --out, what --out must be)
OUT_VERBS = {
    "eval": ([], "file"),
    "sweep": (["--grid", "GRID"], "file"),
    "collect": ([], "dir"),
    "evaluate-sae": (["--sae", "SAE"], "file"),
    "reproduce": (["--preset", "tiny", "--shared", "SHARED"], "dir"),
    "train": (["--activations", "ACTS"], "dir"),
    "discover": (["--sae", "SAE"], "dir"),
    "gate": ([], "dir"),
    "report": (["--results", "RESULTS"], "dir"),
    "demo": ([], "dir"),
}


@pytest.fixture
def out_args(tmp_path, tiny_sae):
    (tmp_path / "shared" / "corpus").mkdir(parents=True)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "locked").mkdir()
    names = {
        "GRID": tmp_path / "grid.json",
        "SAE": tiny_sae,
        "SHARED": tmp_path / "shared",
        "ACTS": tmp_path / "acts",
        "RESULTS": tmp_path / "results.jsonl",
    }

    def args(verb, out):
        rest, _ = OUT_VERBS[verb]
        return [verb, *(str(names.get(a, a)) for a in rest), "--out", str(out)]

    return args


@pytest.mark.parametrize("verb", sorted(OUT_VERBS))
@pytest.mark.parametrize("case", ["under a file", "wrong kind", "unwritable"])
def test_out_is_checked_before_work(monkeypatch, capsys, tmp_path, out_args, no_model, verb, case):
    import os

    kind = OUT_VERBS[verb][1]
    if case == "under a file":
        out, message = tmp_path / "a-file" / "out", "cannot be created: "
    elif case == "wrong kind":
        out, message = (
            (tmp_path / "a-folder", "is a folder, not a file")
            if kind == "file"
            else (tmp_path / "a-file", "is a file, not a folder")
        )
    else:  # tests may run as root, for whom every folder is writable: emulate a read-only one
        real = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode, **kw: False if "locked" in str(p) else real(p, mode, **kw)
        )
        out, message = tmp_path / "locked" / "out", "is not writable"
    code, out_text = run_cli(monkeypatch, capsys, *out_args(verb, out))
    one_error_line(code, out_text, message)


def test_eval_replies_and_cache_are_checked(monkeypatch, capsys, tmp_path, no_model):
    (tmp_path / "a-file").write_text("x")
    code, out = run_cli(
        monkeypatch,
        capsys,
        "eval",
        "--out",
        str(tmp_path / "e.jsonl"),
        "--replies",
        str(tmp_path / "a-file" / "r"),
    )
    one_error_line(code, out, "--replies")
    code, out = run_cli(
        monkeypatch, capsys, "eval", "--out", str(tmp_path / "e.jsonl"), "--cache", str(tmp_path)
    )
    one_error_line(code, out, "--cache")


def test_writable_out_accepts_good_paths(tmp_path):
    from saesteer.cli import _writable_out

    (tmp_path / "f").write_text("x")
    for path, kind in [
        (tmp_path / "new" / "deep" / "out", "dir"),
        (tmp_path, "dir"),
        (tmp_path / "f", "file"),
        (tmp_path / "new" / "x.jsonl", "file"),
        (None, "file"),
    ]:
        _writable_out(path, kind)
    assert not (tmp_path / "new").exists()  # checking creates nothing


# -------------------------------------------------------------- 5./6. numeric options out of their range


def usage_error(code, out, option):
    """typer's own usage error: exit 2, the option named, no traceback."""
    assert code == 2, (code, out.err[-2000:])
    text = out.err + out.out
    assert "Traceback" not in text and "Invalid value" in text and option in text, text[-2000:]


@pytest.mark.parametrize(
    "args, option",
    [
        (["steer", "--steering", "none", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["steer", "--steering", "none", "--prompt", "hi", "--max-new-tokens", "-1"], "--max-new-tokens"),
        (["eval", "--batch-size", "0"], "--batch-size"),
        (["eval", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["sweep", "--grid", "g.json", "--max-new-tokens", "-5"], "--max-new-tokens"),
        (["collect", "--batch-size", "0"], "--batch-size"),
        (["collect", "--tokens", "-1"], "--tokens"),
        (["evaluate-sae", "--sae", "x", "--batch-size", "0"], "--batch-size"),
        (["discover", "--sae", "x", "--limit", "-1"], "--limit"),
        (["discover", "--sae", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["gate", "--limit", "0"], "--limit"),
        (["demo", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["serve", "--port", "80000"], "--port"),
        (["serve", "--port", "0"], "--port"),
        (["serve", "--port", "-1"], "--port"),
    ],
)
def test_out_of_range_numbers_are_usage_errors(monkeypatch, capsys, no_model, args, option):
    code, out = run_cli(monkeypatch, capsys, *args)
    usage_error(code, out, option)


def test_bad_screen_values_is_one_line(monkeypatch, capsys, tmp_path, tiny_sae, no_model):
    code, out = run_cli(
        monkeypatch,
        capsys,
        "discover",
        "--sae",
        str(tiny_sae),
        "--screen-values",
        "8,abc",
        "--out",
        str(tmp_path / "d"),
    )
    one_error_line(code, out, "bad --screen-values")


@pytest.mark.parametrize(
    "args",
    [
        ["eval", "--judge", "openai:" + "j" * 900_000],
        ["eval", "--suite", "s" * 900_000],
        ["eval", "--limit", "l" * 900_000],
        ["reproduce", "--preset", "p" * 900_000],
        ["discover", "--sae", "x", "--judge", "j" * 900_000],
        ["discover", "--sae", "x", "--screen-values", "v" * 900_000],
    ],
)
def test_huge_option_values_are_not_echoed_whole(monkeypatch, capsys, tmp_path, no_model, args):
    code, out = run_cli(monkeypatch, capsys, *args, "--out", str(tmp_path / "out"))
    line = one_error_line(code, out)
    assert len(line) < 600, len(line)


# ------------------------------------------------- the probes of issue 25 (item 7), before any model loads


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--split", "bogus"], "unknown split 'bogus'"),
        (["sweep", "--grid", "g.json", "--split", "bogus"], "unknown split 'bogus'"),
        (["collect", "--layer", "-1"], "layer must be 0 or more"),
        (["collect", "--hook-point", "bogus"], "unknown hook point 'bogus'"),
        (["demo", "--method", "bogus"], "unknown steering method 'bogus'"),
        (["fit", "--features", "1", "--values", "1", "--decay", "nan"], "bad FitConfig.decay"),
        (["eval", "--out", "/proc/saesteer-x.jsonl"], "--out /proc/saesteer-x.jsonl is not a usable path"),
        (["audit", "nothere.jsonl"], "no such file: nothere.jsonl"),
        (["serve", "--api-key", ""], "the API key is empty"),
    ],
)
def test_inputs_a_config_can_check_fail_before_the_model_loads(
    monkeypatch, capsys, no_model, tmp_path, args, message
):
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(monkeypatch, capsys, *args)
    one_error_line(code, out, message)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"k": "abc"}, "bad TrainConfig.k in --config"),
        ({"lr": [1, 2]}, "bad TrainConfig.lr in --config"),
        ({"adam_betas": [0.9, "x"]}, "bad TrainConfig.adam_betas"),
        ({"kk": 1}, "unknown TrainConfig field(s) in --config"),
        ({"adam_betas": [0.9]}, "bad TrainConfig.adam_betas"),
        ({"adam_eps": -1.0}, "adam_eps must be positive"),
    ],
)
def test_a_mistyped_config_file_is_one_line(monkeypatch, capsys, tmp_path, content, message):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(content))
    code, out = run_cli(monkeypatch, capsys, "train", "--config", str(path))
    one_error_line(code, out, message)


def test_audit_of_binary_or_list_valued_rows_is_one_line(monkeypatch, capsys, tmp_path):
    binary, lists = tmp_path / "b.jsonl", tmp_path / "l.jsonl"
    binary.write_bytes(bytes(range(128, 256)))
    lists.write_text(json.dumps({"human": ["a"], "verdict": ["x"]}) + "\n")
    one_error_line(*run_cli(monkeypatch, capsys, "audit", str(binary)), "not UTF-8 text")
    one_error_line(*run_cli(monkeypatch, capsys, "audit", str(lists)), "are text")


def test_a_port_in_use_fails_before_the_model_loads(monkeypatch, capsys, no_model):
    import socket

    pytest.importorskip("fastapi")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out = run_cli(monkeypatch, capsys, "serve", "--port", str(port))
    one_error_line(code, out, f"cannot listen on 127.0.0.1:{port}")


def test_an_sae_too_large_to_allocate_is_one_line():
    from saesteer.sae import SAEConfig, SAEError

    with pytest.raises(SAEError, match="too large to load"):
        SAEConfig(d_in=576, n_latents=10**12, k=32)


def test_an_empty_api_key_in_the_environment_fails_at_start_up(monkeypatch, capsys, no_model):
    pytest.importorskip("fastapi")
    monkeypatch.setenv("SAESTEER_API_KEY", "")
    one_error_line(*run_cli(monkeypatch, capsys, "serve"), "SAESTEER_API_KEY is set but empty")


@pytest.mark.parametrize(
    "content, args, message",
    [
        ({"eval": None}, ["--seed", "1"], "eval must be a JSON object"),
        ({"eval": 5}, [], "give a JSON object of its fields"),
        ({"eval": {"suites": ["all"]}}, [], "unknown suite 'all'"),
        ({"eval": {"limit": 0}}, [], "limit must be 1 or more"),
        ({"eval": {"attacker": "openai:x"}}, [], "bad EvalConfig.attacker"),
        ({"eval": {"limits": 5}}, [], "bad EvalConfig.limits"),
    ],
)
def test_a_config_file_s_nested_and_python_only_fields_are_one_line(
    monkeypatch, capsys, no_model, tmp_path, content, args, message
):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(content))
    one_error_line(*run_cli(monkeypatch, capsys, "eval", "--config", str(path), *args), message)


def test_fit_needs_its_values_and_train_its_two_betas(monkeypatch, capsys, no_model):
    one_error_line(*run_cli(monkeypatch, capsys, "fit", "--candidates", "4"), "--values is required")
    one_error_line(
        *run_cli(monkeypatch, capsys, "train", "--adam-betas", "0.9"), "bad TrainConfig.adam_betas"
    )
