"""Each field of a config dataclass is documented once, by a docstring on the line under it (as in
EleutherAI's sparsify); the CLI takes its options' defaults and help text from there.

This module reads those docstrings and defaults from the source with `ast`, without importing the
module (so `saesteer --help` does not load torch, and the server's optional dependencies stay
optional). A class re-exported by another module (`from saesteer.x import Config`) is followed.
"""

from __future__ import annotations

import ast
import functools
import operator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()  # no default, or one that is not a plain value (e.g. a default_factory of a class)

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
    ast.LShift: operator.lshift,
}
_FACTORIES = {"list": list, "dict": dict, "tuple": tuple, "set": set}


@dataclass(frozen=True)
class FieldDoc:
    name: str
    default: object  # MISSING when there is none or it is not a plain value
    help: str  # the docstring under the field, on one line ("" when there is none)


def _module_path(module: str) -> Path:
    parts = module.split(".")
    if parts[0] != PACKAGE.name:
        raise ValueError(f"{module} is not a module of {PACKAGE.name}")
    base = PACKAGE.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    raise ValueError(f"no source file for module {module}")


@functools.cache
def _tree(module: str) -> ast.Module:
    return ast.parse(_module_path(module).read_text(encoding="utf-8"))


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".")
    if not _module_path(module).name == "__init__.py":
        package = package[:-1]
    package = package[: len(package) - node.level + 1]
    return ".".join(package + ([node.module] if node.module else []))


def _find(module: str, name: str, depth: int = 0) -> tuple[str, ast.AST]:
    """(module, node) defining `name` at module level: a class, or the value of an assignment."""
    if depth > 8:
        raise LookupError(f"import chain too long for {name}")
    imported = None
    for node in _tree(module).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return module, node
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return module, node.value
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name and node.value:
            return module, node.value
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    imported = (_absolute(module, node), alias.name)
    if imported and imported[0].split(".")[0] == PACKAGE.name:
        return _find(*imported, depth + 1)
    raise LookupError(f"{name} is not defined in {module}")


def _value(module: str, node: ast.AST) -> object:
    """A plain value (constants, containers, arithmetic, module-level names); MISSING otherwise."""
    try:
        return _evaluate(module, node)
    except (LookupError, TypeError, ValueError, ArithmeticError):
        return MISSING


def _evaluate(module: str, node: ast.AST) -> object:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = [_evaluate(module, e) for e in node.elts]
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("dict unpacking")
        return {_evaluate(module, k): _evaluate(module, v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(module, node.operand)
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_evaluate(module, node.left), _evaluate(module, node.right))
    if isinstance(node, ast.Name):
        where, found = _find(module, node.id)
        if isinstance(found, ast.ClassDef):
            raise ValueError(f"{node.id} is a class")
        return _evaluate(where, found)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "field":
        kwargs = {k.arg: k.value for k in node.keywords}
        if "default" in kwargs:
            return _evaluate(module, kwargs["default"])
        factory = kwargs.get("default_factory")
        if isinstance(factory, ast.Name) and factory.id in _FACTORIES:
            return _FACTORIES[factory.id]()
        if isinstance(factory, ast.Lambda):
            return _evaluate(module, factory.body)
        raise ValueError("not a plain default")
    raise ValueError(f"not a plain value: {ast.dump(node)[:60]}")


@functools.cache
def field_docs(module: str, cls: str) -> dict[str, FieldDoc]:
    """Every field of dataclass `cls` (defined in `module` or imported there): default and docstring."""
    where, node = _find(module, cls)
    if not isinstance(node, ast.ClassDef):
        raise LookupError(f"{cls} in {module} is not a class")
    docs: dict[str, FieldDoc] = {}
    body = node.body
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        annotation = ast.unparse(stmt.annotation)
        if annotation.startswith(("ClassVar", "typing.ClassVar")):
            continue
        after = body[i + 1] if i + 1 < len(body) else None
        text = ""
        if (
            isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            text = " ".join(after.value.value.split())
        default = MISSING if stmt.value is None else _value(where, stmt.value)
        docs[stmt.target.id] = FieldDoc(stmt.target.id, default, text)
    return docs


def docs_of(cls: type) -> dict[str, FieldDoc]:
    """field_docs for a dataclass that is already imported."""
    return field_docs(cls.__module__, cls.__qualname__)
