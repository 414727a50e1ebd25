import pytest
from conftest import run_cli


@pytest.fixture
def base(tiny_model_dir, text_file, tmp_path):
    return [
        "collect",
        "--model",
        str(tiny_model_dir),
        "--layer",
        "1",
        "--data",
        str(text_file),
        "--tokens",
        "64",
        "--ctx",
        "32",
    ]


def test_collect_prints_summary(monkeypatch, capsys, base, tmp_path):
    code, out = run_cli(monkeypatch, capsys, *base, "--out", str(tmp_path / "c"))
    assert code in (0, None)
    assert "collected" in out.out and "layer 1 (resid_post), d_model 64" in out.out and "cache" in out.out


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--model": "./nowhere/model"}, "unknown model './nowhere/model'"),
        ({"--layer": "7"}, "layer 7 is out of range"),
        ({"--data": "EMPTY"}, "no text found"),
        ({"--data": "UNREADABLE"}, "cannot read"),
        ({"--data": "/no/such/file.jsonl"}, "no such file or folder"),
    ],
)
def test_bad_input_is_one_line(monkeypatch, capsys, base, tmp_path, change, message):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "unreadable.txt").write_bytes(b"\xff\xfe\x00bad utf8 \xff")
    args = list(base)
    for flag, value in change.items():
        value = {"EMPTY": str(tmp_path / "empty.jsonl"), "UNREADABLE": str(tmp_path / "unreadable.txt")}.get(
            value, value
        )
        args[args.index(flag) + 1] = value
    code, out = run_cli(monkeypatch, capsys, *args, "--out", str(tmp_path / "c"))
    assert code == 2
    errors = [line for line in out.err.splitlines() if line.startswith("saesteer: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in out.err


def test_folder_with_other_collection_is_refused(monkeypatch, capsys, base, tmp_path):
    run_cli(monkeypatch, capsys, *base, "--out", str(tmp_path / "c"))
    args = list(base)
    args[args.index("--layer") + 1] = "2"
    code, out = run_cli(monkeypatch, capsys, *args, "--out", str(tmp_path / "c"))
    assert code == 2 and "holds a different collection (layer: 1 vs 2)" in out.err
