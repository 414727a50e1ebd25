"""TopK SAE: sparse kernels vs dense autograd, the raw-unit API, and file formats."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from saesteer.errors import SaesteerError
from saesteer.sae import SAE, SAEConfig, SAEError, geometric_median, reconstruction_metrics, spliced_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def random_sae(d=16, n=96, k=5, seed=0, **cfg) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d, n_latents=n, k=k, **cfg))
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(n, d))
        sae.b_enc.normal_(0, 0.5)
        sae.b_dec.normal_()
    return sae


def dense_reference(sae: SAE, x, dead, total_variance):
    """Plain PyTorch autograd: dense [B, n] latents, masks instead of index tricks."""
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    values, idx = pre.topk(sae.cfg.k)
    z = torch.zeros_like(pre).scatter(1, idx, values.relu())
    x_hat = z @ sae.W_dec + sae.b_dec
    err = x - x_hat
    fvu = err.pow(2).sum() / total_variance
    k_aux = min(sae.cfg.d_in // 2, dead.numel())
    masked = pre.masked_fill(~torch.isin(torch.arange(sae.cfg.n_latents), dead), float("-inf"))
    aux_values, aux_idx = masked.topk(k_aux)
    z_aux = torch.zeros_like(pre).scatter(1, aux_idx, aux_values.relu())
    scale = min(dead.numel() / (sae.cfg.d_in // 2), 1.0)
    auxk = scale * (z_aux @ sae.W_dec - err.detach()).pow(2).sum() / total_variance
    return fvu, auxk


def test_sparse_forward_backward_matches_dense_autograd():
    sae = random_sae()
    x = torch.randn(64, 16, requires_grad=True)
    # Latents 3..11 are "dead"; pick some that are also in this batch's top-k to cover overlaps.
    with torch.no_grad():
        top = ((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc).topk(5).indices
    dead = torch.unique(torch.cat([torch.arange(3, 12), top[:2, 0]]))
    tv = (x.detach() - x.detach().mean(0)).pow(2).sum()

    out = sae.training_loss(x, dead, tv)
    (out.fvu + out.auxk / 32).backward()
    fast = {name: p.grad.clone() for name, p in sae.named_parameters()} | {"x": x.grad.clone()}
    sae.zero_grad()
    x.grad = None

    fvu, auxk = dense_reference(sae, x, dead, tv)
    (fvu + auxk / 32).backward()
    torch.testing.assert_close(out.fvu, fvu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.auxk, auxk, rtol=1e-5, atol=1e-6)
    assert auxk > 0
    for name, p in [*sae.named_parameters(), ("x", x)]:
        torch.testing.assert_close(fast[name], p.grad, rtol=1e-4, atol=1e-6, msg=f"grad of {name}")


def test_decode_topk_grads_match_dense():
    sae = random_sae()
    values = torch.rand(8, 5, requires_grad=True)
    indices = torch.stack([torch.randperm(96)[:5] for _ in range(8)])
    target = torch.randn(8, 16)
    (sae.decode_topk(values, indices) - target).pow(2).sum().backward()
    fast_v, fast_W = values.grad.clone(), sae.W_dec.grad.clone()
    values.grad = None
    sae.zero_grad()
    z = torch.zeros(8, 96).scatter(1, indices, values)
    (sae.decode(z) - target).pow(2).sum().backward()
    torch.testing.assert_close(fast_v, values.grad)
    torch.testing.assert_close(fast_W, sae.W_dec.grad)


def test_public_api_takes_raw_activations():
    sae = random_sae(norm_scale=0.05)
    x = torch.randn(2, 7, 16) * 20  # raw scale, with a [batch, pos] prefix
    z = sae.encode(x)
    assert z.shape == (2, 7, 96)
    assert ((z > 0).sum(-1) <= 5).all() and (z >= 0).all() and ((z != 0).sum(-1) == 5).all()
    values, indices = sae.encode_topk(x)
    torch.testing.assert_close(torch.gather(z, -1, indices), values)
    # Latents are computed from the normalised activations...
    pre = (x * 0.05 - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    torch.testing.assert_close(values.sort(-1).values, pre.topk(5).values.relu().sort(-1).values)
    # ...and decoding returns raw units.
    torch.testing.assert_close(sae.decode(z), (z @ sae.W_dec + sae.b_dec) / 0.05)
    torch.testing.assert_close(sae(x), sae.decode(z), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sae.decode_topk(values, indices), sae.decode(z), rtol=1e-5, atol=1e-4)


def test_decoder_norm_invariant_and_gradient_projection():
    sae = random_sae()
    sae.normalize_decoder_()
    x = torch.randn(32, 16)
    sae.training_loss(x).fvu.backward()
    sae.remove_parallel_grads_()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-6
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(96))


def test_init_from_sample_sets_scale_and_median():
    sae = SAE(SAEConfig(d_in=8, n_latents=32, k=2))
    x = torch.randn(4000, 8) * 7 + 3
    sae.init_from_sample(x)
    assert abs((x * sae.cfg.norm_scale).pow(2).sum(1).mean().item() - 8) < 1e-3
    # The geometric median ignores a few huge outliers; the mean does not.
    outliers = torch.cat([torch.zeros(200, 2), torch.full((5, 2), 1e4)])
    assert geometric_median(outliers).abs().max() < 1.0 < outliers.mean(0).abs().max()


def test_saelens_round_trip_keeps_weights_encodings_and_metadata(tmp_path):
    sae = random_sae(
        norm_scale=0.3,
        model="m",
        layer=4,
        hook_point="resid_post",
        training_data={"data": "builtin:corpus-slice", "sha256": "ab"},
        training_tokens=1234,
    )
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 5 and cfg["d_sae"] == 96
    assert cfg["metadata"]["hook_name"] == "blocks.4.hook_resid_post"
    loaded = SAE.load(tmp_path / "s")
    assert loaded.cfg == sae.cfg
    for name, p in sae.named_parameters():
        torch.testing.assert_close(getattr(loaded, name), p, rtol=1e-6, atol=1e-6)
    x = torch.randn(50, 16) * 3
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)


def test_saelens_weights_have_normalisation_folded_in(tmp_path):
    """The exported tensors alone (SAELens' math) give our latents on raw activations."""
    from safetensors.torch import load_file

    sae = random_sae(norm_scale=0.3)
    sae.save(tmp_path)
    w = load_file(str(tmp_path / "sae_weights.safetensors"))
    x = torch.randn(20, 16) * 5
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    values, idx = pre.topk(5)
    z = torch.zeros_like(pre).scatter(1, idx, values.relu())
    torch.testing.assert_close(z, sae.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z @ w["W_dec"] + w["b_dec"], sae.decode(z), rtol=1e-5, atol=1e-5)


def write_sparsify_dir(path, d=16, n=96, k=5, seed=1):
    """A directory laid out like sparsify's SparseCoder.save_to_disk."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(n, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    tensors = {
        "encoder.weight": torch.randn(n, d, generator=g),
        "encoder.bias": torch.randn(n, generator=g) * 0.1,
        "W_dec": W_dec,
        "b_dec": torch.randn(d, generator=g),
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(
        json.dumps(
            {
                "activation": "topk",
                "expansion_factor": 6,
                "normalize_decoder": True,
                "num_latents": 0,
                "k": k,
                "multi_topk": False,
                "skip_connection": False,
                "transcode": False,
                "d_in": d,
            }
        )
    )
    return tensors


def test_load_sparsify_format(tmp_path):
    t = write_sparsify_dir(tmp_path / "sp")
    sae = SAE.load(tmp_path / "sp")
    assert (sae.cfg.d_in, sae.cfg.n_latents, sae.cfg.k) == (16, 96, 5)
    x = torch.randn(30, 16)
    # sparsify's encode: relu(linear(x - b_dec)) then top-k; decode: sum acts * W_dec rows + b_dec.
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    values, idx = pre.topk(5)
    expected = torch.zeros_like(pre).scatter(1, idx, values)
    torch.testing.assert_close(sae.encode(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), expected @ t["W_dec"] + t["b_dec"], rtol=1e-5, atol=1e-5)


def _python_with(module: str, env_var: str) -> str | None:
    """A python that can import `module`: $env_var, else this one, else None."""
    if os.environ.get(env_var):
        return os.environ[env_var]
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
    return sys.executable if probe.returncode == 0 else None


@pytest.mark.slow  # importing sae_lens alone takes ~10 s
def test_real_sae_lens_loads_our_sae_and_encodes_identically(tmp_path):
    python = _python_with("sae_lens", "SAESTEER_SAELENS_PYTHON")
    if python is None:
        pytest.skip("sae_lens not importable; set SAESTEER_SAELENS_PYTHON to a python that has it")
    sae = random_sae(norm_scale=0.3, model="m", layer=2)
    sae.save(tmp_path / "s")
    x = torch.randn(40, 16) * 4
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    script = textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file, save_file
        from sae_lens import SAE
        sae = SAE.load_from_disk({str(tmp_path / "s")!r}, device="cpu")
        x = load_file({str(tmp_path / "x.safetensors")!r})["x"]
        with torch.no_grad():
            save_file({{"z": sae.encode(x), "x_hat": sae.decode(sae.encode(x))}}, {str(tmp_path / "out.safetensors")!r})
        print(type(sae).__name__, sae.cfg.k)
    """)
    run = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-2:] == ["TopKSAE", "5"]
    from safetensors.torch import load_file

    theirs = load_file(str(tmp_path / "out.safetensors"))
    torch.testing.assert_close(theirs["z"], sae.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs["x_hat"], sae(x), rtol=1e-5, atol=1e-4)


def test_real_sparsify_sae_loads_and_encodes_identically(tmp_path):
    python = _python_with("sparsify", "SAESTEER_SPARSIFY_PYTHON")
    if python is None:
        pytest.skip("sparsify not importable; set SAESTEER_SPARSIFY_PYTHON to a python that has it")
    script = textwrap.dedent(f"""
        import torch
        from safetensors.torch import save_file
        from sparsify import SparseCoder, SparseCoderConfig
        torch.manual_seed(0)
        sae = SparseCoder(16, SparseCoderConfig(num_latents=96, k=5))
        with torch.no_grad():
            sae.encoder.bias.normal_(0, 0.1); sae.b_dec.normal_()
        sae.save_to_disk({str(tmp_path / "sp")!r})
        x = torch.randn(30, 16)
        with torch.no_grad():
            out = sae(x)
        save_file({{"x": x, "acts": out.latent_acts, "idx": out.latent_indices, "x_hat": out.sae_out}},
                  {str(tmp_path / "out.safetensors")!r})
    """)
    run = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    from safetensors.torch import load_file

    theirs = load_file(str(tmp_path / "out.safetensors"))
    sae = SAE.load(tmp_path / "sp")
    z = torch.zeros(30, 96).scatter(1, theirs["idx"], theirs["acts"])
    torch.testing.assert_close(sae.encode(theirs["x"]), z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(theirs["x"]), theirs["x_hat"], rtol=1e-5, atol=1e-4)


def test_errors_are_one_line_saesteer_errors(tmp_path):
    sae = random_sae()
    with pytest.raises(SAEError, match="d=17 but the SAE expects d_in=16"):
        sae.encode(torch.randn(3, 17))
    with pytest.raises(SaesteerError, match="k <= n_latents"):
        SAEConfig(d_in=4, n_latents=8, k=9)
    with pytest.raises(SAEError, match="none of"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "cfg.json").write_text("{}")
        SAE.load(tmp_path / "empty")
    with pytest.raises(SAEError, match="cannot read SAE"):
        SAE.load(tmp_path / "missing")
    sae.save(tmp_path / "s")
    shutil.copy(tmp_path / "s" / "cfg.json", tmp_path / "cfg.bak")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(SAEError, match="'gated' is not supported"):
        SAE.load(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    with pytest.raises(SAEError, match="needs a threshold"):
        SAE.load(tmp_path / "s")
    foreign = {**cfg, "metadata": {"model_name": "gpt2", "hook_name": "blocks.7.hook_resid_pre"}}
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(foreign))  # an SAELens file saesteer did not write
    assert (SAE.load(tmp_path / "s").cfg.layer, SAE.load(tmp_path / "s").cfg.hook_point) == (7, "resid_pre")
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "d_in": 15}))
    with pytest.raises(SAEError, match="shape"):
        SAE.load(tmp_path / "s")
    shutil.copy(tmp_path / "cfg.bak", tmp_path / "s" / "cfg.json")
    weights = tmp_path / "s" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SAEError, match="cannot read SAE"):
        SAE.load(tmp_path / "s")


@pytest.mark.slow
def test_real_sae_lens_loads_the_shipped_sae(tmp_path):
    """The SAE shipped in the package (bf16, SAELens format) loads with the real sae_lens and encodes
    like ours on activation-sized inputs."""
    from saesteer.artefacts import shipped_dir

    python = _python_with("sae_lens", "SAESTEER_SAELENS_PYTHON")
    if python is None:
        pytest.skip("sae_lens not importable; set SAESTEER_SAELENS_PYTHON to a python that has it")
    path = shipped_dir() / "sae"
    ours = SAE.load(path)
    assert json.loads((path / "cfg.json").read_text())["dtype"] == "bfloat16"
    x = torch.randn(64, ours.cfg.d_in) * 6  # residual norms ~ 140 at d=576
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    script = textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file, save_file
        from sae_lens import SAE
        sae = SAE.load_from_disk({str(path)!r}, device="cpu", dtype="float32")
        x = load_file({str(tmp_path / "x.safetensors")!r})["x"]
        with torch.no_grad():
            save_file({{"z": sae.encode(x).contiguous()}}, {str(tmp_path / "out.safetensors")!r})
        print(type(sae).__name__, sae.cfg.k, sae.cfg.d_sae)
    """)
    run = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-3:] == ["TopKSAE", str(ours.cfg.k), str(ours.cfg.n_latents)]
    from safetensors.torch import load_file

    theirs = load_file(str(tmp_path / "out.safetensors"))["z"]
    torch.testing.assert_close(theirs, ours.encode(x), rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------------------- evaluation


def exact_sae(d: int) -> SAE:
    """Latents +e_i and -e_i with k = d reconstruct any activation exactly (no zero coordinates)."""
    sae = SAE(SAEConfig(d_in=d, n_latents=2 * d, k=d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_reconstruction_metrics():
    sae = exact_sae(4)
    x = torch.tensor([[1.0, 2, 3, 4], [2, 3, 4, 5], [1, 1, 1, 1], [3, 1, 2, 2]])
    m = reconstruction_metrics(sae, x, batch_size=3)
    assert m["fvu"] < 1e-10 and m["l0"] == 4 and m["tokens"] == 4
    assert m["dead_frac"] == 0.5  # the -e_i latents never fire on positive data
    assert m["dense_frac"] == 0.5  # each +e_i fires on every token
    with pytest.raises(SAEError, match="NaN"):
        reconstruction_metrics(sae, torch.full((2, 4), float("nan")))
    with pytest.raises(SAEError, match="expects"):
        reconstruction_metrics(sae, torch.ones(2, 5))


def test_spliced_metrics_on_tiny_model(tiny_model_dir):
    from saesteer.models import load_model

    loaded = load_model(str(tiny_model_dir), device="cpu")
    ids = torch.randint(3, 400, (4, 16))
    ids[:, 0] = loaded.tokenizer.bos_token_id
    perfect = spliced_metrics(
        exact_sae(64), loaded.model, ids, layer=1, batch_size=3, skip_ids=[loaded.tokenizer.bos_token_id]
    )
    clean = loaded.model(input_ids=ids, labels=ids).loss.item()
    assert perfect["ce_clean"] == pytest.approx(clean, rel=1e-5)
    assert perfect["ce_sae"] == pytest.approx(clean, rel=1e-4) and perfect["kl_sae"] < 1e-4
    assert perfect["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert perfect["ce_zero"] != pytest.approx(clean, rel=1e-3)  # zero-ablation does change the model
    noisy = SAE(SAEConfig(d_in=64, n_latents=128, k=2))
    worse = spliced_metrics(noisy, loaded.model, ids, layer=1, batch_size=4)
    assert worse["kl_sae"] > 1e-3 and worse["ce_clean"] == pytest.approx(perfect["ce_clean"], rel=1e-6)
    assert worse["loss_recovered"] == pytest.approx(
        (worse["ce_zero"] - worse["ce_sae"]) / (worse["ce_zero"] - worse["ce_clean"])
    )
