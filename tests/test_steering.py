import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saesteer.artefacts import clear_cache, load_sae, save_direction
from saesteer.errors import SaesteerError
from saesteer.hooks import Rows, residual_at
from saesteer.models import chat_prompts, reference_generate
from saesteer.sae import SAE, SAEConfig
from saesteer.steering import (
    METHODS,
    Ablate,
    ActAdd,
    Conditional,
    SAESteer,
    Steering,
    SystemPrompt,
    steering_from_dict,
)

QUESTIONS = ["the quick brown fox", "sparse autoencoders steer models over the lazy dog", "jumps"]


@pytest.fixture(scope="module")
def loaded(tiny_loaded):
    return tiny_loaded


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=64, n_latents=256, k=8, norm_scale=0.37, layer=1, model="tiny-llama"))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
        sae.b_dec.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("sae")
    sae.save(folder)
    clear_cache()
    return str(folder)


@pytest.fixture(scope="module")
def direction_file(tmp_path_factory, loaded):
    path = tmp_path_factory.mktemp("dir") / "refusal.safetensors"
    save_direction(
        path, torch.randn(64, generator=torch.Generator().manual_seed(2)), layer=2, model="tiny-llama"
    )
    return str(path)


def prompts(loaded, questions=QUESTIONS):
    return chat_prompts(loaded, [[{"role": "user", "content": q}] for q in questions])


def steered_generate(loaded, steering, questions=QUESTIONS, **kw):
    with steering.applied(loaded):
        return reference_generate(loaded, prompts(loaded, questions), max_new_tokens=6, **kw)


def test_clamp_shortcut_equals_full_decode_plus_error(loaded, sae_dir):
    sae = load_sae(sae_dir)
    h = torch.randn(4, 50, 64) * 3
    z = sae.encode(h)
    active = int(z[0, 0].nonzero()[0])  # one feature that fires, one that (almost surely) does not
    features, values = [active, int((z == 0).all(0).all(0).nonzero()[0])], [7.5, 3.0]
    # The shortcut skips the full encoder where pre-activations are <= 0: cover all three cases.
    pre = (h * 0.37 - sae.b_dec) @ sae.W_enc[active] + sae.b_enc[active]
    fired = z[..., active] > 0
    assert fired.any() and (pre <= 0).any() and ((pre > 0) & ~fired).any()
    steering = SAESteer(sae=sae_dir, features=features, values=values)
    [(layer, point, fn)] = steering.edits(loaded)
    assert (layer, point) == (1, "resid_post")
    clamped = z.clone()
    clamped[..., features] = torch.tensor(values)
    expected = sae.decode(clamped) + (h - sae.decode(z))
    torch.testing.assert_close(fn(h, Rows.prompts(4)), expected, rtol=1e-5, atol=1e-4)
    add = SAESteer(sae=sae_dir, features=features, values=values, mode="add").edits(loaded)[0][2]
    add = add(h, Rows.prompts(4))
    torch.testing.assert_close(
        add, h + (torch.tensor(values) @ sae.W_dec[features]) / 0.37, rtol=1e-5, atol=1e-4
    )


def test_relative_values_scale_by_max_acts(sae_dir):
    steering = SAESteer(sae=sae_dir, features=[3, 4], values=[2.0, 4.0], relative=True, max_acts=[1.5, 0.5])
    assert steering.targets().tolist() == [3.0, 2.0]


@pytest.mark.parametrize(
    "positions, prefill, decode", [("all", True, True), ("prompt", True, False), ("generated", False, True)]
)
def test_steering_only_chosen_positions(loaded, sae_dir, positions, prefill, decode, monkeypatch):
    steering = SAESteer(sae=sae_dir, features=[5], values=[9.0], positions=positions)
    seen = []
    [(layer, point, fn)] = steering.edits(loaded)

    def recording(h, rows):
        new = fn(h, rows)
        if new is not None:
            seen.append(h.shape[1])
        return new

    monkeypatch.setattr(SAESteer, "edits", lambda self, _loaded: [(layer, point, recording)])
    steered_generate(loaded, steering)
    assert any(t > 1 for t in seen) == prefill and any(t == 1 for t in seen) == decode


def test_batched_steered_generation_equals_unbatched(loaded, sae_dir):
    steering = SAESteer(sae=sae_dir, features=[5, 17], values=[6.0, 4.0])
    batched = steered_generate(loaded, steering, batch_size=3)
    single = [steered_generate(loaded, steering, [q], batch_size=1)[0] for q in QUESTIONS]
    assert batched == single
    assert batched != steered_generate(loaded, Steering(), batch_size=3), (
        "steering should change the tiny model's output"
    )


def test_conditional_gate_off_is_byte_identical(loaded, sae_dir, direction_file):
    inner = {"method": "sae", "sae": sae_dir, "features": [5], "values": [50.0]}
    never = Conditional(steering=inner, detector=direction_file, threshold=float("inf"))
    always = Conditional(steering=inner, detector=direction_file, threshold=float("-inf"))
    plain, steered = steered_generate(loaded, Steering()), steered_generate(loaded, steering_from_dict(inner))
    assert steered_generate(loaded, never) == plain
    assert steered_generate(loaded, always) == steered
    ids = loaded.tokenizer(prompts(loaded), return_tensors="pt", padding=True, add_special_tokens=False)
    with never.applied(loaded):
        logits = loaded.model(**ids).logits
    assert torch.equal(logits, loaded.model(**ids).logits)


def test_conditional_gates_each_row(loaded, sae_dir, direction_file):
    inner = {"method": "sae", "sae": sae_dir, "features": [5], "values": [50.0]}
    probe = Conditional(steering=inner, detector=direction_file)
    ids = loaded.tokenizer(prompts(loaded), return_tensors="pt", padding=True, add_special_tokens=False)
    scores = probe.scores(loaded, ids["input_ids"], ids["attention_mask"])
    threshold = float(scores.sort().values[1:].mean())  # halfway between the top two: flags one row
    flagged = (scores > threshold).tolist()
    mixed = steered_generate(
        loaded, Conditional(steering=inner, detector=direction_file, threshold=threshold)
    )
    plain, steered = steered_generate(loaded, Steering()), steered_generate(loaded, steering_from_dict(inner))
    order = sorted(
        range(3), key=lambda i: len(prompts(loaded)[i])
    )  # generate() batches by length; rows are per prompt
    assert sum(flagged) == 1 and order
    assert mixed == [s if f else p for s, p, f in zip(steered, plain, flagged)]


def test_actadd_and_ablation(loaded, direction_file):
    ids = torch.tensor([[5, 6, 7, 8]])
    clean = residual_at(loaded.model, ids, 2)
    with ActAdd(direction=direction_file, alpha=3.0).applied(loaded):
        added = residual_at(loaded.model, ids, 2)
    r = torch.randn(64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(added, clean + 3.0 * r / r.norm())
    with Ablate(direction=direction_file).applied(loaded):
        ablated = residual_at(loaded.model, ids, 3)
    assert (ablated @ (r / r.norm())).abs().max() < 1e-4


def test_system_prompt_replaces_system_turn():
    conv = SystemPrompt(prompt="Be safe.").prepare(
        [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]
    )
    assert conv == [{"role": "system", "content": "Be safe."}, {"role": "user", "content": "hi"}]


def test_specs_round_trip_through_json(sae_dir, direction_file):
    specs = [
        Steering(),
        SystemPrompt(),
        SAESteer(sae=sae_dir, features=[1], values=[2.0], positions="prompt"),
        ActAdd(direction=direction_file, alpha=2.0, layer=1),
        Ablate(direction=direction_file),
        Conditional(
            steering={"method": "actadd", "direction": direction_file}, detector=direction_file, threshold=0.5
        ),
    ]
    for spec in specs:
        again = steering_from_dict(json.loads(json.dumps(spec.to_dict())))
        assert type(again) is type(spec) and again.to_dict() == spec.to_dict()


def test_errors(loaded, sae_dir, tmp_path):
    with pytest.raises(SaesteerError, match="unknown steering method 'magic'"):
        steering_from_dict({"method": "magic"})
    with pytest.raises(SaesteerError, match="feature index 999 is out of range"):
        SAESteer(sae=sae_dir, features=[999], values=[1.0]).edits(loaded)
    wide = SAE(SAEConfig(d_in=32, n_latents=64, k=4, layer=1))
    wide.save(tmp_path / "wide")
    with pytest.raises(SaesteerError, match="d_in=32 but tiny-llama has d_model=64"):
        SAESteer(sae=str(tmp_path / "wide"), features=[1], values=[1.0]).edits(loaded)
    with pytest.raises(SaesteerError, match="layer 7 is out of range"):
        SAESteer(sae=sae_dir, features=[1], values=[1.0], layer=7).edits(loaded)
    with pytest.raises(SaesteerError, match="unknown positions"):
        SAESteer(sae=sae_dir, features=[1], values=[1.0], positions="middle").edits(loaded)
    with pytest.raises(SaesteerError, match="cannot read direction file"):
        ActAdd(direction=str(tmp_path / "none.safetensors")).edits(loaded)
    with pytest.raises(SaesteerError, match="bad sae steering field colour"):
        steering_from_dict({"method": "sae", "sae": sae_dir, "features": [1], "values": [1.0], "colour": 1})


def test_schedules_release_and_decay_the_clamp(loaded, sae_dir):
    full = SAESteer(sae=sae_dir, features=[5], values=[60.0])
    released = SAESteer(sae=sae_dir, features=[5], values=[60.0], generated_tokens=2)
    prompt_only = SAESteer(sae=sae_dir, features=[5], values=[60.0], generated_tokens=0)
    [(_, _, fn)] = released.edits(loaded)
    prefill, step = torch.randn(2, 7, 64), torch.randn(2, 1, 64)

    def decoding(t: int) -> Rows:  # two rows feeding their generated token t
        return Rows([0, 1], [[7] * (t + 1), [7] * (t + 1)], prefill=False)

    assert fn(prefill, Rows.prompts(2)) is not None
    assert [fn(step, decoding(t)) is None for t in range(3)] == [False, False, True]  # t=2 released
    mixed = fn(step, Rows([0, 1], [[7], [7, 7, 7]], prefill=False))  # rows at t=0 and t=2
    assert not torch.equal(mixed[0], step[0]) and torch.equal(mixed[1], step[1])
    [(_, _, decaying)] = SAESteer(sae=sae_dir, features=[5], values=[60.0], mode="add", decay=0.5).edits(
        loaded
    )
    first = decaying(prefill, Rows.prompts(2)) - prefill
    assert torch.allclose((decaying(step, decoding(0)) - step)[0, 0], first[0, 0], atol=1e-4)  # t=0: full
    assert torch.allclose((decaying(step, decoding(1)) - step)[0, 0], 0.5 * first[0, 0], atol=1e-4)  # halved
    plain, all_steps = steered_generate(loaded, Steering()), steered_generate(loaded, full)
    assert steered_generate(loaded, prompt_only) != all_steps and plain != all_steps
    for bad in ({"decay": 0.0}, {"generated_tokens": -1}):
        with pytest.raises(SaesteerError):
            SAESteer(sae=sae_dir, features=[5], values=[1.0], **bad)


def test_release_on_a_refusal_opener_frees_each_row_once_its_reply_holds_one(loaded, sae_dir):
    steering = SAESteer(sae=sae_dir, features=[5], values=[60.0], release_on="decline")
    [(_, _, steer)] = steering.edits(loaded)
    prefill, step = torch.randn(2, 7, 64), torch.randn(2, 1, 64)
    rows = Rows.prompts(2)
    assert not torch.equal(steer(prefill, rows)[1], prefill[1])
    decline = loaded.tokenizer("Well, I can't", add_special_tokens=False).input_ids
    other = loaded.tokenizer("The quick brown fox jumps", add_special_tokens=False).input_ids
    for t in range(len(decline)):
        replies = [decline[: t + 1], [other[i % len(other)] for i in range(t + 1)]]
        new = steer(step, Rows(rows.keys, replies, prefill=False))
        assert torch.equal(new[0], step[0]) == (t == len(decline) - 1)  # released once "i can't" is complete
        assert not torch.equal(new[1], step[1])
    assert not torch.equal(steer(prefill, Rows.prompts(2))[0], prefill[0])  # new rows are steered again
    # in generation: the tiny model never declines, so the release never fires
    clamp = SAESteer(sae=sae_dir, features=[5], values=[60.0])
    assert (
        steered_generate(loaded, steering)
        == steered_generate(loaded, clamp)
        != steered_generate(loaded, Steering())
    )
    with pytest.raises(SaesteerError, match="unknown release_on 'never'"):
        SAESteer(sae=sae_dir, features=[5], values=[1.0], release_on="never")


def test_a_release_on_the_first_token_is_the_prompt_only_clamp(loaded, sae_dir, direction_file, monkeypatch):
    """With a marker every text holds, each row is released after its first generated token: exactly the
    clamp that steers only the prompt, in batched left-padded generation and behind a gate that flags all."""
    from saesteer import steering as steering_module

    monkeypatch.setitem(steering_module.RELEASE_MARKERS, "decline", ("",))
    released = SAESteer(sae=sae_dir, features=[5], values=[60.0], decay=0.8, release_on="decline")
    prompt_only = SAESteer(sae=sae_dir, features=[5], values=[60.0], generated_tokens=0)
    decaying = SAESteer(sae=sae_dir, features=[5], values=[60.0], decay=0.8)
    assert steered_generate(loaded, released) == steered_generate(loaded, prompt_only)
    assert steered_generate(loaded, released) != steered_generate(loaded, decaying)
    gate = {"detector": direction_file, "threshold": -1e9}
    gated = Conditional(steering=released.to_dict(), **gate)
    assert steered_generate(loaded, gated) == steered_generate(loaded, prompt_only)


def test_canned_and_prefixed_replies(loaded):
    text = "the lazy dog"
    canned = steered_generate(
        loaded, steering_from_dict({"method": "reply_prefix", "text": text, "stop": True})
    )
    assert canned == [text] * len(QUESTIONS)
    prefixed = steered_generate(loaded, steering_from_dict({"method": "reply_prefix", "text": text}))
    assert all(r.startswith(text) for r in prefixed)
    ids = loaded.tokenizer(text, add_special_tokens=False).input_ids
    for stop, after in ((False, None), (True, loaded.tokenizer.eos_token_id)):
        [(_, point, force)] = steering_from_dict(
            {"method": "reply_prefix", "text": text, "stop": stop}
        ).edits(loaded)
        assert point == "logits"
        chosen = []
        for t in range(len(ids) + 2):  # the prefill chooses reply token 0, decoding step t token t
            rows = Rows.prompts(1) if t == 0 else Rows([0], [[7] * t], prefill=False)
            forced = force(torch.zeros(1, 1, 400), rows)
            chosen.append(None if forced is None else int(forced[0, -1].argmax()))
        assert chosen[: len(ids) + 1] == ids + [after]  # then the model continues (prefix) or must stop
        assert chosen[-1] is None
    with pytest.raises(SaesteerError, match="non-empty"):
        steering_from_dict({"method": "reply_prefix", "text": ""})


def test_conditional_canned_refusal_only_on_flagged_rows(loaded, direction_file):
    canned = {"method": "reply_prefix", "text": "the lazy dog", "stop": True}
    detector = Conditional(steering={"method": "none"}, detector=direction_file)
    scores = detector.scores(loaded, *_batch(loaded))
    threshold = float(scores.sort().values[1:].mean())  # halfway between the top two: flags one row
    gated = steered_generate(
        loaded, Conditional(steering=canned, detector=direction_file, threshold=threshold)
    )
    plain = steered_generate(loaded, Steering())
    for score, reply, unsteered in zip(scores, gated, plain):
        assert reply == ("the lazy dog" if score > threshold else unsteered)


def _batch(loaded):
    batch = loaded.tokenizer(prompts(loaded), return_tensors="pt", padding=True, add_special_tokens=False)
    return batch["input_ids"], batch["attention_mask"]


def test_stack_applies_every_part(loaded, sae_dir, direction_file):
    sae = {"method": "sae", "sae": sae_dir, "features": [5], "values": [60.0]}
    actadd = {"method": "actadd", "direction": direction_file, "alpha": 30.0}
    stack = steering_from_dict({"method": "stack", "steerings": [{"method": "system_prompt"}, sae, actadd]})
    assert (
        len(stack.edits(loaded)) == 2
        and stack.prepare([{"role": "user", "content": "x"}])[0]["role"] == "system"
    )
    assert steering_from_dict(stack.to_dict()).to_dict() == stack.to_dict()
    ids, _ = _batch(loaded)
    with stack.applied(loaded):
        both = residual_at(loaded.model, ids, 2)
    with steering_from_dict(sae).applied(loaded):
        sae_only = residual_at(loaded.model, ids, 2)
    unit = ActAdd(direction=direction_file, alpha=1.0).edits(loaded)[0][2](
        torch.zeros(1, 1, 64), Rows.prompts(1)
    )
    assert torch.allclose(both - sae_only, 30.0 * unit, atol=1e-4)  # the ActAdd part of the stack, exactly
    with pytest.raises(SaesteerError, match="stack needs"):
        steering_from_dict({"method": "stack", "steerings": []})


FIELD_NAMES = [
    "method",
    "sae",
    "features",
    "values",
    "mode",
    "positions",
    "relative",
    "max_acts",
    "layer",
    "generated_tokens",
    "decay",
    "release_on",
    "direction",
    "alpha",
    "steering",
    "detector",
    "threshold",
    "tokens",
    "text",
    "stop",
    "steerings",
    "prompt",
    "colour",
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_subnormal=False)
    | st.text(max_size=20)
    | st.sampled_from(sorted(METHODS)),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELD_NAMES), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(
    spec=st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=6)
    | st.fixed_dictionaries(
        {"method": st.sampled_from(sorted(METHODS))},
        optional={name: json_values for name in FIELD_NAMES[1:]},
    )
)
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_any_spec_is_a_steering_or_one_line_error(spec):
    """One validation path: whatever JSON a user sends, the result is a method that round-trips through its
    JSON form, or a one-line SaesteerError, never another exception."""
    try:
        steering = steering_from_dict(spec)
    except SaesteerError as err:
        assert "\n" not in str(err) and len(str(err)) < 400, str(err)
        return
    assert steering_from_dict(steering.to_dict()).to_dict() == steering.to_dict()
