"""Property tests of the CLI's argument handling: whatever a user types for --steering, --max-new-tokens,
--limit, --batch-size or --out, `saesteer` exits 0 or 2 with at most a one-line error, never a traceback.

The verbs run until they would load a model, which is stubbed to raise a SaesteerError, so no example
loads or generates anything."""

from __future__ import annotations

import importlib
import json
import pkgutil
from contextlib import ExitStack
from unittest import mock

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import saesteer  # noqa: E402
import saesteer.models  # noqa: E402
from saesteer.cli import app  # noqa: E402
from saesteer.errors import SaesteerError  # noqa: E402

# No subnormal floats: a library loaded by other tests may set flush-to-zero, which hypothesis refuses.
FUZZ = settings(
    max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
METHODS = [
    "none",
    "system_prompt",
    "sae",
    "actadd",
    "ablate",
    "conditional",
    "reply_prefix",
    "stack",
    "refusal",
    "nope",
]
FIELDS = [
    "features",
    "values",
    "layer",
    "coef",
    "direction",
    "sae",
    "mode",
    "positions",
    "threshold",
    "prompt",
    "steerings",
    "detector",
    "steering",
    "relative",
    "max_acts",
    "decay",
    "generated_tokens",
    "text",
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_subnormal=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)
steering_specs = st.one_of(
    st.text(max_size=300),
    st.sampled_from(METHODS),
    st.builds(
        lambda method, extra: json.dumps({"method": method, **extra}),
        st.sampled_from(METHODS),
        st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4),
    ),
    json_values.map(json.dumps),
)
integers_as_text = st.one_of(st.integers(-(10**20), 10**20).map(str), st.text(max_size=12))


def _stub_model_loading(stack: ExitStack) -> None:
    """Every binding of load_model raises a SaesteerError (all modules imported first, so none binds the stub)."""
    real = saesteer.models.load_model

    def stub(*args, **kwargs):
        raise SaesteerError("model loading is stubbed in this test")

    for info in pkgutil.iter_modules(saesteer.__path__):
        if info.name == "__main__":
            continue
        try:
            module = importlib.import_module(f"saesteer.{info.name}")
        except ImportError:  # an optional extra that is not installed
            continue
        if getattr(module, "load_model", None) is real:
            stack.enter_context(mock.patch.object(module, "load_model", stub))


def invoke(args: list[str]) -> None:
    """Run `saesteer ARGS` as the console entry point would and check the outcome: exit 0, a typer usage
    error (exit 2), or a SaesteerError (which `main` prints as one line and exits 2)."""
    with ExitStack() as stack:
        _stub_model_loading(stack)
        result = CliRunner().invoke(app, args)
    if isinstance(result.exception, SaesteerError):
        message = str(result.exception)
        assert "\n" not in message and len(message) < 1000, message[:2000]
        return
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback: the test fails with it
    assert result.exit_code in (0, 2), (result.exit_code, result.output[-2000:])
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "a-file").write_text("x")
    return folder


@FUZZ
@given(steering=steering_specs, max_new_tokens=integers_as_text)
def test_steer_arguments(steering, max_new_tokens):
    invoke(["steer", "--steering", steering, "--prompt", "hi", "--max-new-tokens", max_new_tokens])


@FUZZ
@given(data=st.binary(max_size=2000), suffix=st.sampled_from([".json", ".bin", ""]))
def test_binary_steering_file(files, data, suffix):
    path = files / f"spec{suffix}"
    path.write_bytes(data)
    invoke(["steer", "--steering", str(path), "--prompt", "hi"])


@FUZZ
@given(
    steering=steering_specs,
    limit=st.one_of(integers_as_text, st.text(max_size=40)),
    batch_size=integers_as_text,
    max_new_tokens=integers_as_text,
    out=st.one_of(st.text(max_size=40), st.sampled_from(["a-file", "a-file/x", ".", ""])),
)
def test_eval_arguments(files, steering, limit, batch_size, max_new_tokens, out):
    out = str(files / out) if out in ("a-file", "a-file/x") else out
    invoke(
        [
            "eval",
            "--steering",
            steering,
            "--limit",
            limit,
            "--batch-size",
            batch_size,
            "--max-new-tokens",
            max_new_tokens,
            "--out",
            out or ".",
            "--judge",
            "string",
        ]
    )


@FUZZ
@given(limit=integers_as_text, screen_values=st.text(max_size=20))
def test_discover_arguments(files, tiny_sae, limit, screen_values):
    invoke(
        [
            "discover",
            "--sae",
            str(tiny_sae),
            "--limit",
            limit,
            "--screen-values",
            screen_values,
            "--out",
            str(files / "d"),
        ]
    )
