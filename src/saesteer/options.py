"""The command line, generated from the config tree (`saesteer.config`).

`command(app, Config)` registers a verb whose options are the fields of `Config`: each field becomes an option
named after it (`max_new_tokens` -> `--max-new-tokens`), its help the docstring under the field, ending
with the config's default. A nested config's fields are flattened into its parent's.
Fields that are not plain values (a chat backend, prompt lists, detector recipes, per-dataset dicts) stay
Python-only, except those that `CUSTOM` reads from options of another form (`--limit 50,mmlu=100`,
`--prompts FILE --label unsafe`). Every such verb also takes `--config FILE`, a JSON object of the config's
fields, which the options given override. An option not given is None: the file, then the config, decide.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

import typer

from saesteer.config import EvalConfig, parse_limits, parse_suites
from saesteer.errors import SaesteerError, short
from saesteer.evalsets import load_prompt_file

# Options spelled otherwise than their field (the names the CLI had before it was generated).
FLAGS = {
    "total_tokens": "--tokens",
    "allow_dirs": "--allow-dir",
    "methods": "--method",
    "drop_special": "--drop-special/--keep-special",
}
# Bounds checked as options are read, by field name (a name means the same in every config).
_AT_LEAST_1 = (
    "tokens",
    "total_tokens",
    "passes",
    "batch_size",
    "contexts_per_shard",
    "contexts",
    "attribution_prompts",
    "screen_prompts",
    "limit",
    "max_new_tokens",
    "gsm8k_max_new_tokens",
    "detector_negatives",
    "jailbreak_turns",
    "max_batch_size",
    "score_batch_size",
    "bootstrap",
    "fidelity_tokens",
    "corpus_tokens",
    "init_tokens",
    "log_every",
    "checkpoint_every",
    "stream_batch_size",
    "steps",
)
_AT_LEAST_0 = (
    "top_contexts",
    "warmup_steps",
    "n_candidates",
    "n_attribution",
    "candidates",
    "examples",
    "mmlu_shots",
    "agreement_sample",
)
BOUNDS = {
    "ctx": {"min": 2},
    "folds": {"min": 2},
    **dict.fromkeys(_AT_LEAST_1, {"min": 1}),
    **dict.fromkeys(_AT_LEAST_0, {"min": 0}),
    **dict.fromkeys(("lr", "l1"), {"min": 0.0}),
    "detector_recall": {"min": 0.0, "max": 1.0},
}
ENVVARS = {"api_key": "SAESTEER_API_KEY"}


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """{field: the docstring under it, on one line} of dataclass `cls`, read from its source (simple_parsing's
    reader misses the docstring of a field whose default spans several lines)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {
        node.target.id: " ".join(after.value.value.split())
        for node, after in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and isinstance(after, ast.Expr)
        and isinstance(after.value, ast.Constant)
        and isinstance(after.value.value, str)
    }


def help_of(cls: type, name: str) -> str:
    """The docstring under field `name` of dataclass `cls`, on one line ("" if it has none)."""
    return _field_docs(cls).get(name, "")


def shown(value) -> str:
    """A default as help text shows it: 20,000,000; 8,16 for (8.0, 16.0)."""
    if isinstance(value, (tuple, list)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    big = isinstance(value, int) and not isinstance(value, bool) and value >= 100_000
    return f"{value:,}" if big else str(value)


def numbers(text: str, flag: str, kind: type = float) -> tuple:
    """Comma-separated finite numbers, or a one-line error naming the option."""
    try:
        found = tuple(kind(v) for v in text.split(","))
    except ValueError:
        found = ()
    if not found or not all(math.isfinite(v) for v in found):
        raise SaesteerError(f"bad {flag} {short(text)!r}: use finite numbers separated by commas, e.g. 8,16")
    return found


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Option:
    """One option of a verb, and the field it sets."""

    name: str
    """Python parameter name, unique within a verb"""
    path: tuple[str, ...]
    """the field it sets: a path of field names from the verb's config (empty: a `Custom` input)"""
    annotation: object
    """what typer parses the given text into (always optional: None is "not given")"""
    help: str
    """help text, ending with the config's default"""
    convert: Callable[[object, str], object] | None = None
    """(given value, flag) -> field value; None: the given value is the field's"""
    required: bool = False
    """the config's default is empty, so the option (or the --config file) must give it"""

    @property
    def decls(self) -> tuple[str, ...]:
        if self.name in FLAGS:
            return (FLAGS[self.name],)
        return (
            (f"{_flag(self.name)}/--no-{self.name.replace('_', '-')}",)
            if self.annotation == bool | None
            else ()
        )

    @property
    def flag(self) -> str:
        return self.decls[0].split("/")[0] if self.decls else _flag(self.name)

    def parameter(self) -> inspect.Parameter:
        bounds = BOUNDS.get(self.name, {}) if self.annotation in (int | None, float | None) else {}
        metavar = "<str>, repeatable" if self.annotation == list[str] | None else None
        option = typer.Option(
            None, *self.decls, help=self.help, envvar=ENVVARS.get(self.name), metavar=metavar, **bounds
        )
        return inspect.Parameter(
            self.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=self.annotation
        )


@dataclass(frozen=True)
class Custom:
    """Options that set fields of a config in another form than the fields' own."""

    options: tuple[Option, ...]
    """the options (their `path` is empty)"""
    fields: tuple[str, ...]
    """the fields they set, which get no option of their own"""
    apply: Callable[..., dict]
    """the options' values by name (None: not given) -> {field name: value} for the fields to set"""
    show: Callable[[object, object], dict]
    """(config, default config) -> {option name: value} that `apply` reads back into the config's fields"""


def _eval_inputs(suite, limit, prompts, label, column) -> dict:
    values = {}
    if suite:
        values["suites"] = parse_suites(",".join(suite))
    if limit is not None:
        values["limit"], values["limits"] = parse_limits(limit)
    if (prompts is None) != (label is None):
        raise SaesteerError("--prompts and --label go together (--label unsafe or safe)")
    if prompts is not None:
        values["user_prompts"] = load_prompt_file(prompts, label, column)
        values["user_prompts_name"] = f"user:{Path(prompts).name}"
    return values


def _eval_shown(config: EvalConfig, default: EvalConfig) -> dict:
    if config.user_prompts is not None:
        raise ValueError("prompts given as Python objects have no command line")
    shown_values = {}
    if config.suites != default.suites:
        shown_values["suite"] = ",".join(config.suites)
    if (config.limit, config.limits) != (default.limit, default.limits):
        parts = [str(config.limit or 0)] + [f"{k}={0 if v == 10**9 else v}" for k, v in config.limits.items()]
        shown_values["limit"] = ",".join(parts)
    return shown_values


CUSTOM: dict[type, Custom] = {
    EvalConfig: Custom(
        (
            Option(
                "suite",
                (),
                list[str] | None,
                "safety, capability, jailbreak, fidelity, all, or a comma-separated list (default: safety)",
            ),
            Option(
                "limit",
                (),
                str | None,
                "items per dataset (a seeded sample), 0 = all; per dataset: 50,mmlu=100,gsm8k=20 (default: 100)",
            ),
            Option(
                "prompts",
                (),
                str | None,
                "your own prompts (.csv, .jsonl or .txt) instead of the built-in safety sets",
            ),
            Option("label", (), str | None, "label of --prompts: unsafe or safe"),
            Option(
                "column",
                (),
                str | None,
                "prompt column of --prompts (case-insensitive; default: prompt/goal/...)",
            ),
        ),
        ("suites", "limit", "limits", "user_prompts", "user_prompts_name"),
        _eval_inputs,
        _eval_shown,
    )
}


def _field_type(cls: type, f: dataclasses.Field):
    """A field's type; None where it names a class only imported for type checking (a Python-only field)."""
    try:
        return eval(f.type, vars(sys.modules[cls.__module__])) if isinstance(f.type, str) else f.type
    except NameError:
        return None


def _readable(kind) -> tuple[object, Callable | None] | None:
    """(option type, converter) for a field type an option can give; None for Python-only types."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        kind = next(a for a in args if a is not type(None))
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind in (bool, int, float, str):
        return kind | None, None
    if origin not in (tuple, list) or not args or any(a not in (args[0], ...) for a in args):
        return None
    if args[0] in (int, float):  # numbers: one comma-separated option, "8,16"
        return str | None, lambda text, flag: origin(numbers(text, flag, args[0]))
    if args[0] is str:  # texts (which may hold commas): a repeatable option
        return list[str] | None, lambda given, flag: origin(given)
    return None


def _options(cls: type, default, path: tuple[str, ...] = ()) -> list[Option]:
    """The options of config `cls`, whose instance `default` gives the defaults; nested configs flattened."""
    custom = CUSTOM.get(cls)
    found = list(custom.options) if custom else []
    for f in fields(cls):
        if custom and f.name in custom.fields:
            continue
        kind, value = _field_type(cls, f), getattr(default, f.name)
        if is_dataclass(kind) and value is not None:
            found += _options(kind, value, (*path, f.name))
            continue
        readable = _readable(kind)
        if readable is None:
            continue
        annotation, convert = readable
        text = help_of(cls, f.name) + (f" (default: {shown(value)})" if value not in (None, "", ()) else "")
        found.append(Option(f.name, (*path, f.name), annotation, text, convert, required=value == ""))
    return found


def options_of(cls: type) -> list[Option]:
    """Every option of a verb whose config is `cls`."""
    found = _options(cls, cls())
    names = [o.name for o in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TypeError(f"{cls.__name__}: fields named alike in nested configs: {', '.join(twice)}")
    return found


def _customs(cls: type, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Custom]]:
    """(path of the nested config, its Custom) for `cls` and every config nested in it."""
    found = [(path, CUSTOM[cls])] if cls in CUSTOM else []
    for f in fields(cls):
        kind = _field_type(cls, f)
        if is_dataclass(kind):
            found += _customs(kind, (*path, f.name))
    return found


def _set(values: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        values = values.setdefault(name, {})
        if not isinstance(values, dict):
            raise SaesteerError(f"--config: {name} must be a JSON object of its config's fields")
    values[path[-1]] = value


def build(cls: type, values: dict, where: str, default=None):
    """Config `cls` from nested dicts of field values (as JSON gives them) over `default` (else `cls()`); a
    list given for a tuple field becomes a tuple; an unknown or mistyped field is a one-line error."""
    default = cls() if default is None else default
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise SaesteerError(f"unknown {cls.__name__} field(s) in {where}: {', '.join(map(short, unknown))}")
    changes = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        value, current = values[f.name], getattr(default, f.name)
        if is_dataclass(current) and isinstance(value, dict):
            value = build(type(current), value, where, current)
        elif is_dataclass(_field_type(cls, f)) and value is not None:
            raise SaesteerError(f"bad {cls.__name__}.{f.name} in {where}: give a JSON object of its fields")
        elif isinstance(value, list) and isinstance(current, tuple):
            value = tuple(value)
        if not _fits(_field_type(cls, f), value):
            raise SaesteerError(
                f"bad {cls.__name__}.{f.name} in {where}: {short(repr(value))} is not {f.type}"
            )
        changes[f.name] = value
    try:
        return dataclasses.replace(default, **changes)
    except TypeError as err:
        raise SaesteerError(f"bad {cls.__name__} in {where}: {err}") from None


def _fits(kind, value) -> bool:
    """Whether `value` is of its field's type: plain values (bool, int, float (finite), str, optional, tuples,
    lists and dicts of these) and configs; a Python-only field (a chat backend, prompts, detector recipes)
    fits nothing a config file can give."""
    if kind is None:
        return False
    if is_dataclass(kind):
        return isinstance(value, kind)
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        return value is None or _fits(next(a for a in args if a is not type(None)), value)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is str:
        return isinstance(value, str)
    origin = typing.get_origin(kind)
    if origin is dict:
        return isinstance(value, dict) and all(
            _fits(args[0], k) and _fits(args[1], v) for k, v in value.items()
        )
    if origin in (tuple, list) and args and all(a in (args[0], ...) for a in args):
        fixed = ... not in args and origin is tuple
        return (
            isinstance(value, (tuple, list))
            and (not fixed or len(value) == len(args))
            and all(_fits(args[0], v) for v in value)
        )
    return False


def read_config_file(path: Path) -> dict:
    """A `--config` file: a JSON object of config fields."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SaesteerError(f"cannot read --config {short(str(path))}: {err}") from None
    if not isinstance(data, dict):
        raise SaesteerError(f"--config {short(str(path))} must be a JSON object of config fields")
    return data


def config_from(cls: type, given: dict, config_file: Path | None = None):
    """The config a verb runs: `config_file`'s fields, then the options given (by name; None: not given)."""
    values = read_config_file(config_file) if config_file else {}
    for option in options_of(cls):
        value = given.get(option.name)
        if option.path and value not in (None, [], ()):  # a repeatable option not given reads as empty
            _set(values, option.path, value if option.convert is None else option.convert(value, option.flag))
    config = build(cls, values, f"--config {short(str(config_file))}" if config_file else "the options")
    for path, custom in _customs(cls):  # read by their own parsers, after the file's values are checked
        changes = custom.apply(**{o.name: given.get(o.name) for o in custom.options})
        if changes:
            config = _replaced(config, path, changes)
    for option in options_of(cls):
        if option.required and _get(config, option.path) == "":
            raise SaesteerError(f"{option.flag} is required")
    return config


def _replaced(config, path: tuple[str, ...], changes: dict):
    """`config` with the nested config at `path` given `changes`."""
    if not path:
        return dataclasses.replace(config, **changes)
    inner = getattr(config, path[0])
    return dataclasses.replace(config, **{path[0]: _replaced(inner, path[1:], changes)})


def _get(config, path: tuple[str, ...]):
    for name in path:
        config = getattr(config, name)
    return config


def command(app: typer.Typer, cls: type, name: str | None = None) -> Callable:
    """Decorator: register `run(config, **own)` as verb `name` (default: run's name). Its options are `cls`'s
    fields, `--config FILE`, and `run`'s own keyword parameters (typer options declared as usual)."""

    def register(run: Callable) -> Callable:
        generated = [o.parameter() for o in options_of(cls)]
        config_file = inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                None, help=f"JSON file of {cls.__name__} fields; options given here override it"
            ),
            annotation=Path | None,
        )
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in list(inspect.signature(run, eval_str=True).parameters.values())[1:]
        ]
        names = {p.name for p in generated} | {"config"}
        if names & {p.name for p in own}:
            raise TypeError(
                f"{run.__name__}: own options named like {cls.__name__}'s: {names & {p.name for p in own}}"
            )

        def verb(**given):
            config = config_from(
                cls, {n: given.pop(n) for n in list(given) if n in names - {"config"}}, given.pop("config")
            )
            return run(config, **given)

        verb.__name__, verb.__doc__ = run.__name__, run.__doc__
        verb.__signature__ = inspect.Signature([*generated, config_file, *own])
        app.command(name)(verb)
        return run

    return register


def command_line(verb: str, config, **own) -> list[str]:
    """The `saesteer` arguments that run `config` (an instance of verb's config) from a shell: an option for
    every field that differs from the config's default, then `own`, the verb's own options (name: value)."""
    default = type(config)()
    args: list[str] = [verb]
    for option in options_of(type(config)):
        value = _get(config, option.path) if option.path else None
        if not option.path or value == _get(default, option.path):
            continue
        if value is None:
            raise ValueError(f"{option.flag} cannot unset a default")
        if isinstance(value, bool):
            args.append(option.decls[0].split("/")[0 if value else 1])
        elif isinstance(value, (tuple, list)) and option.annotation == list[str] | None:
            args += [part for item in value for part in (option.flag, item)]
        else:
            exact = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
            args += [option.flag, exact]  # str of a float is its repr: exact
    for path, custom in _customs(type(config)):
        for name, value in custom.show(_get(config, path), _get(default, path)).items():
            args += [_flag(name), str(value)]
    for name, value in own.items():
        args += [_flag(name)] if value is True else [] if value is False else [_flag(name), str(value)]
    return args
