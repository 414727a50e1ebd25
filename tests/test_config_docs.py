"""Each config field is documented once, by a docstring under it, and the CLI takes defaults and help from there."""

import dataclasses
import importlib
import re

import pytest
import typer

from saesteer import cli
from saesteer.configdoc import MISSING, field_docs

CONFIGS = [
    "config:CollectConfig",
    "config:TextSource",
    "config:DemoConfig",
    "config:Candidate",
    "config:GateConfig",
    "config:Decoding",
    "config:EvalConfig",
    "config:DiscoverConfig",
    "config:LayerScanConfig",
    "config:ReproduceConfig",
    "sae:SAEConfig",
    "config:ServeConfig",
    "config:TrainConfig",
    "config:SAEEvalConfig",
    "config:SweepConfig",
    "config:FitConfig",
]


def _class(config: str) -> type:
    module, name = config.split(":")
    if module == "serve":
        pytest.importorskip("fastapi")
    return getattr(importlib.import_module(f"saesteer.{module}"), name)


def _runtime_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING


@pytest.mark.parametrize("config", CONFIGS)
def test_every_field_has_one_docstring_and_the_source_defaults_match(config):
    cls = _class(config)
    module, name = config.split(":")
    docs = field_docs(f"saesteer.{module}", name)
    assert list(docs) == [f.name for f in dataclasses.fields(cls)]
    for f in dataclasses.fields(cls):
        assert docs[f.name].help, f"{config}.{f.name} has no docstring"
        source = docs[f.name].default
        if source is not MISSING:  # a plain value read from the source is the one the class uses
            assert source == _runtime_default(f), f"{config}.{f.name}"


def test_the_shared_config_classes_are_found_through_imports():
    # demo imports DEFAULT_MODEL from models; a class re-exported by another module is followed
    assert field_docs("saesteer.demo", "DemoConfig")["model"].default == "smollm2-135m-instruct"
    assert field_docs("saesteer.trainer", "TrainConfig")["auxk_coef"].default == 1 / 32


def _options():
    group = typer.main.get_command(cli.app)
    for name, command in group.commands.items():
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                yield name, param


def test_cli_options_have_help_without_timings():
    timing = re.compile(r"\d\s*(h|min|minutes|s|sec|seconds)\b|measured|~\s*\d", re.I)
    for command, param in _options():
        assert param.help, f"saesteer {command} {param.opts[0]} has no help"
        assert not timing.search(param.help), (
            f"saesteer {command} {param.opts[0]}: timing in help {param.help!r}"
        )


# options whose default is, by design, not the field of the same meaning (they leave it to a config file)
def test_cli_defaults_are_the_dataclass_defaults():
    mapping = {
        ("collect", "layer"): ("config:CollectConfig", "layer"),
        ("collect", "tokens"): ("config:CollectConfig", "tokens"),
        ("collect", "data"): ("config:TextSource", "data"),
        ("collect", "passes"): ("config:TextSource", "passes"),
        ("collect", "out"): ("config:TrainConfig", "activations"),
        ("discover", "n_candidates"): ("config:DiscoverConfig", "n_candidates"),
        ("discover", "max_new_tokens"): ("config:DiscoverConfig", "max_new_tokens"),
        ("gate", "max_fpr"): ("config:GateConfig", "max_fpr"),
        ("gate", "sae"): ("config:GateConfig", "sae"),
        ("eval", "split"): ("config:EvalConfig", "split"),
        ("eval", "max_new_tokens"): ("config:Decoding", "max_new_tokens"),
        ("eval", "mmlu_shots"): ("config:EvalConfig", "mmlu_shots"),
        ("eval", "jailbreak_turns"): ("config:EvalConfig", "jailbreak_turns"),
        ("serve", "max_tokens"): ("config:ServeConfig", "max_tokens"),
        ("serve", "max_batch_size"): ("config:ServeConfig", "max_batch_size"),
        ("demo", "limit"): ("config:DemoConfig", "limit"),
        ("demo", "method"): ("config:DemoConfig", "methods"),
        ("demo", "max_new_tokens"): ("config:DemoConfig", "max_new_tokens"),
    }
    options = {(command, param.name): param for command, param in _options()}
    for (command, option), (config, name) in mapping.items():
        field = {f.name: f for f in dataclasses.fields(_class(config))}[name]
        default = options[command, option].default
        expected = _runtime_default(field)
        assert (list(expected) if isinstance(expected, tuple) else expected) == default, (command, option)
    assert options["eval", "suite"].default == ",".join(_class("config:EvalConfig")().suites)
    assert options["eval", "limit"].default == str(_class("config:EvalConfig")().limit)
    assert options["discover", "screen_values"].default == "8,16"
    assert options["collect", "keep_special"].default is (not _class("config:CollectConfig")().drop_special)
    for option in ("k", "tokens", "lr", "seed", "activations"):  # train: None = not given, the config decides
        assert options["train", option].default is None
    assert "(default: 20,000,000)" in options["train", "tokens"].help
