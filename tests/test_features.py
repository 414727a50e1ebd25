import pytest
import torch
from conftest import make_tokenizer

from saesteer.artefacts import clear_cache, load_sae
from saesteer.errors import SaesteerError
from saesteer.features import (
    DiscoverConfig,
    auroc,
    contrast,
    diff_in_means,
    find_refusal_features,
    logit_lens,
    summary_markdown,
    top_contexts,
    topic_feature,
)
from saesteer.hooks import residual_at
from saesteer.models import chat_prompts
from saesteer.sae import SAE, SAEConfig


@pytest.fixture(scope="module")
def loaded(tiny_loaded):
    return tiny_loaded


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sae")
    SAE(SAEConfig(d_in=64, n_latents=128, k=8, layer=2, model="tiny-llama")).save(folder)
    clear_cache()
    return str(folder)


def test_auroc_matches_pairwise_definition():
    g = torch.Generator().manual_seed(0)
    pos, neg = (
        torch.randint(0, 4, (7, 3), generator=g).float(),
        torch.randint(0, 4, (9, 3), generator=g).float(),
    )
    pairs = (pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()
    torch.testing.assert_close(auroc(pos, neg), pairs.mean((0, 1)))
    assert auroc(torch.ones(3, 1), torch.zeros(4, 1)).item() == 1.0


def test_contrast_finds_the_planted_feature():
    g = torch.Generator().manual_seed(1)
    refusal, compliance = torch.rand(20, 10, generator=g), torch.rand(30, 10, generator=g)
    refusal[:, 6] += 2
    stats = contrast(refusal, compliance)
    assert int(stats["effect_size"].argmax()) == 6 and stats["auroc"][6] == 1.0


def test_diff_in_means_and_logit_lens(loaded):
    harmful, harmless = ["the quick brown fox"] * 3, ["over the lazy dog"] * 2
    direction = diff_in_means(loaded, harmful, harmless, layer=1, tokens=2)
    rendered = chat_prompts(
        loaded, [[{"role": "user", "content": harmful[0]}], [{"role": "user", "content": harmless[0]}]]
    )
    acts = [
        residual_at(loaded.model, loaded.tokenizer(r, return_tensors="pt")["input_ids"], 1)[0, -2:].mean(0)
        for r in rendered
    ]
    torch.testing.assert_close(direction, acts[0] - acts[1], rtol=1e-5, atol=1e-5)
    tokens = logit_lens(loaded, direction, k=5)
    assert len(tokens) == 5 and all(isinstance(t, str) for t in tokens)


def test_top_contexts_peak_at_the_max():
    ids = torch.arange(40).reshape(2, 20)
    codes = torch.zeros(2, 20, 3)
    codes[1, 9, 2], codes[0, 4, 2] = 5.0, 2.0
    found = top_contexts(make_tokenizer(), ids, codes, feature=2, n=3, window=3)
    assert [c["value"] for c in found] == [5.0, 2.0]
    assert found[0]["acts"][found[0]["peak"]] == 5.0


def test_discover_end_to_end_on_tiny_model(loaded, sae_dir):
    harmful = ["the quick brown fox jumps", "sparse autoencoders steer", "over the lazy dog", "brown fox"] * 2
    harmless = ["models jump", "the dog", "quick steer", "lazy fox"]

    def judge(reply):
        return "fox" in reply  # a scripted judge: the tiny model's output is noise

    config = DiscoverConfig(
        n_candidates=3,
        n_attribution=3,
        max_corpus_freq=1.0,
        min_refusal_freq=0.0,
        corpus_tokens=256,
        screen_values=(4.0,),
        screen_prompts=4,
        max_new_tokens=4,
    )
    result = find_refusal_features(loaded, sae_dir, harmful, harmless, judge, config, progress=False)
    sources = [c["source"] for c in result.candidates]
    assert 3 <= len(sources) <= 6 and set(sources) <= {"contrast", "attribution", "both"}
    assert sum(s != "attribution" for s in sources) == 3 and sum(s != "contrast" for s in sources) == 3
    first = result.candidates[0]
    assert first["screen"][0]["value"] == 4.0 and 0 <= first["screen"][0]["harmful_refusal"] <= 1
    scores = [c["screen"][0]["score"] for c in result.candidates]
    assert scores == sorted(scores, reverse=True)
    assert "| feature |" in summary_markdown(result)
    control = topic_feature(
        loaded, sae_dir, ["quick brown fox"] * 3, ["lazy dog models"] * 3, max_corpus_freq=1.0
    )
    assert 0 <= control["feature"] < 128


def test_refusal_attribution_is_the_derivative_along_each_decoder_direction(loaded, sae_dir):
    from saesteer.artefacts import load_sae
    from saesteer.features import refusal_attribution, reply_logprob

    sae = load_sae(sae_dir)
    prompts, refusals, compliances = (
        ["the quick brown fox", "over the lazy dog"],
        ["no, never", "I will not"],
        ["sure, jumps", "here it is"],
    )
    scores = refusal_attribution(loaded, sae, prompts, refusals, compliances, batch_size=1)
    assert scores.shape == (sae.cfg.n_latents,)

    def gap(
        feature: int, eps: float
    ) -> float:  # mean log p(refusal) - log p(compliance), `eps` units of the feature added
        offset = eps * sae.W_dec[feature].float() / sae.cfg.norm_scale
        with torch.no_grad():
            return float(
                reply_logprob(loaded, sae.cfg.layer, "resid_post", list(zip(prompts, refusals)), offset)
                - reply_logprob(loaded, sae.cfg.layer, "resid_post", list(zip(prompts, compliances)), offset)
            ) / len(prompts)

    for feature in (int(scores.argmax()), int(scores.argmin())):
        numeric = (gap(feature, 1e-2) - gap(feature, -1e-2)) / 2e-2
        assert numeric == pytest.approx(float(scores[feature]), rel=0.05, abs=1e-3)


def test_threshold_for_recall():
    from saesteer.features import threshold_for_recall

    scores = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.3])
    threshold = threshold_for_recall(scores, 0.6)
    assert (scores > threshold).sum() == 3
    assert (scores > threshold_for_recall(scores, 1.0)).all()


def test_fit_loss_is_the_nll_of_steered_decoding(loaded, sae_dir):
    """Teacher forcing with the clamp's schedule (prompt at full strength, reply token t at decay**t) scores
    the replies exactly as steered generation would, token by token with a KV cache (a batch of replies
    of different lengths: the mean is over all their tokens)."""
    from saesteer.features import _clamped_reply_nll
    from saesteer.steering import SAESteer, feature_directions

    sae, tokenizer = load_sae(sae_dir), loaded.tokenizer
    exchanges = [
        ("the quick brown fox", "no, never the lazy dog" + tokenizer.eos_token),
        ("sparse autoencoders steer models over the lazy dog", "no" + tokenizer.eos_token),
    ]
    features, values = [3, 7], [5.0, 2.0]
    clamped = feature_directions(sae, features, "cpu")
    nll = _clamped_reply_nll(loaded, sae, sae.cfg.layer, *clamped, torch.tensor(values), 0.7, exchanges)
    steering = SAESteer(sae=sae_dir, features=features, values=values, decay=0.7)
    logps = []
    for prompt, reply in exchanges:
        rendered = chat_prompts(loaded, [[{"role": "user", "content": prompt}]])[0]
        ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt").input_ids
        reply_ids = tokenizer(reply, add_special_tokens=False).input_ids
        with steering.applied(loaded), torch.no_grad():
            out = loaded.model(input_ids=ids, use_cache=True)
            logps.append(out.logits[0, -1].log_softmax(-1)[reply_ids[0]])
            for token, following in zip(reply_ids, reply_ids[1:]):
                out = loaded.model(
                    input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True
                )
                logps.append(out.logits[0, -1].log_softmax(-1)[following])
    assert float(nll.detach()) == pytest.approx(-float(torch.stack(logps).mean()), rel=1e-4)
    undecayed = _clamped_reply_nll(loaded, sae, sae.cfg.layer, *clamped, torch.tensor(values), 1.0, exchanges)
    assert float(undecayed.detach()) != pytest.approx(float(nll.detach()), rel=1e-4)


def test_fit_clamp_values_lowers_the_refusal_loss(loaded, sae_dir):
    from saesteer.features import FitConfig, fit_clamp_values

    prompts = ["the quick brown fox", "over the lazy dog", "sparse autoencoders", "jumps"]
    result = fit_clamp_values(
        loaded,
        load_sae(sae_dir),
        [3, 7],
        [1.0, 1.0],
        prompts,
        0.9,
        FitConfig(steps=6, lr=2.0),
        progress=False,
    )
    assert len(result["losses"]) == 7 and result["final_loss"] < result["initial_loss"]
    assert all(v >= 0 for v in result["values"]) and result["values"] != [1.0, 1.0]
    with pytest.raises(SaesteerError, match="same, non-zero length"):
        fit_clamp_values(loaded, load_sae(sae_dir), [3], [1.0, 2.0], prompts)
