"""Trainer: dictionary recovery with AuxK, exact resume (also after kill -9), NaN and config
errors, data-parallel equivalence, and the evaluation metrics."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saesteer.sae import SAE
from saesteer.trainer import CHECKPOINT, TensorSource, TrainConfig, TrainError, train

pytestmark = pytest.mark.usefixtures("one_thread")


def sparse_data(seed=0, d=32, n_true=64, k_true=3, n_tokens=65536):
    """x = sum of k_true random unit atoms with coefficients in [0.5, 1.5]; returns (atoms, x)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_true, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    which = torch.rand(n_tokens, n_true, generator=g).argsort(1)[:, :k_true]
    coef = torch.rand(n_tokens, k_true, generator=g) + 0.5
    return atoms, (coef[..., None] * atoms[which]).sum(1)


def small_config(tmp_path, **overrides) -> TrainConfig:
    base = dict(
        out=str(tmp_path / "run"),
        n_latents=64,
        k=3,
        batch_size=256,
        total_tokens=256 * 30,
        lr=3e-3,
        warmup_steps=5,
        dead_tokens=2000,
        init_tokens=4096,
        checkpoint_every=10,
        log_every=5,
    )
    return TrainConfig(**{**base, **overrides})


def test_dictionary_recovery_and_auxk_revives_dead_latents(tmp_path, monkeypatch, capsys):
    """Half the latents start crippled (encoder rows x0.05) so they never win the top-k: only
    AuxK gives them gradient. With it they revive and the SAE recovers the true dictionary."""
    atoms, x = sparse_data()
    original = SAE.init_from_sample

    def crippled_init(self, sample):
        original(self, sample)
        with torch.no_grad():
            self.W_enc[: self.cfg.n_latents // 2] *= 0.05

    monkeypatch.setattr(SAE, "init_from_sample", crippled_init)
    results = {}
    for auxk_coef in (1 / 32, 0.0):
        cfg = small_config(
            tmp_path,
            auxk_coef=auxk_coef,
            batch_size=512,
            total_tokens=200_000,
            dead_tokens=5000,
            checkpoint_every=10**6,
            out=str(tmp_path / f"aux{auxk_coef}"),
        )
        sae = train(cfg, TensorSource(x), progress=False).sae
        best_cos = (atoms @ sae.W_dec.detach().T).max(1).values
        values, indices = sae.encode_topk(x[:8192])
        fired = torch.zeros(64, dtype=torch.bool).index_fill_(0, indices[values > 0], True)
        results[auxk_coef] = (best_cos.mean().item(), fired[:32].float().mean().item())
    with capsys.disabled():
        print(
            f"\n  dictionary recovery (mean max cosine, crippled latents alive): "
            f"AuxK {results[1 / 32][0]:.3f}, {results[1 / 32][1]:.0%}; no AuxK {results[0.0][0]:.3f}, {results[0.0][1]:.0%}"
        )
    assert results[1 / 32][0] > 0.95 and results[1 / 32][1] > 0.9
    assert results[0.0][1] < 0.1 and results[0.0][0] < results[1 / 32][0] - 0.03


def test_training_keeps_decoder_unit_norm_and_records_metadata(tmp_path):
    _, x = sparse_data()
    source = TensorSource(
        x,
        manifest={
            "model": "tiny",
            "layer": 3,
            "hook_point": "resid_pre",
            "data": {"data": "corpus.jsonl", "sha256": "ff"},
            "ctx": 64,
            "shards": [{"n_contexts": 10}],
            "n_tokens": 640,
        },
    )
    result = train(small_config(tmp_path), source, progress=False)
    sae = result.sae
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    assert result.steps == 30 and len(result.losses) == 30 and result.losses[-1] < result.losses[0]
    loaded = SAE.load(tmp_path / "run" / "sae")
    assert loaded.cfg.model == "tiny" and loaded.cfg.layer == 3 and loaded.cfg.hook_point == "resid_pre"
    assert loaded.cfg.training_tokens == 30 * 256 and loaded.cfg.training_data["sha256"] == "ff"
    assert loaded.cfg.training_data["n_contexts"] == 10
    assert abs(loaded.cfg.norm_scale - sae.cfg.norm_scale) == 0


def test_resume_is_exact(tmp_path):
    _, x = sparse_data()
    straight = train(small_config(tmp_path, out=str(tmp_path / "a")), TensorSource(x), progress=False)
    first = train(
        small_config(tmp_path, out=str(tmp_path / "b"), total_tokens=256 * 12),
        TensorSource(x),
        progress=False,
    )
    resumed = train(
        small_config(tmp_path, out=str(tmp_path / "b"), resume=True), TensorSource(x), progress=False
    )
    assert resumed.steps == 30 and len(resumed.losses) == 18
    assert first.losses + resumed.losses == straight.losses  # bitwise
    for name, p in straight.sae.named_parameters():
        assert torch.equal(p, getattr(resumed.sae, name)), name


def test_resume_after_kill_9_is_exact(tmp_path):
    """A trainer killed with SIGKILL (likely mid checkpoint write) leaves a loadable checkpoint;
    resuming from it reproduces the uninterrupted run bitwise."""
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from pathlib import Path
        from tests.test_trainer import sparse_data, small_config
        from saesteer.trainer import TensorSource, train
        _, x = sparse_data()
        train(small_config(Path({str(tmp_path)!r}), out={str(out)!r}, total_tokens=256 * 1_000_000, checkpoint_every=2),
              TensorSource(x), progress=False)
    """)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=root, env={**os.environ, "PYTHONPATH": str(root)}
    )
    try:
        deadline = time.time() + 120
        while not (out / CHECKPOINT).exists():
            assert proc.poll() is None, "trainer exited early"
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.005)
        time.sleep(0.2)  # let it run on, likely into a later checkpoint write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    from safetensors import safe_open

    with safe_open(str(out / CHECKPOINT), framework="pt") as f:
        killed_at = json.loads(f.metadata()["saesteer"])["step"]
    n_steps = killed_at + 8
    _, x = sparse_data()
    cfg = small_config(tmp_path, out=str(out), total_tokens=256 * n_steps, checkpoint_every=2, resume=True)
    resumed = train(cfg, TensorSource(x), progress=False)
    straight = train(
        replace(cfg, out=str(tmp_path / "straight"), resume=False), TensorSource(x), progress=False
    )
    assert len(resumed.losses) == 8
    assert resumed.losses == straight.losses[killed_at:]
    for name, p in straight.sae.named_parameters():
        assert torch.equal(p, getattr(resumed.sae, name)), name


def test_corrupt_checkpoint_and_changed_config_are_refused(tmp_path):
    _, x = sparse_data()
    cfg = small_config(tmp_path, total_tokens=256 * 10)
    train(cfg, TensorSource(x), progress=False)
    with pytest.raises(TrainError, match="different config.*batch_size"):
        train(replace(cfg, batch_size=128, resume=True), TensorSource(x), progress=False)
    path = tmp_path / "run" / CHECKPOINT
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(TrainError, match="corrupt"):
        train(replace(cfg, resume=True), TensorSource(x), progress=False)


def test_nan_stops_training_naming_the_step(tmp_path):
    _, x = sparse_data(n_tokens=8192)
    x[4096:] = float("nan")  # past the init sample; every shuffled batch holds NaN rows
    with pytest.raises(TrainError, match=r"step \d+: the activation batch contains NaN"):
        train(small_config(tmp_path), TensorSource(x), progress=False)
    _, x = sparse_data(n_tokens=8192)
    with pytest.raises(TrainError, match=r"loss became (nan|inf) at step \d+"):
        train(small_config(tmp_path, lr=1e35, grad_clip=0.0, warmup_steps=0), TensorSource(x), progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg, x, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = train(cfg, TensorSource(x), progress=False)
        if rank == 0:
            results.put((result.losses, {k: v.detach().numpy() for k, v in result.sae.named_parameters()}))
    finally:
        dist.destroy_process_group()


def test_two_process_data_parallel_matches_single_process(tmp_path):
    _, x = sparse_data(n_tokens=16384)
    cfg = small_config(tmp_path, total_tokens=256 * 12, dead_tokens=512, out=str(tmp_path / "ddp"))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, cfg, x, results)) for r in range(2)]
    for p in procs:
        p.start()
    ddp_losses, ddp_params = results.get(timeout=180)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    single = train(replace(cfg, out=str(tmp_path / "single")), TensorSource(x), progress=False)
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single.losses), rtol=1e-4, atol=1e-6)
    for name, p in single.sae.named_parameters():
        torch.testing.assert_close(
            torch.from_numpy(ddp_params[name]), p.detach(), rtol=1e-4, atol=1e-5, msg=name
        )
    assert (tmp_path / "ddp" / "sae" / "cfg.json").exists()


def test_bfloat16_selection_keeps_exact_values_and_trains_as_float32(tmp_path):
    """dtype bfloat16 only chooses the top-k: the chosen latents' values are the float32 pre-activations, and
    training reaches the float32 run's FVU (within 2%) on the same data and seed."""
    from saesteer.sae import SAE, SAEConfig, _TopKEncode

    _, x = sparse_data(n_tokens=8192)
    sae = SAE(SAEConfig(d_in=32, n_latents=64, k=3))
    workspace = torch.empty(512, 64, dtype=torch.bfloat16)
    out = sae.training_loss(x[:512], workspace=workspace)
    pre = (x[:512] - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    assert torch.allclose(out.values, pre.gather(1, out.indices).relu(), atol=1e-5)
    dead = torch.arange(0, 64, 2)  # AuxK's top-k over "dead" latents: chosen in bf16, valued in fp32 too
    with torch.no_grad():
        *_, aux_values, aux_indices = _TopKEncode.apply(
            x[:512], sae.W_enc, sae.b_enc, sae.b_dec, 3, dead, 16, workspace
        )
    assert set(aux_indices.unique().tolist()) <= set(dead.tolist())
    assert torch.allclose(aux_values, pre.gather(1, aux_indices).relu(), atol=1e-5)

    fvu = {}
    for dtype in ("float32", "bfloat16"):
        cfg = small_config(tmp_path / dtype, dtype=dtype, total_tokens=256 * 60)
        losses = train(cfg, TensorSource(x), progress=False).losses
        fvu[dtype] = sum(losses[-10:]) / 10
    assert abs(fvu["bfloat16"] - fvu["float32"]) <= 0.02 * fvu["float32"] + 1e-3, fvu
    with pytest.raises(TrainError, match="dtype"):
        small_config(tmp_path, dtype="float16")


def test_train_config_checks_its_values():
    with pytest.raises(TrainError, match="batch_size must be positive"):
        TrainConfig(batch_size=0)
    with pytest.raises(TrainError, match="dtype must be one of float32, bfloat16"):
        TrainConfig(dtype="float16")
