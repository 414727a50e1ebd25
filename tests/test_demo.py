"""`saesteer demo`: the fallback path (train a small SAE, discover, steer, eval, report) on a tiny model,
and (slow) the real default model with the shipped SAE and presets."""

from __future__ import annotations

import json

import pytest
from conftest import needs_default_model, run_cli

from saesteer.artefacts import shipped_dir
from saesteer.demo import DEMO_SETS, DemoConfig, run_demo
from saesteer.steering import PRESETS


def test_demo_fallback_trains_an_sae_and_writes_the_report(tiny_model_dir, tmp_path, one_thread, capsys):
    config = DemoConfig(
        model=str(tiny_model_dir),
        out=str(tmp_path / "demo"),
        examples=1,
        limit=2,
        max_new_tokens=4,
        fallback_tokens=4096,
        fallback_prompts=4,
    )
    html_path, md_path = run_demo(config)
    printed = capsys.readouterr().out
    assert "no shipped steering presets" in printed and ">>> [unsafe]" in printed and "unsteered:" in printed
    assert (tmp_path / "demo" / "fallback" / "sae" / "sae" / "cfg.json").is_file()
    rows = [json.loads(line) for line in (tmp_path / "demo" / "results.jsonl").read_text().splitlines()]
    methods = {r["config"]["steering"]["method"] for r in rows}
    assert methods >= {"none"} and len(methods) >= 2  # unsteered + the discovered steering
    assert {r["config"]["dataset"] for r in rows} >= set(DEMO_SETS)
    assert all(r["config"]["split"] == "test" for r in rows)
    page = html_path.read_text()
    assert "data:image/png;base64," in page and "unsteered" in page
    assert md_path.is_file()


@pytest.mark.slow
@needs_default_model
@pytest.mark.skipif("refusal" not in PRESETS, reason="no shipped presets in this checkout")
def test_demo_on_the_default_model_with_shipped_artefacts(tmp_path, monkeypatch, capsys):
    code, captured = run_cli(
        monkeypatch,
        capsys,
        "demo",
        "--out",
        str(tmp_path / "demo"),
        "--examples",
        "1",
        "--limit",
        "4",
        "--max-new-tokens",
        "16",
    )
    assert code == 0, captured.err
    assert "no shipped steering presets" not in captured.out  # the shipped SAE was used, nothing trained
    assert "report:" in captured.out and (tmp_path / "demo" / "report" / "report.html").is_file()
    assert (shipped_dir() / "sae" / "cfg.json").is_file()
