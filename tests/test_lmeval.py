"""The lm-evaluation-harness model `saesteer` on local tasks and the tiny random Llama (offline)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from saesteer.artefacts import save_direction  # noqa: E402
from saesteer.errors import SaesteerError  # noqa: E402
from saesteer.evals import SteeredModel  # noqa: E402
from saesteer.lmeval import SaesteerLM  # noqa: E402
from saesteer.models import reference_generate  # noqa: E402
from saesteer.steering import Conditional, Steering, steering_from_dict

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
MC_ITEMS = [
    ("What does the quick brown fox jump over?", ["the lazy dog", "a fence", "the moon", "a river"], 0),
    ("What do sparse autoencoders steer?", ["rivers", "models", "cars", "boats"], 1),
    ("Which animal is lazy?", ["the fox", "the cat", "the dog", "the bird"], 2),
    ("What colour is the fox?", ["green", "blue", "red", "brown"], 3),
    ("How many legs does a dog have?", ["four", "two", "six", "eight"], 0),
]
GEN_ITEMS = [("The quick brown", "fox"), ("Sparse autoencoders", "steer")]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Two local tasks, `saesteer_mc` (4-choice, 5 items) and `saesteer_gen` (generate_until, 2 items)."""
    folder = tmp_path_factory.mktemp("tasks")
    mc, gen = folder / "mc.jsonl", folder / "gen.jsonl"
    mc.write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in MC_ITEMS)
    )
    gen.write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in GEN_ITEMS))
    (folder / "mc.yaml").write_text(
        f"task: saesteer_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {mc}\n"
        'output_type: multiple_choice\ntest_split: test\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n"
    )
    (folder / "gen.yaml").write_text(
        f"task: saesteer_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {gen}\n"
        'output_type: generate_until\ntest_split: test\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\nmetadata:\n  version: 1.0\n"
    )
    return folder


@pytest.fixture(scope="module")
def plain(tiny_model_dir) -> SaesteerLM:
    return SaesteerLM(model=str(tiny_model_dir), batch_size=3)


def sae_clamp(tiny_sae) -> dict:
    return {"method": "sae", "sae": str(tiny_sae), "features": [3, 7], "values": [40.0, 40.0]}


def evaluate(model_args: dict, task_dir: Path, tasks: list[str]) -> dict:
    return lm_eval.simple_evaluate(
        model="saesteer",
        model_args=model_args,
        tasks=tasks,
        batch_size=4,
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


def sample_logliks(results: dict) -> tuple[list[tuple[str, str]], list[float]]:
    """(context, continuation) and the model's log-likelihood of every choice of every doc of saesteer_mc."""
    pairs, logliks = [], []
    for sample in sorted(results["samples"]["saesteer_mc"], key=lambda s: s["doc_id"]):
        pairs += [tuple(arguments) for arguments in sample["arguments"]]
        logliks += [float(resp[0][0]) for resp in sample["resps"]]
    return pairs, logliks


def instances(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(arguments)]


def test_local_tasks_match_saesteer_scorer_and_steering_moves_them(
    tiny_model_dir, tiny_sae, task_dir, one_thread
):
    args = {"model": str(tiny_model_dir)}
    results = evaluate(args, task_dir, ["saesteer_mc", "saesteer_gen"])
    assert results["results"]["saesteer_mc"]["acc,none"] in {i / 5 for i in range(6)}
    assert (
        "exact_match,remove_whitespace" in results["results"]["saesteer_gen"]
        or results["results"]["saesteer_gen"]
    )
    pairs, logliks = sample_logliks(results)
    assert len(pairs) == 4 * len(MC_ITEMS) and all(c.startswith(" ") for _, c in pairs)
    own = SteeredModel(SaesteerLM(**args).loaded, Steering(), progress=False).score(
        [(c, [x]) for c, x in pairs], 4
    )
    torch.testing.assert_close(torch.tensor(logliks), torch.tensor([s[0] for s in own]), atol=1e-4, rtol=0)

    steered = evaluate({**args, "steering": sae_clamp(tiny_sae)}, task_dir, ["saesteer_mc"])
    assert sample_logliks(steered)[0] == pairs
    assert max(abs(a - b) for a, b in zip(sample_logliks(steered)[1], logliks)) > 1e-2


def test_steering_spec_forms_and_errors(tiny_model_dir, tiny_sae, tmp_path):
    spec = tmp_path / "clamp.json"
    spec.write_text(json.dumps(sae_clamp(tiny_sae)))
    as_file = SaesteerLM(model=str(tiny_model_dir), steering=str(spec))
    assert as_file.steering.to_dict() == steering_from_dict(sae_clamp(tiny_sae)).to_dict()
    with pytest.raises(SaesteerError, match="unknown saesteer model_args pretrained"):
        SaesteerLM(model=str(tiny_model_dir), pretrained="gpt2")
    with pytest.raises(SaesteerError, match="unknown steering method 'nope'"):
        SaesteerLM(model=str(tiny_model_dir), steering="nope")
    with pytest.raises(SaesteerError, match="batch_size must be a positive integer"):
        SaesteerLM(model=str(tiny_model_dir), batch_size="auto")
    prompt_only = SaesteerLM(model=str(tiny_model_dir), steering="system_prompt")
    with pytest.raises(SaesteerError, match="--apply_chat_template"):
        prompt_only.loglikelihood(instances("loglikelihood", [("Question:", " A")]))
    rendered = prompt_only.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "You are a helpful assistant" in rendered and rendered.endswith("<|im_start|>assistant\n")


def test_conditional_steering_gates_each_row_on_its_context(
    plain, tiny_model_dir, tiny_sae, tmp_path, one_thread
):
    direction = tmp_path / "detector.safetensors"
    save_direction(
        direction, torch.randn(64, generator=torch.Generator().manual_seed(2)), layer=2, model="tiny"
    )
    contexts = [
        "The quick brown fox",
        "Sparse autoencoders steer",
        "jumps over the lazy dog and the quick",
        "dog",
    ]
    pairs = [(c, x) for c in contexts for x in (" models", " the lazy dog")]
    probe = Conditional(steering=sae_clamp(tiny_sae), detector=str(direction))
    scores = torch.cat(
        [probe.scores(plain.loaded, torch.tensor([plain.tok_encode(c)])) for c in contexts]
    )  # unpadded
    threshold = float(scores.median())
    gated = SaesteerLM(
        model=str(tiny_model_dir), batch_size=3, steering={**probe.to_dict(), "threshold": threshold}
    )
    flagged = [bool(s > threshold) for s in scores]
    assert 0 < sum(flagged) < len(contexts)
    steered = SaesteerLM(model=str(tiny_model_dir), batch_size=3, steering=sae_clamp(tiny_sae))
    requests = instances("loglikelihood", pairs)
    mixed, on, off = (m.loglikelihood(requests) for m in (gated, steered, plain))
    expected = [on[i] if flagged[i // 2] else off[i] for i in range(len(pairs))]
    torch.testing.assert_close(
        torch.tensor([s for s, _ in mixed]), torch.tensor([s for s, _ in expected]), atol=1e-4, rtol=0
    )
    assert [g for _, g in mixed] == [g for _, g in expected]


def test_loglikelihood_rolling_is_the_sum_of_token_logprobs(plain, tiny_model_dir, one_thread):
    texts = ["The quick brown fox jumps over the lazy dog.", "Sparse autoencoders steer models."]
    rolled = plain.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in texts]))
    short_windows = SaesteerLM(model=str(tiny_model_dir), max_length=6)
    windowed = short_windows.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in texts]))
    for text, total in zip(texts, rolled):
        ids = [plain.prefix_token_id] + plain.tok_encode(text)
        with torch.no_grad():
            logprobs = torch.log_softmax(plain.loaded.model(torch.tensor([ids])).logits[0].float(), -1)
        direct = sum(float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids)))
        assert total == pytest.approx(direct, abs=1e-3)
    assert windowed != pytest.approx(rolled, abs=1e-3)  # windows of 5 tokens see less context


def test_generate_until_respects_until_and_max_gen_toks(plain, one_thread):
    prompts = ["The quick brown", "Sparse autoencoders steer models over the"]
    raw = reference_generate(plain.loaded, prompts, max_new_tokens=8)
    capped = plain.generate_until(
        instances("generate_until", [(p, {"until": ["\x00"], "max_gen_toks": 3}) for p in prompts])
    )
    assert capped == reference_generate(plain.loaded, prompts, max_new_tokens=3)
    assert all(len(c) < len(r) for c, r in zip(capped, raw))
    stops = [r[len(r) // 2 : len(r) // 2 + 2] for r in raw]
    assert all(stops)
    cut = plain.generate_until(
        instances("generate_until", [(p, {"until": [s], "max_gen_toks": 8}) for p, s in zip(prompts, stops)])
    )
    assert cut == [r.split(s)[0] for r, s in zip(raw, stops)]
    with pytest.raises(SaesteerError, match="decodes greedily"):
        plain.generate_until(instances("generate_until", [("The", {"do_sample": True})]))


@pytest.mark.slow  # two lm-eval processes: ~20-40 s
def test_lm_eval_command_line_finds_the_saesteer_model(tiny_model_dir, task_dir, tmp_path):
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    cli = Path(sys.executable).with_name("saesteer-lm-eval")
    done = subprocess.run(
        [
            str(cli),
            "--model",
            "saesteer",
            "--model_args",
            f"model={tiny_model_dir},steering=none",
            "--tasks",
            "saesteer_mc",
            "--include_path",
            str(task_dir),
            "--limit",
            "2",
            "--output_path",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "saesteer_mc" in done.stdout and "acc" in done.stdout
    bad = subprocess.run(
        [
            str(cli),
            "--model",
            "saesteer",
            "--model_args",
            f"model={tiny_model_dir},steering=nope",
            "--tasks",
            "saesteer_mc",
            "--include_path",
            str(task_dir),
            "--limit",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and last.startswith("saesteer-lm-eval: error: unknown steering method 'nope'")
