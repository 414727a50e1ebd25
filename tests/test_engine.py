"""The generation engine against the reference (HF `generate` with the steering's hooks), on tiny models of
every family: unsteered and under each steering method, alone and mixed in one continuous batch."""

import pytest
import torch
from conftest import FAMILIES, make_model, make_tokenizer, save_steering_sae

from saesteer import engine
from saesteer.artefacts import save_direction
from saesteer.engine import Engine, Reply
from saesteer.models import LoadedModel, chat_prompts, reference_generate
from saesteer.steering import steering_from_dict

QUESTIONS = [
    "the quick brown fox",
    "sparse autoencoders steer models over the lazy dog",
    "jumps",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "lazy dog",
    "Sparse autoencoders steer models.",
]


def loaded_tiny(family: str) -> LoadedModel:
    tokenizer = make_tokenizer()
    tokenizer.padding_side = "left"
    return LoadedModel(make_model(family), tokenizer, f"tiny-{family}", torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine")
    sae = save_steering_sae(folder / "sae")
    save_direction(
        folder / "dir.safetensors", torch.randn(64, generator=torch.Generator().manual_seed(2)), 2, "tiny"
    )
    return {"sae": sae, "direction": str(folder / "dir.safetensors")}


def specs(files) -> dict[str, dict]:
    sae = {"method": "sae", "sae": files["sae"], "features": [5, 17], "values": [60.0, 40.0]}
    gate = {"detector": files["direction"], "threshold": 0.0}
    return {
        "none": {"method": "none"},
        "sae": sae,
        "sae_schedule": {**sae, "decay": 0.8, "generated_tokens": 3},
        "sae_release": {**sae, "release_on": "apology"},
        "actadd": {
            "method": "actadd",
            "direction": files["direction"],
            "alpha": 30.0,
            "positions": "generated",
        },
        "ablate": {"method": "ablate", "direction": files["direction"]},
        "canned": {"method": "reply_prefix", "text": "the lazy dog", "stop": True},
        "conditional": {"method": "conditional", "steering": sae, **gate},
        "conditional_canned": {
            "method": "conditional",
            "steering": {"method": "reply_prefix", "text": "the lazy dog", "stop": True},
            **gate,
        },
    }


def reference(loaded, steering, rendered, tokens=8, batch_size=4):
    with steering.applied(loaded):
        return reference_generate(loaded, rendered, max_new_tokens=tokens, batch_size=batch_size)


def engine_replies(loaded, steering, rendered, tokens=8, rows=4):
    ids = [loaded.tokenizer(p, add_special_tokens=False).input_ids for p in rendered]
    replies = [Reply(i, e, tokens) for i, e in zip(ids, steering.row_edits(loaded, ids))]
    Engine(loaded, prefill=2, rows=rows).run(replies)
    return loaded.tokenizer.batch_decode([r.tokens for r in replies], skip_special_tokens=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unsteered_replies_equal_hf_generate_on_every_family(family):
    loaded = loaded_tiny(family)
    rendered = chat_prompts(loaded, [[{"role": "user", "content": q}] for q in QUESTIONS])
    assert engine_replies(loaded, steering_from_dict(None), rendered, 12) == reference(
        loaded, steering_from_dict(None), rendered, 12
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # the engine's own forward, and the model's own
@pytest.mark.parametrize("name", list(specs({"sae": "", "direction": ""})))
def test_each_steering_equals_its_hooks_in_hf_generate(files, family, name):
    """Per-row schedules (decay, a release after N tokens, release on an apology), the gate and forced replies
    mean the same in the engine (rows joining and leaving a continuous batch of 4) as in HF `generate`."""
    loaded = loaded_tiny(family)
    spec = specs(files)[name]
    steering = steering_from_dict(spec)
    rendered = chat_prompts(loaded, [[{"role": "user", "content": q}] for q in QUESTIONS])
    got = engine_replies(loaded, steering, rendered)
    assert got == reference(loaded, steering, rendered)
    if name != "none" and family == "llama":  # the tiny GPT-2 answers newlines whatever it is steered by
        assert got != reference(loaded, steering_from_dict(None), rendered), "the steering changes nothing"


def test_mixed_steerings_in_one_batch_equal_each_alone(files):
    """Rows of six steerings share every decoding step (and the shared-prefix cache), each row exact."""
    loaded = loaded_tiny("llama")
    rendered = chat_prompts(loaded, [[{"role": "user", "content": q}] for q in QUESTIONS])
    ids = [loaded.tokenizer(p, add_special_tokens=False).input_ids for p in rendered]
    methods = [steering_from_dict(s) for s in specs(files).values()]
    replies, alone = [], []
    for i, method in enumerate(methods):
        for prompt in (ids[i % len(ids)], ids[(i + 3) % len(ids)]):
            replies.append(Reply(prompt, method.row_edits(loaded, [prompt])[0], 8))
            alone.append(engine.generate(loaded, [prompt], method.row_edits(loaded, [prompt]), 8, 1)[0])
    Engine(loaded, prefill=len(replies), rows=len(replies)).run(replies)
    assert loaded.tokenizer.batch_decode([r.tokens for r in replies], skip_special_tokens=True) == alone


def test_the_shared_prefix_cache_changes_no_reply(files, monkeypatch):
    loaded = loaded_tiny("llama")
    system = [{"role": "system", "content": "The quick brown fox jumps over the lazy dog."}]
    rendered = chat_prompts(loaded, [[*system, {"role": "user", "content": q}] for q in QUESTIONS])
    for spec in (None, specs(files)["sae_release"]):
        steering = steering_from_dict(spec)
        cached = engine_replies(loaded, steering, rendered)
        monkeypatch.setattr(engine, "MIN_PREFIX", 10**9)
        assert engine_replies(loaded, steering, rendered) == cached == reference(loaded, steering, rendered)
        monkeypatch.undo()


def test_stop_strings_length_and_cancellation():
    loaded = loaded_tiny("llama")
    rendered = chat_prompts(loaded, [[{"role": "user", "content": q}] for q in QUESTIONS])
    ids = [loaded.tokenizer(p, add_special_tokens=False).input_ids for p in rendered]
    full = engine.generate(loaded, ids, None, 16)
    stop = full[0][2:4]
    stopped = engine.generate(loaded, ids[:1], None, 16, stop=[stop])[0]
    assert stop in stopped and full[0].startswith(stopped) and len(stopped) < len(full[0])
    cancelled, kept = Reply(ids[0], [], 16), Reply(ids[1], [], 16)
    run = Engine(loaded, prefill=2, rows=2)
    run.waiting.extend([cancelled, kept])
    run.step()
    cancelled.cancelled = True
    while run.rows or run.waiting:
        run.step()
    assert cancelled.finish == "cancelled" and len(cancelled.tokens) == 2
    assert kept.finish in ("length", "stop")
    assert loaded.tokenizer.decode(kept.tokens, skip_special_tokens=True) == full[1]


def test_sampling_is_reproducible_per_row():
    loaded = loaded_tiny("llama")
    ids = loaded.tokenizer(chat_prompts(loaded, [[{"role": "user", "content": "jumps"}]])[0]).input_ids

    def sample(seed, neighbours):
        generator = torch.Generator().manual_seed(seed)
        row = Reply(ids, [], 12, temperature=1.0, top_p=0.9, generator=generator)
        others = [
            Reply(ids, [], 12, temperature=1.0, generator=torch.Generator().manual_seed(9))
            for _ in range(neighbours)
        ]
        Engine(loaded, prefill=4, rows=4).run([row, *others])
        return row.tokens

    assert sample(1, 0) == sample(1, 2) != sample(2, 0)


def test_bfloat16_engine_steers_and_equals_hf_generate_in_bfloat16(files):
    """The engine in bfloat16 (the model cast, the KV cache in the model's dtype) against HF `generate` on the
    same bfloat16 model, unsteered and under an SAE clamp whose SAE stays float32."""
    loaded = loaded_tiny("llama")
    loaded.model.to(torch.bfloat16)
    loaded.dtype = torch.bfloat16
    rendered = chat_prompts(loaded, [[{"role": "user", "content": q}] for q in QUESTIONS])
    for name in ("none", "sae"):
        steering = steering_from_dict(specs(files)[name])
        assert engine_replies(loaded, steering, rendered, 10) == reference(loaded, steering, rendered, 10)
    assert loaded.identity == "tiny-llama@bfloat16"
