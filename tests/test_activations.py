import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from saesteer import activations
from saesteer.activations import ActivationStore, CollectConfig, collect
from saesteer.corpus import TextSource
from saesteer.errors import SaesteerError
from saesteer.hooks import residual_at
from saesteer.models import load_model


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def config_for(tiny_model_dir, text_file, **overrides):
    fields = dict(
        model=str(tiny_model_dir),
        layer=2,
        data=TextSource(str(text_file)),
        tokens=32 * 20,
        ctx=32,
        batch_size=3,
        contexts_per_shard=4,
    )
    return CollectConfig(**{**fields, **overrides})


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))}


def test_collect_writes_shards_and_manifest(tmp_path, tiny_model_dir, text_file, loaded):
    config = config_for(tiny_model_dir, text_file, drop_special=False)
    manifest = collect(config, tmp_path, loaded, progress=False)
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:05d}.safetensors" for i in range(5)]
    assert manifest["n_tokens"] == 20 * 32 and manifest["d_model"] == 64 and manifest["layer"] == 2
    assert manifest["data"]["sha256"] and manifest["dtype"] == "bfloat16"
    store = ActivationStore(tmp_path)
    acts = store.tensor()
    # The cache equals a plain forward pass over the same packed contexts, rounded to bf16.
    from saesteer.corpus import iter_documents, pack_contexts

    contexts = list(pack_contexts(iter_documents(config.data), loaded.tokenizer, 32))[:20]
    expected = residual_at(loaded.model, torch.tensor(contexts), 2).reshape(-1, 64)
    torch.testing.assert_close(acts, expected.bfloat16().float(), rtol=0, atol=0)


def test_drop_special_positions(tmp_path, tiny_model_dir, text_file, loaded):
    manifest = collect(config_for(tiny_model_dir, text_file), tmp_path, loaded, progress=False)
    # Every context starts with BOS and documents end with EOS: those positions are gone.
    assert 20 * 31 - 20 < manifest["n_tokens"] < 20 * 31


def test_resume_after_crash_is_byte_identical(tmp_path, tiny_model_dir, text_file, loaded, monkeypatch):
    config = config_for(tiny_model_dir, text_file)
    collect(config, tmp_path / "straight", loaded, progress=False)

    real, calls = activations._activations, []

    def crash_on_third_shard(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected crash")
        return real(*args)

    monkeypatch.setattr(activations, "_activations", crash_on_third_shard)
    with pytest.raises(RuntimeError, match="injected crash"):
        collect(config, tmp_path / "resumed", loaded, progress=False)
    assert len(json.loads((tmp_path / "resumed" / "manifest.json").read_text())["shards"]) == 2
    monkeypatch.setattr(activations, "_activations", real)
    collect(config, tmp_path / "resumed", loaded, progress=False)
    assert shard_bytes(tmp_path / "resumed") == shard_bytes(tmp_path / "straight")
    straight = json.loads((tmp_path / "straight" / "manifest.json").read_text())
    assert json.loads((tmp_path / "resumed" / "manifest.json").read_text()) == straight


def test_more_tokens_extends_cache(tmp_path, tiny_model_dir, text_file, loaded):
    collect(config_for(tiny_model_dir, text_file, tokens=32 * 6), tmp_path / "small", loaded, progress=False)
    collect(config_for(tiny_model_dir, text_file), tmp_path / "small", loaded, progress=False)
    collect(config_for(tiny_model_dir, text_file), tmp_path / "full", loaded, progress=False)
    assert shard_bytes(tmp_path / "small") == shard_bytes(tmp_path / "full")


def test_refuses_folder_with_other_collection(tmp_path, tiny_model_dir, text_file, loaded):
    collect(config_for(tiny_model_dir, text_file, tokens=64), tmp_path, loaded, progress=False)
    with pytest.raises(SaesteerError, match=r"holds a different collection \(layer: 2 vs 1"):
        collect(config_for(tiny_model_dir, text_file, tokens=64, layer=1), tmp_path, loaded, progress=False)


def test_empty_dataset_and_bad_layer(tmp_path, tiny_model_dir, loaded):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SaesteerError, match="no text found"):
        collect(
            CollectConfig(model=str(tiny_model_dir), layer=1, data=TextSource(str(empty))),
            tmp_path / "o",
            loaded,
            progress=False,
        )
    with pytest.raises(SaesteerError, match="layer 9 is out of range"):
        collect(
            CollectConfig(model=str(tiny_model_dir), layer=9, data=TextSource(str(empty))),
            tmp_path / "o",
            loaded,
            progress=False,
        )


def indexed_cache(folder, sizes):
    """A cache whose rows hold their own global index, so batches can be checked row by row."""
    from safetensors.torch import save_file

    folder.mkdir()
    shards, offset = [], 0
    for i, n in enumerate(sizes):
        save_file(
            {"acts": torch.arange(offset, offset + n).repeat(2, 1).T.contiguous().to(torch.bfloat16)},
            str(folder / f"s{i}.safetensors"),
        )
        shards.append({"index": i, "file": f"s{i}.safetensors", "n_tokens": n, "n_contexts": 1, "rank": 0})
        offset += n
    (folder / "manifest.json").write_text(json.dumps({"d_model": 2, "shards": shards, "n_tokens": offset}))
    return ActivationStore(folder)


def test_store_batches_are_deterministic_resumable_and_rank_sliced(tmp_path):
    store = indexed_cache(tmp_path / "c", [40, 50, 30, 20, 60])  # bf16 holds these integers exactly

    def take(n, **kw):
        return [b[:, 0].long() for _, b in zip(range(n), store.batches(16, seed=3, shards_per_group=2, **kw))]

    first = take(30)
    assert all(torch.equal(a, b) for a, b in zip(first, take(30)))
    assert all(torch.equal(a, b) for a, b in zip(first[7:], take(23, start_batch=7)))
    # One epoch = groups of 2+2+1 shards, floor(rows/16) batches each: no row twice, every group used.
    per_epoch = 90 // 16 + 50 // 16 + 60 // 16
    epoch = torch.cat(first[:per_epoch])
    assert torch.unique(epoch).numel() == epoch.numel() == per_epoch * 16
    assert not torch.equal(torch.cat(first[per_epoch : 2 * per_epoch]), epoch), "epochs are reshuffled"
    # Two ranks split each global batch of 32 rows into halves.
    ranks = [
        [b for _, b in zip(range(4), store.batches(8, seed=3, rank=r, world_size=2, shards_per_group=2))]
        for r in (0, 1)
    ]
    whole = [b for _, b in zip(range(4), store.batches(16, seed=3, shards_per_group=2))]
    for step in range(4):
        torch.testing.assert_close(torch.cat([ranks[0][step], ranks[1][step]]), whole[step], rtol=0, atol=0)


def test_store_errors(tmp_path):
    with pytest.raises(SaesteerError, match="run `saesteer collect` first"):
        ActivationStore(tmp_path)


def _cli(args, env=None):
    return [sys.executable, "-m", "saesteer", "collect", *args]


@pytest.mark.slow
def test_kill_9_then_rerun_is_byte_identical(tmp_path, tiny_model_dir, text_file):
    args = [
        "--model",
        str(tiny_model_dir),
        "--layer",
        "2",
        "--data",
        str(text_file),
        "--tokens",
        str(32 * 40),
        "--ctx",
        "32",
        "--batch-size",
        "1",
        "--contexts-per-shard",
        "2",
    ]
    subprocess.run(_cli([*args, "--out", str(tmp_path / "straight")]), check=True, capture_output=True)
    proc = subprocess.Popen(
        _cli([*args, "--out", str(tmp_path / "killed")]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    manifest = tmp_path / "killed" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        manifest.is_file() and len(json.loads(manifest.read_text())["shards"]) >= 3
    ):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(json.loads(manifest.read_text())["shards"])
    assert 3 <= done < 20, "the kill should land mid-run"
    subprocess.run(_cli([*args, "--out", str(tmp_path / "killed")]), check=True, capture_output=True)
    assert shard_bytes(tmp_path / "killed") == shard_bytes(tmp_path / "straight")
    assert not list((tmp_path / "killed").glob("*.tmp"))


@pytest.mark.slow
def test_torchrun_two_ranks_match_single_process(tmp_path, tiny_model_dir, text_file):
    args = [
        "--model",
        str(tiny_model_dir),
        "--layer",
        "2",
        "--data",
        str(text_file),
        "--tokens",
        str(32 * 20),
        "--ctx",
        "32",
        "--batch-size",
        "4",
        "--contexts-per-shard",
        "4",
    ]
    subprocess.run(_cli([*args, "--out", str(tmp_path / "single")]), check=True, capture_output=True)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29617",
            "-m",
            "saesteer",
            "collect",
            *args,
            "--out",
            str(tmp_path / "multi"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert shard_bytes(tmp_path / "multi") == shard_bytes(tmp_path / "single")
    merged = json.loads((tmp_path / "multi" / "manifest.json").read_text())
    assert [s["rank"] for s in merged["shards"]] == [0, 1, 0, 1, 0]
    assert not list((tmp_path / "multi").glob("manifest.rank*.json"))


def garble(path):
    """Flip the last 64 bytes of a file (tensor data, past the safetensors header): same length, bad content."""
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    path.write_bytes(bytes(data))


def test_garbled_shard_is_recollected_on_rerun(tmp_path, tiny_model_dir, text_file, loaded, capsys):
    config = config_for(tiny_model_dir, text_file)
    clean = collect(config, tmp_path / "clean", loaded, progress=False)
    assert all(len(s["sha256"]) == 64 for s in clean["shards"])
    collect(config, tmp_path / "c", loaded, progress=False)
    garble(tmp_path / "c" / "shard-00002.safetensors")
    capsys.readouterr()
    calls = []
    real = activations._activations
    activations._activations = lambda *args: calls.append(1) or real(*args)
    try:
        again = collect(config, tmp_path / "c", loaded, progress=False)
    finally:
        activations._activations = real
    warning = capsys.readouterr().err
    assert "shard-00002.safetensors does not match its sha256" in warning and "collecting it again" in warning
    assert len(calls) == 1  # only the garbled shard is collected again
    assert shard_bytes(tmp_path / "c") == shard_bytes(tmp_path / "clean") and again == clean


def test_loading_a_garbled_shard_names_it(tmp_path, tiny_model_dir, text_file, loaded):
    collect(config_for(tiny_model_dir, text_file), tmp_path, loaded, progress=False)
    store = ActivationStore(tmp_path)
    store.tensor()  # every shard checks out
    garble(tmp_path / "shard-00001.safetensors")
    with pytest.raises(SaesteerError, match=r"shard .*shard-00001\.safetensors does not match its sha256"):
        ActivationStore(tmp_path).tensor()


def test_manifest_without_checksums_gets_them_on_rerun(tmp_path, tiny_model_dir, text_file, loaded):
    """Caches collected before shards had checksums: their shards are trusted and hashed on the first rerun."""
    config = config_for(tiny_model_dir, text_file)
    clean = collect(config, tmp_path, loaded, progress=False)
    old = json.loads((tmp_path / "manifest.json").read_text())
    for shard in old["shards"]:
        del shard["sha256"]
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    assert ActivationStore(tmp_path).tensor().shape[0] == clean["n_tokens"]  # loads unchecked
    assert collect(config, tmp_path, loaded, progress=False) == clean


def test_streamed_training_equals_training_on_the_cache(tmp_path, tiny_model_dir, text_file, loaded):
    """Issue 24 item 5: `train --model` streams the activations `collect` would cache, in the same batch
    order, so on the same tokens it trains the same SAE bit for bit (and resumes exactly, computing only the
    groups it still reads)."""
    from saesteer.config import TrainConfig
    from saesteer.trainer import train

    config = config_for(tiny_model_dir, text_file, tokens=32 * 40, contexts_per_shard=3)
    collect(config, tmp_path / "cache", loaded, progress=False)
    settings = dict(
        n_latents=128, k=4, batch_size=64, total_tokens=64 * 12, init_tokens=256, checkpoint_every=5
    )
    cached = train(
        TrainConfig(activations=str(tmp_path / "cache"), out=str(tmp_path / "a"), **settings), progress=False
    )
    stream = dict(
        model=str(tiny_model_dir),
        layer=2,
        data=config.data,
        ctx=32,
        stream_batch_size=3,
        contexts_per_shard=3,
    )
    streamed_config = TrainConfig(activations="nowhere", out=str(tmp_path / "b"), **stream, **settings)
    source = activations.StreamSource(
        replace(streamed_config.stream_config(), tokens=config.tokens), loaded, progress=False
    )
    assert source.manifest["shards"] == [
        {k: s[k] for k in ("n_contexts", "n_tokens")} | {"index": s["index"], "file": f"stream-{s['index']}"}
        for s in ActivationStore(tmp_path / "cache").shards
    ]
    streamed = train(streamed_config, source, progress=False)
    assert streamed.losses == cached.losses
    for name, value in cached.sae.state_dict().items():
        assert torch.equal(value, streamed.sae.state_dict()[name]), name
    # stopped after 5 steps, then resumed: the same losses, and the groups before step 5 are not computed
    first = train(
        replace(streamed_config, out=str(tmp_path / "c"), total_tokens=64 * 5), source, progress=False
    )
    computed, load_shard = [], source.load_shard
    source.load_shard = lambda shard: computed.append(shard["index"]) or load_shard(shard)
    resumed = train(replace(streamed_config, out=str(tmp_path / "c"), resume=True), source, progress=False)
    assert first.losses + resumed.losses == cached.losses
    assert 0 < len(computed) < len(source.shards)


def test_streaming_ranks_compute_their_own_shards(tiny_model_dir, text_file, loaded):
    """Under torchrun each rank streams (and computes) only its own shards, so forward passes are split."""
    source = activations.StreamSource(
        config_for(tiny_model_dir, text_file, tokens=32 * 24, contexts_per_shard=3), loaded, progress=False
    )
    for rank in range(2):
        computed, load_shard = [], source.load_shard
        source.load_shard = lambda shard, load_shard=load_shard: (
            computed.append(shard["index"]) or load_shard(shard)
        )
        batches = source.batches(16, rank=rank, world_size=2)
        for _ in range(12):
            assert next(batches).shape == (16, 64)
        assert computed and {g % 2 for g in computed} == {rank}
        del source.load_shard


def test_streaming_needs_a_shard_per_rank(tiny_model_dir, text_file, loaded, monkeypatch):
    monkeypatch.setattr(activations.dist, "rank_world", lambda: (0, 64))
    with pytest.raises(SaesteerError, match="streamed shards for 64 ranks"):
        activations.StreamSource(config_for(tiny_model_dir, text_file), loaded, progress=False)
