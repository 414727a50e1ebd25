"""Every SAE architecture (TopK, BatchTopK, JumpReLU, ReLU) and format (SAELens, sparsify, Gemma Scope
params.npz): encode/decode against the real sae_lens, and exact clamp steering."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saesteer.artefacts import load_sae
from saesteer.errors import SaesteerError
from saesteer.hooks import Rows
from saesteer.models import reference_generate
from saesteer.sae import SAE, SAEConfig, SAEError, reconstruction_metrics
from saesteer.steering import SAESteer

sae_lens = pytest.importorskip("sae_lens")  # test extra; importing it takes ~8 s

D, N = 64, 128  # the tiny Llama's d_model (conftest), so every SAE here can steer it
HOOK = "blocks.1.hook_resid_post"
pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(sae, seed: int, threshold: bool) -> None:
    """Random weights (parameters named as in both libraries), decoder rows of norm 0.5..2, thresholds
    in (0, 2) so that some positive pre-activations stay below them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            p = getattr(sae, name)
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if name == "W_enc" else 0.5))
        sae.W_dec.mul_(torch.rand(sae.W_dec.shape[0], 1, generator=g) * 1.5 + 0.5)
        if threshold:
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=g) * 2)


def sae_lens_sae(architecture: str, seed: int = 0):
    """An inference sae_lens SAE of `architecture` with random weights, for layer 1 of the tiny Llama."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAEConfig
    from sae_lens import TopKSAE as TheirTopK
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(model_name="tiny", hook_name=HOOK)
    if architecture == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=N, metadata=meta))
    elif architecture == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=N, metadata=meta))
    else:
        sae = TheirTopK(TopKSAEConfig(d_in=D, d_sae=N, k=8, metadata=meta))
    randomize(sae, seed, threshold=architecture == "jumprelu")
    return sae


def sae_lens_batchtopk(tmp_path, seed: int = 3) -> tuple:
    """A sae_lens BatchTopK training SAE (decoder-norm rescaling on, a learnt global threshold) saved twice:
    its training checkpoint (`batchtopk`, topk_threshold) and, as sae_lens ships it, an inference JumpReLU."""
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cfg = BatchTopKTrainingSAEConfig(
        d_in=D,
        d_sae=N,
        k=8,
        rescale_acts_by_decoder_norm=True,
        metadata=SAEMetadata(model_name="tiny", hook_name=HOOK),
    )
    sae = BatchTopKTrainingSAE(cfg)
    randomize(sae, seed, threshold=False)
    sae.topk_threshold = torch.tensor(0.7, dtype=torch.double)
    sae.save_model(tmp_path / "train")
    sae.save_inference_model(tmp_path / "inference")
    return tmp_path / "train", tmp_path / "inference"


def write_gemma_scope(path, seed: int = 4) -> dict[str, np.ndarray]:
    """A params.npz laid out like Gemma Scope's: W_enc [d_in, n], W_dec [n, d_in], b_enc, threshold, b_dec."""
    rng = np.random.default_rng(seed)
    arrays = {
        "W_enc": rng.normal(0, 0.2, (D, N)),
        "W_dec": rng.normal(0, 0.5, (N, D)),
        "b_enc": rng.normal(0, 0.5, N),
        "b_dec": rng.normal(0, 0.5, D),
        "threshold": rng.uniform(0, 2, N),
    }
    arrays = {name: a.astype(np.float32) for name, a in arrays.items()}
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / "params.npz", **arrays)
    return arrays


def write_sparsify(path, seed: int = 5) -> None:
    """A folder laid out like sparsify's SparseCoder.save_to_disk (TopK, k 8)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "encoder.weight": torch.randn(N, D, generator=g) * 0.2,
        "encoder.bias": torch.randn(N, generator=g) * 0.1,
        "W_dec": torch.randn(N, D, generator=g),
        "b_dec": torch.randn(D, generator=g),
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(
        json.dumps(
            {
                "activation": "topk",
                "num_latents": N,
                "k": 8,
                "d_in": D,
                "multi_topk": False,
                "skip_connection": False,
                "transcode": False,
            }
        )
    )


def ours(architecture: str, seed: int = 6) -> SAE:
    """A saesteer SAE of `architecture` with random weights and a non-trivial norm_scale."""
    sae = SAE(
        SAEConfig(
            d_in=D,
            n_latents=N,
            k=8 if architecture == "topk" else None,
            architecture=architecture,
            norm_scale=0.37,
            layer=1,
            model="tiny",
        )
    )
    randomize(sae, seed, threshold=sae.threshold is not None)
    return sae


def inputs(seed: int = 7, shape=(40,)) -> torch.Tensor:
    return torch.randn(*shape, D, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize(
    "theirs_arch, architecture", [("jumprelu", "jumprelu"), ("standard", "relu"), ("topk", "topk")]
)
def test_sae_lens_saved_saes_encode_and_decode_like_sae_lens(tmp_path, theirs_arch, architecture):
    theirs = sae_lens_sae(theirs_arch)
    theirs.save_model(tmp_path)
    sae = SAE.load(tmp_path)
    assert (sae.cfg.architecture, sae.cfg.layer, sae.cfg.hook_point, sae.cfg.model) == (
        architecture,
        1,
        "resid_post",
        "tiny",
    )
    x = inputs()
    with torch.no_grad():
        z = theirs.encode(x)
        assert 0 < (z > 0).float().mean() < 0.7  # some latents fire, many do not
        torch.testing.assert_close(sae.encode(x), z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(z), theirs.decode(z), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), theirs(x), rtol=1e-5, atol=1e-4)


def test_sae_lens_batchtopk_loads_as_it_runs_at_inference(tmp_path):
    """A BatchTopK training checkpoint encodes like the JumpReLU sae_lens ships for inference."""
    from sae_lens import SAE as SaeLensSAE

    train_dir, inference_dir = sae_lens_batchtopk(tmp_path)
    assert json.loads((inference_dir / "cfg.json").read_text())["architecture"] == "jumprelu"
    theirs = SaeLensSAE.load_from_disk(inference_dir)
    x = inputs()
    with torch.no_grad():
        z = theirs.encode(x)
    assert 0 < (z > 0).float().mean() < 0.7
    for folder, architecture in ((train_dir, "batchtopk"), (inference_dir, "jumprelu")):
        sae = SAE.load(folder)
        assert sae.cfg.architecture == architecture and sae.cfg.k is None
        torch.testing.assert_close(sae.encode(x), z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(z), theirs.decode(z), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ["batchtopk", "jumprelu", "relu"])
def test_sae_lens_loads_our_saes_and_encodes_identically(tmp_path, architecture):
    from sae_lens import SAE as SaeLensSAE

    sae = ours(architecture)
    sae.save(tmp_path)
    theirs = SaeLensSAE.load_from_disk(tmp_path)
    again = SAE.load(tmp_path)
    assert again.cfg == sae.cfg
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(sae.encode(x)), sae(x), rtol=1e-5, atol=1e-4)


def test_gemma_scope_npz_folder_or_file(tmp_path):
    a = {name: torch.from_numpy(v) for name, v in write_gemma_scope(tmp_path / "gs").items()}
    x = inputs()
    pre = x @ a["W_enc"] + a["b_enc"]  # Gemma Scope's encoder reads x, not x - b_dec
    z = pre * (pre > a["threshold"])
    for path in (tmp_path / "gs", tmp_path / "gs" / "params.npz"):
        sae = SAE.load(path)
        assert (sae.cfg.architecture, sae.cfg.d_in, sae.cfg.n_latents, sae.cfg.layer) == (
            "jumprelu",
            D,
            N,
            None,
        )
        torch.testing.assert_close(sae.encode(x), z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), z @ a["W_dec"] + a["b_dec"], rtol=1e-5, atol=1e-4)
    write_gemma_scope(tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_82")
    assert (
        SAE.load(tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_82").cfg.layer
        == 12
    )


def test_npz_with_pickled_arrays_is_refused(tmp_path):
    np.savez(tmp_path / "params.npz", W_enc=np.array([{"not": "an array"}], dtype=object))
    with pytest.raises(SAEError, match="plain arrays"):
        SAE.load(tmp_path)
    np.savez(tmp_path / "params.npz", W_enc=np.zeros((D, N), np.float32))
    with pytest.raises(SAEError, match="missing field or tensor 'b_enc'"):
        SAE.load(tmp_path / "params.npz")


@pytest.fixture(scope="module")
def sae_paths(tmp_path_factory) -> dict[str, str]:
    """One SAE folder (or file) per (format, architecture), all able to steer the tiny Llama."""
    root = tmp_path_factory.mktemp("saes")
    for name, architecture in (
        ("sae_lens-jumprelu", "jumprelu"),
        ("sae_lens-relu", "standard"),
        ("sae_lens-topk", "topk"),
    ):
        sae_lens_sae(architecture, seed=len(name)).save_model(root / name)
    sae_lens_batchtopk(root / "sae_lens-batchtopk")
    for architecture in ("topk", "batchtopk", "jumprelu", "relu"):
        ours(architecture).save(root / f"saesteer-{architecture}")
    write_sparsify(root / "sparsify-topk")
    write_gemma_scope(root / "gemma_scope-jumprelu")
    paths = {path.name: str(path) for path in root.iterdir()}
    paths["sae_lens-batchtopk"] += "/train"
    paths["gemma_scope-jumprelu"] += "/params.npz"
    return paths


@pytest.mark.parametrize(
    "name, architecture",
    [
        ("sae_lens-topk", "topk"),
        ("sae_lens-batchtopk", "batchtopk"),
        ("sae_lens-jumprelu", "jumprelu"),
        ("sae_lens-relu", "relu"),
        ("saesteer-topk", "topk"),
        ("saesteer-batchtopk", "batchtopk"),
        ("saesteer-jumprelu", "jumprelu"),
        ("saesteer-relu", "relu"),
        ("sparsify-topk", "topk"),
        ("gemma_scope-jumprelu", "jumprelu"),
    ],
)
def test_clamp_equals_decode_of_clamped_code_plus_error(tiny_loaded, sae_paths, name, architecture):
    """x' = decode(z with z_i = c_i) + (x - decode(z)) for every architecture and format, whatever the
    decoder norms and norm_scale; the steered latents' codes come from the fast path."""
    sae = load_sae(sae_paths[name])
    assert sae.cfg.architecture == architecture
    h = inputs(shape=(3, 30))
    z = sae.encode(h)
    fires = (z > 0).float().mean((0, 1))
    order = fires.argsort().tolist()
    features, values = (
        [order[-1], order[0], order[N // 2]],
        [7.5, 3.0, 0.0],
    )  # most, least, median often active
    assert fires[features[0]] > 0
    steering = SAESteer(sae=sae_paths[name], features=features, values=values, layer=1)
    [(layer, point, fn)] = steering.edits(tiny_loaded)
    assert (layer, point) == (1, "resid_post")
    torch.testing.assert_close(
        sae.latent_codes(h, torch.tensor(features)), z[..., features], rtol=1e-5, atol=1e-5
    )
    clamped = z.clone()
    clamped[..., features] = torch.tensor(values)
    torch.testing.assert_close(
        fn(h, Rows.prompts(len(h))), sae.decode(clamped) + (h - sae.decode(z)), rtol=1e-5, atol=1e-4
    )


def test_jumprelu_sae_steers_the_tiny_model(tiny_loaded, sae_paths):
    """A Gemma-Scope-format JumpReLU SAE (no layer in its file) steers generation through SAESteer."""
    from saesteer.models import chat_prompts

    prompts = chat_prompts(
        tiny_loaded, [[{"role": "user", "content": q}] for q in ("the quick brown fox", "jumps")]
    )
    plain = reference_generate(tiny_loaded, prompts, max_new_tokens=6)
    with pytest.raises(SaesteerError, match="names no layer"):
        SAESteer(sae=sae_paths["gemma_scope-jumprelu"], features=[3], values=[50.0]).edits(tiny_loaded)
    steering = SAESteer(sae=sae_paths["gemma_scope-jumprelu"], features=[3, 9], values=[50.0, 40.0], layer=1)
    with steering.applied(tiny_loaded):
        steered = reference_generate(tiny_loaded, prompts, max_new_tokens=6)
    assert steered != plain
    assert reference_generate(tiny_loaded, prompts, max_new_tokens=6) == plain  # released after the block


@pytest.mark.parametrize("name", ["sae_lens-batchtopk", "sae_lens-relu", "gemma_scope-jumprelu"])
def test_discovery_and_probe_features_for_every_architecture(tiny_loaded, sae_paths, name):
    """Discovery's reply codes and the SAE-probe detector's features are the SAE's codes of the residual."""
    from saesteer.detectors import features_of
    from saesteer.features import reply_codes

    h = inputs(shape=(2, 5))
    torch.testing.assert_close(features_of(h, sae_paths[name]), load_sae(sae_paths[name]).encode(h))
    sae = copy.deepcopy(load_sae(sae_paths[name]))
    sae.cfg.layer = 1  # Gemma Scope's file names no layer
    codes = reply_codes(tiny_loaded, sae, [("the quick brown fox", "jumps over the lazy dog"), ("a", "b")])
    assert codes.shape == (2, N) and (codes >= 0).all()


@pytest.mark.parametrize("architecture", ["batchtopk", "jumprelu", "relu"])
def test_reconstruction_metrics_for_every_architecture(architecture):
    sae = ours(architecture)
    x = inputs(shape=(50,))
    z = sae.encode(x)
    m = reconstruction_metrics(sae, x, batch_size=16)
    assert m["l0"] == pytest.approx((z > 0).sum().item() / 50)
    assert m["dead_frac"] == pytest.approx(((z > 0).sum(0) == 0).float().mean().item())
    fvu = (x - sae.decode(z)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert m["fvu"] == pytest.approx(fvu.item(), rel=1e-4)


def test_architecture_config_and_topk_only_operations():
    with pytest.raises(SAEError, match="unknown SAE architecture 'gated'"):
        SAEConfig(d_in=4, n_latents=8, architecture="gated")
    with pytest.raises(SAEError, match="k <= n_latents"):
        SAEConfig(d_in=4, n_latents=8, architecture="topk")
    sae = ours("jumprelu")
    with pytest.raises(SAEError, match="needs a topk SAE"):
        sae.encode_topk(inputs())
    with pytest.raises(SAEError, match="only topk SAEs train"):
        sae.training_loss(inputs())


def test_saelens_registry_fails_in_one_line_offline_or_without_sae_lens(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SaesteerError, match="sae_lens cannot load no-such-release/layer_1") as err:
        load_sae("saelens:no-such-release/layer_1")
    assert "\n" not in str(err.value)
    with pytest.raises(SaesteerError, match="saelens:<release>/<sae id>"):
        load_sae("saelens:no-id")
    monkeypatch.setitem(__import__("sys").modules, "sae_lens", None)
    with pytest.raises(SaesteerError, match="needs the sae-lens package"):
        load_sae("saelens:gemma-scope-2b-pt-res-canonical/layer_1/width_16k/canonical")
