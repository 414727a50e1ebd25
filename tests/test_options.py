"""The CLI is generated from the config tree: every field documented once, its option's default the config's,
the option names of before kept, and `--config FILE` under the options given."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import typer

from saesteer import cli, config, reproduce
from saesteer.errors import SaesteerError
from saesteer.options import build, command_line, config_from, help_of, options_of, shown
from saesteer.sae import SAEConfig

CONFIGS = [
    c for c in vars(config).values() if dataclasses.is_dataclass(c) and c.__module__ == config.__name__
]
VERB_CONFIGS = {
    "collect": config.CollectConfig,
    "train": config.TrainConfig,
    "evaluate-sae": config.SAEEvalConfig,
    "discover": config.DiscoverConfig,
    "fit": config.FitConfig,
    "gate": config.GateConfig,
    "eval": config.EvaluateConfig,
    "sweep": config.SweepConfig,
    "serve": config.ServeConfig,
    "demo": config.DemoConfig,
    "report": config.ReportConfig,
}


@pytest.mark.parametrize("cls", [*CONFIGS, SAEConfig], ids=lambda c: c.__name__)
def test_every_config_field_has_a_docstring(cls):
    for f in dataclasses.fields(cls):
        assert help_of(cls, f.name), f"{cls.__name__}.{f.name} has no docstring"


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


def test_the_option_names_of_before_the_generated_cli_are_kept():
    before = json.loads((Path(__file__).parent / "cli_options_ece2c69.json").read_text())
    now: dict[str, set] = {}
    for command, param in _options():
        now.setdefault(command, set()).update(param.opts + param.secondary_opts)
    for command, names in before.items():
        assert set(names) <= now.get(command, set()) | {"--help"}, (
            command,
            sorted(set(names) - now.get(command, set())),
        )


REQUIRED = {"sae": "x", "grid": "g.json"}


@pytest.mark.parametrize("verb", VERB_CONFIGS)
def test_no_option_given_is_the_config_default_and_the_help_shows_it(verb):
    cls = VERB_CONFIGS[verb]
    required = {o.name: REQUIRED[o.name] for o in options_of(cls) if o.required}
    assert config_from(cls, required) == dataclasses.replace(cls(), **required)
    for option in options_of(cls):
        value = cls()
        for name in option.path:
            value = getattr(value, name)
        if option.path and value not in (None, "", ()):
            assert option.help.endswith(f"(default: {shown(value)})"), (verb, option.name)


def test_options_reach_nested_fields_with_their_parents_defaults():
    sweep = config_from(
        config.SweepConfig,
        {"grid": "g", "max_new_tokens": 7, "suite": ["safety,fidelity"], "limit": "5,mmlu=0"},
    )
    assert sweep.eval.decoding.max_new_tokens == 7 and sweep.eval.decoding.batch_size == 16
    assert sweep.eval.split == "validation"  # a sweep's default split, not EvalConfig's
    assert sweep.eval.suites == ("safety", "fidelity") and (sweep.eval.limit, sweep.eval.limits) == (
        5,
        {"mmlu": 10**9},
    )
    collect = config_from(config.CollectConfig, {"passes": 2, "drop_special": False})
    assert collect.data.passes == 2 and collect.data.data == config.DEFAULT_DATA and not collect.drop_special
    fit = config_from(config.FitConfig, {"features": "3,7", "values": "1.5"})
    assert fit.features == (3, 7) and fit.values == (1.5,)


def test_a_config_file_is_under_the_options_given(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"judge": "strict", "eval": {"seed": 3, "decoding": {"batch_size": 4}}}))
    cfg = config_from(config.EvaluateConfig, {"seed": 5}, path)
    assert (cfg.judge, cfg.eval.seed, cfg.eval.decoding.batch_size, cfg.eval.split) == (
        "strict",
        5,
        4,
        "test",
    )
    path.write_text(json.dumps({"eval": {"sede": 1}}))
    with pytest.raises(SaesteerError, match="unknown EvalConfig field"):
        config_from(config.EvaluateConfig, {}, path)
    path.write_text("[1]")
    with pytest.raises(SaesteerError, match="must be a JSON object"):
        config_from(config.EvaluateConfig, {}, path)
    assert build(config.TrainConfig, {"adam_betas": [0.8, 0.9]}, "x").adam_betas == (0.8, 0.9)


def test_required_and_malformed_options_are_one_line_errors():
    with pytest.raises(SaesteerError, match="--sae is required"):
        config_from(config.DiscoverConfig, {})
    with pytest.raises(SaesteerError, match="bad --screen-values 'x'"):
        config_from(config.DiscoverConfig, {"sae": "s", "screen_values": "x"})
    with pytest.raises(SaesteerError, match="--prompts and --label go together"):
        config_from(config.EvaluateConfig, {"prompts": "p.txt"})


def _parsed(verb: str, args: list[str]) -> dict:
    """What `saesteer <verb> <args>` gives the verb: its options' values by name."""
    command = typer.main.get_command(cli.app).commands[verb]
    return command.make_context(verb, list(args)).params


STAGES = {
    "collect": "collect",
    "train": "train",
    "sae_eval": "evaluate-sae",
    "discover": "discover",
    "gate": "gate",
}


@pytest.mark.parametrize("preset", reproduce.PRESETS)
def test_a_written_command_line_runs_the_same_config(preset):
    """reproduce writes commands.sh with command_line: each must parse back to the config that ran."""
    sweep = config.SweepConfig(
        grid="g.json",
        eval=config.EvalConfig(suites=("safety", "fidelity"), split="test", limit=4, limits={"gsm8k": 10**9}),
        cache="c.jsonl",
        judge="strict",
    )
    preset_config = reproduce.PRESETS[preset]
    configs = [(verb, getattr(preset_config, field)) for field, verb in STAGES.items()]
    configs += [("sweep", sweep), ("fit", config.FitConfig(features=(3, 7), values=(1.5,)))]
    configs += [("demo", config.DemoConfig(methods=("refusal", '{"method": "prompt"}'), train_sae=True))]
    configs += [("collect", config.CollectConfig(drop_special=False))]
    for verb, cfg in configs:
        cfg = dataclasses.replace(cfg, sae="s") if getattr(cfg, "sae", None) == "" else cfg
        args = command_line(verb, cfg)
        assert args[0] == verb
        given = {k: v for k, v in _parsed(verb, args[1:]).items() if k != "config"}
        assert config_from(type(cfg), given) == cfg, (verb, args)
    assert command_line("collect", config.CollectConfig(), out="acts") == ["collect", "--out", "acts"]
