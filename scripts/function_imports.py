"""Imports inside function bodies, per module (issue 23's count): `python scripts/function_imports.py src/saesteer`."""

from __future__ import annotations

import ast
import collections
import pathlib
import sys


def main(folder: str) -> None:
    counts: collections.Counter = collections.Counter()
    for path in sorted(pathlib.Path(folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                counts[path.name] += sum(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(node))
    print(sum(counts.values()), dict(counts.most_common()))


if __name__ == "__main__":
    main(sys.argv[1])
