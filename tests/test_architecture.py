"""The package's shape: layered with no import cycle (import-linter's contract in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_keeps_its_layers_so_it_has_no_import_cycle():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("module", ["saesteer.config", "saesteer.specs", "saesteer.cli"])
def test_the_config_tree_and_the_cli_it_makes_import_without_torch(module):
    code = (
        f"import sys, {module}; "
        "assert not {'torch', 'transformers', 'numpy'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_report_reads_steering_specs_without_torch():
    code = (
        "import sys, saesteer.report as r; "
        "assert r.steering_label({'method': 'sae', 'sae': 's', 'features': [1], 'values': [8.0]}) == 'SAE clamp f1'; "
        "assert not {'torch', 'transformers'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
