"""The public API (`import saesteer`): its names, `generate` in every input form against the direct path,
`evaluate`, and the README's Python example run as written."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import needs_default_model

import saesteer
from saesteer import evals
from saesteer.artefacts import save_direction
from saesteer.evalsets import Prompt
from saesteer.models import chat_prompts, reference_generate
from saesteer.steering import ActAdd, Stack, Steering, SystemPrompt, parse_steering

README = Path(__file__).resolve().parents[1] / "README.md"
QUESTIONS = ["Write a haiku about tea.", "How do I pick a lock?", "Hi"]


def readme_example() -> str:
    """The README's Python example: the first ```python block that imports saesteer."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    found = [b for b in blocks if b.startswith("import saesteer\n")]
    assert found, "README.md has no ```python block starting with `import saesteer`"
    return found[0]


def readme_prompts(code: str) -> list[str]:
    """The `prompts = [...]` list the README's example assigns."""
    assigns = [
        s
        for s in ast.parse(code).body
        if isinstance(s, ast.Assign) and ast.unparse(s.targets[0]) == "prompts"
    ]
    assert len(assigns) == 1, "the README's example must assign `prompts` once"
    return ast.literal_eval(assigns[0].value)


def direct(loaded, steering: Steering, conversations, max_new_tokens: int) -> list[str]:
    """The pattern `saesteer.generate` replaces, written out."""
    with steering.applied(loaded):
        return reference_generate(
            loaded, chat_prompts(loaded, [steering.prepare(c) for c in conversations]), max_new_tokens
        )


@pytest.fixture(scope="module")
def direction(tmp_path_factory, tiny_loaded) -> str:
    """A random unit direction for the tiny Llama's layer 1."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("direction") / "direction.safetensors"
    save_direction(path, torch.randn(tiny_loaded.d_model), 1, tiny_loaded.spec)
    return str(path)


def test_all_names_import_from_their_modules():
    from saesteer import artefacts, errors, models, sae, steering

    namespace = {}
    exec("from saesteer import *", namespace)
    assert set(saesteer.__all__) <= set(namespace)
    assert saesteer.load_model is models.load_model and saesteer.LoadedModel is models.LoadedModel
    assert saesteer.generate is steering.generate and saesteer.load_sae is artefacts.load_sae
    assert saesteer.parse_steering is steering.parse_steering and saesteer.Steering is steering.Steering
    assert saesteer.SaesteerError is errors.SaesteerError and saesteer.SAE is sae.SAE
    assert saesteer.Conditional is steering.Conditional and saesteer.SAESteer is steering.SAESteer
    assert callable(saesteer.evaluate) and set(saesteer.__all__) <= set(dir(saesteer))
    with pytest.raises(AttributeError):
        saesteer.no_such_name  # noqa: B018


def test_import_and_cli_do_not_load_torch():
    code = "import sys, saesteer, saesteer.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_generate_takes_every_steering_form(tiny_loaded, direction, tmp_path, one_thread):
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    spec = {"method": "actadd", "direction": direction, "alpha": 50.0, "layer": 1}
    expected = direct(
        tiny_loaded, ActAdd(**{k: v for k, v in spec.items() if k != "method"}), conversations, 8
    )
    assert expected != direct(tiny_loaded, Steering(), conversations, 8)  # the edit matters
    file = tmp_path / "spec.json"
    file.write_text(json.dumps(spec))
    for form in (spec, json.dumps(spec), str(file), parse_steering(spec)):
        assert saesteer.generate(tiny_loaded, QUESTIONS, form, max_new_tokens=8) == expected
    for form in (None, "", "none", {"method": "none"}):
        assert saesteer.generate(tiny_loaded, QUESTIONS, form, max_new_tokens=8) == direct(
            tiny_loaded, Steering(), conversations, 8
        )
    assert saesteer.generate(tiny_loaded, QUESTIONS, "system_prompt", max_new_tokens=8) == direct(
        tiny_loaded, SystemPrompt(), conversations, 8
    )
    both = Stack(steerings=[{"method": "system_prompt"}, spec])  # a prompt rewrite and an edit at once
    assert saesteer.generate(tiny_loaded, QUESTIONS, both.to_dict(), max_new_tokens=8) == direct(
        tiny_loaded, both, conversations, 8
    )


def test_generate_takes_strings_and_conversations(tiny_loaded, direction, one_thread):
    steering = ActAdd(direction=direction, alpha=50.0, layer=1)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How do I pick a lock?"},
    ]
    mixed = ["Write a haiku about tea.", chat, tuple(chat)]
    expected = direct(tiny_loaded, steering, [[{"role": "user", "content": mixed[0]}], chat, chat], 8)
    assert saesteer.generate(tiny_loaded, mixed, steering, max_new_tokens=8) == expected
    assert (
        saesteer.generate(tiny_loaded, "Write a haiku about tea.", steering, max_new_tokens=8) == expected[0]
    )
    assert saesteer.generate(tiny_loaded, [], steering) == []
    with pytest.raises(saesteer.SaesteerError, match=r"wrap its messages in a list"):
        saesteer.generate(tiny_loaded, chat, steering)
    with pytest.raises(saesteer.SaesteerError, match="a steering is"):
        saesteer.generate(tiny_loaded, QUESTIONS, 3.5)


def test_generate_default_length_and_stop(tiny_loaded, one_thread):
    rendered = chat_prompts(tiny_loaded, [[{"role": "user", "content": q}] for q in QUESTIONS])
    assert saesteer.generate(tiny_loaded, QUESTIONS) == reference_generate(tiny_loaded, rendered, 64)
    stopped = reference_generate(tiny_loaded, rendered, 16, batch_size=2, stop=["e"])
    assert saesteer.generate(tiny_loaded, QUESTIONS, max_new_tokens=16, batch_size=2, stop=["e"]) == stopped


def test_callers_keep_their_replies(tiny_loaded, direction, one_thread):
    """The call sites that now go through `generate` (reproduce, features, demo) reply as the direct path did."""
    from saesteer.demo import side_by_side
    from saesteer.features import DiscoverConfig, refusal_rate
    from saesteer.reproduce import refusal_share

    steering = ActAdd(direction=direction, alpha=50.0, layer=1)
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    assert refusal_share(tiny_loaded, steering, QUESTIONS, 8)[1] == direct(
        tiny_loaded, steering, conversations, 8
    )
    config = DiscoverConfig(max_new_tokens=6, batch_size=2)
    with steering.applied(tiny_loaded):
        by_two = reference_generate(tiny_loaded, chat_prompts(tiny_loaded, conversations), 6, 2)
    assert refusal_rate(tiny_loaded, steering, QUESTIONS, lambda r: False, config)[1] == by_two
    prompts = [Prompt(q, "safe", "test") for q in QUESTIONS]
    rows = side_by_side(tiny_loaded, {"actadd": steering}, prompts, 8)
    assert [r["reply"] for r in rows if r["method"] == "actadd"] == [
        r.strip() for r in direct(tiny_loaded, steering, conversations, 8)
    ]


def test_evaluate_matches_the_evals_path(tiny_loaded, one_thread):
    prompts = [Prompt(q, "unsafe", "mine") for q in QUESTIONS]
    options = dict(
        limit=None,
        user_prompts=prompts,
        decoding=evals.Decoding(max_new_tokens=6, batch_size=4),
        bootstrap=50,
    )
    run = saesteer.evaluate(tiny_loaded, "system_prompt", "safety", progress=False, **options)
    config = evals.EvalConfig(model=tiny_loaded.spec, suites=("safety",), **options)
    expected = evals.run_suites(evals.SteeredModel(tiny_loaded, SystemPrompt(), progress=False), config)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rows]

    assert run.rows and strip(run.rows) == strip(expected.rows)
    assert (
        run.rows[0]["config"]["model"] == tiny_loaded.spec
        and run.rows[0]["config"]["steering"]["method"] == "system_prompt"
    )
    assert [r["n"] for r in run.rows] == [len(QUESTIONS)] * len(run.rows)
    with pytest.raises(saesteer.SaesteerError, match="unknown evaluate option 'limt'"):
        saesteer.evaluate(tiny_loaded, None, limt=3)
    with pytest.raises(saesteer.SaesteerError, match="unknown suite"):
        saesteer.evaluate(tiny_loaded, None, ("safety", "speed"))


def test_readme_example_runs_on_the_tiny_model(tiny_model_dir, direction, monkeypatch, capsys, one_thread):
    """The README's example as written, with two documented substitutions: the model spec becomes the tiny
    test model's folder, and the `refusal_conditional` preset (made for the default model's width and
    layers) becomes a conditional ActAdd for the tiny model. The real-model run is the slow test below."""
    from saesteer import steering

    code = readme_example()
    assert len(ast.parse(code).body) <= 5 and code.count("saesteer.load_model()") == 1
    code = code.replace("saesteer.load_model()", f"saesteer.load_model({str(tiny_model_dir)!r})")
    tiny_preset = {
        "method": "conditional",
        "steering": {"method": "actadd", "direction": direction, "alpha": 50.0},
        "detector": direction,
        "threshold": -1e9,
        "layer": 1,
    }
    monkeypatch.setitem(steering.PRESETS, "refusal_conditional", tiny_preset)
    exec(compile(code, str(README), "exec"), {})
    printed = capsys.readouterr().out

    loaded = saesteer.load_model(str(tiny_model_dir))
    conversations = [[{"role": "user", "content": q}] for q in readme_prompts(code)]
    replies = direct(loaded, steering.steering_from_dict(tiny_preset), conversations, 40)
    assert printed == "".join(r.strip() + "\n" for r in replies)


@pytest.mark.slow
@needs_default_model
def test_readme_example_runs_on_the_default_model(capsys):
    """The README's example as written: the shipped conditional preset refuses the harmful prompt and
    leaves the haiku as unsteered."""
    code = readme_example()
    exec(compile(code, str(README), "exec"), {})
    printed = capsys.readouterr().out
    prompts = readme_prompts(code)
    loaded = saesteer.load_model()
    plain = direct(loaded, Steering(), [[{"role": "user", "content": q}] for q in prompts], 40)
    assert printed.startswith("I'm sorry") and printed.endswith("\n" + plain[1].strip() + "\n")
