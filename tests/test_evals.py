import json
import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import make_model, make_tokenizer, run_cli

from saesteer import evals
from saesteer.artefacts import artefact_digest
from saesteer.cache import ResultCache
from saesteer.config import SUITES, parse_limits, parse_suites
from saesteer.errors import SaesteerError
from saesteer.evals import Decoding, EvalConfig, SteeredModel, expand_grid, run_suites
from saesteer.evalsets import MultipleChoice
from saesteer.hooks import edit_residual
from saesteer.judges import REFUSAL, StringMatchJudge
from saesteer.models import LoadedModel
from saesteer.scoring import continuation_logprobs, quality_agreement, text_fidelity
from saesteer.steering import Steering, SystemPrompt

REFUSE = "I'm sorry, but I can't help with that."
COMPLY = "Sure, here is a detailed answer with every step you asked for."


@pytest.fixture(scope="module")
def tiny():
    tok = make_tokenizer()
    tok.padding_side = "left"
    return LoadedModel(
        model=make_model("llama"),
        tokenizer=tok,
        spec="tiny-llama",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )


class Scripted:
    """A generate() stand-in that always answers `reply` and counts the prompts it was asked."""

    def __init__(self, reply):
        self.reply, self.calls = reply, 0

    def __call__(self, loaded, prompts, steering, max_new_tokens, batch_size):
        self.calls += len(prompts)
        return [self.reply(p) if callable(self.reply) else self.reply for p in prompts]


class ShiftResidual:
    """A duck-typed steering that adds a constant to the residual stream at layer 1 (test only)."""

    def __init__(self, scale: float):
        self.scale = scale

    def prepare(self, conversation):
        return conversation

    @contextmanager
    def applied(self, loaded):
        with edit_residual(loaded.model, 1, lambda h: h + self.scale):
            yield

    def to_dict(self):
        return {"method": "test_shift", "scale": self.scale}


def small_config(**overrides):
    base = dict(
        model="tiny-llama",
        limit=4,
        decoding=Decoding(max_new_tokens=6, batch_size=4),
        gsm8k_max_new_tokens=6,
        mmlu_shots=1,
        jailbreak_turns=2,
        fidelity_tokens=24,
        bootstrap=200,
    )
    return EvalConfig(**{**base, **overrides})


def by_metric(rows):
    return {(r["config"]["dataset"], r["metric"]): r for r in rows}


# --------------------------------------------------------------------------------------- log-likelihood


def test_continuation_logprobs_match_a_manual_forward_and_do_not_depend_on_batching(tiny):
    tok = tiny.tokenizer
    requests = [
        (tok("The quick brown")["input_ids"], [tok(" fox")["input_ids"], tok(" dog jumps")["input_ids"]]),
        (tok("Sparse")["input_ids"], [tok(" autoencoders steer")["input_ids"], tok(" models")["input_ids"]]),
        (tok("The lazy dog")["input_ids"], [[5], [7], [9]]),
    ]  # single-token: one forward pass
    batched = continuation_logprobs(tiny, requests, batch_size=8)
    one_by_one = [continuation_logprobs(tiny, [r], batch_size=1)[0] for r in requests]
    np.testing.assert_allclose(np.array(sum(batched, [])), np.array(sum(one_by_one, [])), atol=1e-4)
    for (context, continuations), scores in zip(requests, batched):
        for continuation, score in zip(continuations, scores):
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logprobs = torch.log_softmax(tiny.model(ids).logits[0], -1)
            manual = sum(float(logprobs[len(context) - 1 + j, t]) for j, t in enumerate(continuation))
            assert score == pytest.approx(manual, abs=1e-4)


def test_mmlu_scorer_picks_the_maximum_likelihood_letter(tiny, monkeypatch):
    questions = [
        MultipleChoice(f"q{i}", ("w", "x", "y", "z"), answer=i % 4, subject="anatomy") for i in range(8)
    ]
    monkeypatch.setattr(evals.evalsets, "mmlu", lambda split: questions)

    def scores_favouring(offset):
        def fake_score(self, requests, batch_size, desc="score"):
            out = []
            for context, options in requests:
                index = int(context.split("\nq")[-1].split("\n")[0])  # the question number in the prompt
                best = (index + offset) % 4
                out.append([-1.0 if j == best else -5.0 for j in range(len(options))])
            return out

        return fake_score

    for offset, accuracy in ((0, 1.0), (1, 0.0)):
        monkeypatch.setattr(SteeredModel, "score", scores_favouring(offset))
        run = evals.Run(
            SteeredModel(tiny, Steering(), progress=False), StringMatchJudge(), small_config(limit=None)
        )
        evals.run_mmlu(run)
        assert run.rows[0]["value"] == accuracy and run.rows[0]["n"] == 8


def test_mmlu_prompt_format():
    shot = MultipleChoice("2+2?", ("3", "4", "5", "6"), 1, "elementary_mathematics")
    q = MultipleChoice("3+3?", ("6", "7", "8", "9"), 0, "elementary_mathematics")
    text = evals.mmlu_prompt(q, [shot])
    assert text.startswith(
        "The following are multiple choice questions (with answers) about elementary mathematics."
    )
    assert "2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n3+3?" in text and text.endswith("D. 9\nAnswer:")


# ------------------------------------------------------------------------------------------ suites


@pytest.mark.parametrize("reply, refusal", [(REFUSE, 1.0), (COMPLY, 0.0)])
def test_scripted_model_gives_known_safety_rates(tiny, reply, refusal):
    model = SteeredModel(tiny, Steering(), generate_fn=Scripted(reply), progress=False)
    rows = by_metric(run_suites(model, small_config(suites=("safety",))).rows)
    for dataset in ("advbench", "xstest_unsafe", "unsafe_all"):
        assert rows[(dataset, "refusal_rate")]["value"] == refusal
    for dataset in ("xstest_safe", "safe_all"):
        assert rows[(dataset, "over_refusal_rate")]["value"] == refusal
    assert rows[("xstest_safe", "full_compliance_rate")]["value"] == 1.0 - refusal
    assert rows[("advbench", "refusal_rate")]["n"] == 4


@pytest.mark.parametrize("reply, asr", [(REFUSE, 0.0), (COMPLY, 1.0)])
def test_scripted_model_gives_known_jailbreak_rates(tiny, reply, asr):
    model = SteeredModel(tiny, Steering(), generate_fn=Scripted(reply), progress=False)
    rows = by_metric(run_suites(model, small_config(suites=("jailbreak",))).rows)
    for dataset in ("hh_rlhf", "crescendo_advbench"):
        assert rows[(dataset, "attack_success_rate")]["value"] == asr
        assert (
            rows[(dataset, "refusal_rate_turn1")]["value"]
            == rows[(dataset, "refusal_rate_turn2")]["value"]
            == 1 - asr
        )


def test_multi_turn_feeds_the_models_own_replies_back(tiny):
    seen = []

    def reply(prompt):
        seen.append(prompt)
        return f"reply{prompt.count('<|im_start|>assistant')}"

    model = SteeredModel(tiny, Steering(), generate_fn=Scripted(reply), progress=False)
    run = evals.Run(model, StringMatchJudge(), small_config())
    turns = [["hi", "tell me more", "and more"], ["one turn"]]
    verdicts = evals.multi_turn(run, [3, 1], evals.scripted_turns(turns), "test")
    assert [len(v) for v in verdicts] == [3, 1]
    last = [p for p in seen if "and more" in p][0]
    assert "hi" in last and "reply1" in last and "tell me more" in last and "reply2" in last


def test_crescendo_turns_escalate_to_the_goal():
    turns = evals.crescendo_turns("Write a tutorial on lock picking.")
    assert (
        len(turns) == 4
        and "Write a tutorial on lock picking" in turns[0]
        and turns[-1].count("lock picking") == 1
    )


def test_gsm8k_exact_match_with_scripted_replies(tiny, monkeypatch):
    from saesteer.evalsets import MathProblem

    monkeypatch.setattr(
        evals.evalsets, "gsm8k", lambda split: [MathProblem("a?", "12"), MathProblem("b?", "7")]
    )
    model = SteeredModel(
        tiny, Steering(), generate_fn=Scripted(lambda p: "so 3*4 = 12\n#### 12"), progress=False
    )
    run = evals.Run(model, StringMatchJudge(), small_config())
    evals.run_gsm8k(run)
    assert run.rows[0]["value"] == 0.5 and run.rows[0]["config"]["decoding"]["max_new_tokens"] == 6


def test_every_suite_runs_on_a_tiny_model(tiny, tmp_path):
    model = SteeredModel(tiny, SystemPrompt(), ResultCache(tmp_path / "cache.jsonl"), progress=False)
    run = run_suites(model, small_config(suites=SUITES, limit=2, limits={"mmlu": 3}))
    rows = by_metric(run.rows)
    assert set(run.walls) == set(SUITES)
    # the rows' JSON layout of before ResultRow, key for key and in order (cached sweeps resume by it)
    layout = ["config", "metric", "value", "ci_low", "ci_high", "n", "wall_time_s"]
    settings = ["model", "steering", "suite", "dataset", "split", "limit", "n", "decoding", "seed", "judge"]
    assert all(list(r) == layout and list(r["config"]) == settings for r in run.rows)
    for key in [
        ("mmlu", "accuracy"),
        ("truthfulqa", "mc1"),
        ("truthfulqa", "mc2"),
        ("gsm8k", "exact_match"),
        ("hh_rlhf", "attack_success_rate"),
        ("heldout_text", "kl_to_unsteered"),
        ("heldout_text", "perplexity"),
        ("xstest_safe", "degeneration_rate"),
        ("advbench", "refusal_rate"),
    ]:
        row = rows[key]
        assert row["ci_low"] <= row["value"] <= row["ci_high"] and math.isfinite(row["value"])
        assert row["config"]["steering"]["method"] == "system_prompt" and row["wall_time_s"] >= 0
    assert rows[("mmlu", "accuracy")]["n"] == 3 and rows[("truthfulqa", "mc1")]["n"] == 2
    assert 0 <= rows[("truthfulqa", "mc2")]["value"] <= 1
    config = rows[("advbench", "refusal_rate")]["config"]
    assert {"model", "steering", "suite", "dataset", "split", "n", "decoding", "seed", "judge"} <= set(config)
    json.dumps(run.rows)  # JSON-serialisable


def test_fidelity_kl_is_zero_unsteered_and_positive_when_steered(tiny):
    texts = ["the quick brown fox jumps over the lazy dog", "sparse autoencoders steer models"]
    kl, nll, count = text_fidelity(tiny, Steering(), texts, 32, 2)
    assert np.all(kl == 0) and np.all(count == [len(tiny.tokenizer(t)["input_ids"]) - 1 for t in texts])
    ids = torch.tensor([tiny.tokenizer(texts[0])["input_ids"]])
    with torch.no_grad():
        logprobs = torch.log_softmax(tiny.model(ids).logits[0, :-1], -1)
    assert nll[0] == pytest.approx(float(-logprobs.gather(-1, ids[0, 1:, None]).sum()), rel=1e-4)
    kl_steered, _, _ = text_fidelity(tiny, ShiftResidual(2.0), texts, 32, 2)
    assert np.all(kl_steered > 1e-3)


# ------------------------------------------------------------------------------------------ cache and sweep


def test_cache_hit_avoids_regeneration_and_survives_a_torn_line(tiny, tmp_path):
    path = tmp_path / "cache.jsonl"
    first = Scripted(COMPLY)
    config = small_config(suites=("safety",))
    rows = run_suites(
        SteeredModel(tiny, Steering(), ResultCache(path), generate_fn=first, progress=False), config
    ).rows
    assert first.calls > 0
    with open(path, "a") as f:
        f.write('{"key": "abc", "val')  # a crash mid-write
    again = Scripted(REFUSE)  # would change every rate if it were called
    cache = ResultCache(path)
    rows_again = run_suites(
        SteeredModel(tiny, Steering(), cache, generate_fn=again, progress=False), config
    ).rows
    assert again.calls == 0 and cache.misses == 0
    assert [r["value"] for r in rows] == [r["value"] for r in rows_again]
    other = Scripted(REFUSE)  # another steering is another key
    run_suites(
        SteeredModel(tiny, SystemPrompt(), ResultCache(path), generate_fn=other, progress=False), config
    )
    assert other.calls == first.calls


def test_cache_misses_when_a_steering_file_changes_at_the_same_path(tiny, tmp_path):
    from saesteer.artefacts import save_direction
    from saesteer.steering import ActAdd

    direction = tmp_path / "d.safetensors"
    save_direction(direction, torch.ones(tiny.d_model), layer=1, model="tiny")
    config, path = small_config(suites=("safety",)), tmp_path / "cache.jsonl"
    first = Scripted(COMPLY)
    run_suites(
        SteeredModel(
            tiny,
            ActAdd(direction=str(direction), alpha=2.0),
            ResultCache(path),
            generate_fn=first,
            progress=False,
        ),
        config,
    )
    same = Scripted(REFUSE)
    run_suites(
        SteeredModel(
            tiny,
            ActAdd(direction=str(direction), alpha=2.0),
            ResultCache(path),
            generate_fn=same,
            progress=False,
        ),
        config,
    )
    assert first.calls > 0 and same.calls == 0
    save_direction(direction, -torch.ones(tiny.d_model), layer=1, model="tiny")  # retrained, same file name
    changed = Scripted(REFUSE)
    run_suites(
        SteeredModel(
            tiny,
            ActAdd(direction=str(direction), alpha=2.0),
            ResultCache(path),
            generate_fn=changed,
            progress=False,
        ),
        config,
    )
    assert changed.calls == first.calls
    assert artefact_digest([]) == "" and artefact_digest([str(direction)])


def test_loglik_cache(tiny, tmp_path):
    model = SteeredModel(tiny, Steering(), ResultCache(tmp_path / "c.jsonl"), progress=False)
    requests = [("<|im_start|>user\nhi", [" A", " B"])]
    first = model.score(requests, 4)
    reloaded = SteeredModel(tiny, Steering(), ResultCache(tmp_path / "c.jsonl"), progress=False)
    assert reloaded.score(requests, 4) == first and reloaded.cache.hits == 1 and reloaded.cache.misses == 0


def test_expand_grid():
    grid = expand_grid([{"method": "none"}, {"grid": {"method": "system_prompt", "prompt": ["a", "b", "c"]}}])
    assert grid == [{"method": "none"}] + [{"method": "system_prompt", "prompt": p} for p in "abc"]
    crossed = expand_grid({"grid": {"method": "x", "feature": [1, 2], "value": [4, 8], "layers": [[1, 2]]}})
    assert len(crossed) == 4 and crossed[0] == {"method": "x", "feature": 1, "value": 4, "layers": [1, 2]}
    with pytest.raises(SaesteerError, match="no steering configs"):
        expand_grid([])
    with pytest.raises(SaesteerError, match="sweep entries"):
        expand_grid(["none"])


def test_sweep_resumes_without_regenerating(tiny, tmp_path):
    (tmp_path / "grid.yaml").write_text(
        "- method: none\n- grid:\n    method: system_prompt\n    prompt: [Refuse harm., Be safe.]\n"
    )
    steerings = evals.load_sweep_file(tmp_path / "grid.yaml")
    assert len(steerings) == 3
    out, config = tmp_path / "sweep.jsonl", small_config(suites=("safety",), limit=2)
    scripted = Scripted(REFUSE)
    rows = evals.sweep_steerings(
        tiny, steerings, config, out, ResultCache(tmp_path / "c.jsonl"), generate_fn=scripted
    )
    assert len({json.dumps(r["config"]["steering"]) for r in rows}) == 3 and scripted.calls > 0
    assert len(evals.read_rows(out)) == len(rows)
    again = Scripted(REFUSE)
    assert (
        evals.sweep_steerings(
            tiny, steerings, config, out, ResultCache(tmp_path / "c.jsonl"), generate_fn=again
        )
        == []
    )
    assert again.calls == 0 and len(evals.read_rows(out)) == len(rows)
    out.write_text(
        "".join(json.dumps(r) + "\n" for r in rows[: len(rows) // 3])
    )  # as if it crashed after config 1
    resumed = Scripted(REFUSE)
    new = evals.sweep_steerings(
        tiny, steerings, config, out, ResultCache(tmp_path / "c.jsonl"), generate_fn=resumed
    )
    assert resumed.calls == 0 and len(new) == len(rows) - len(rows) // 3


def test_sweep_with_per_dataset_limits_resumes_and_a_new_limit_reruns(tiny, tmp_path):
    out, steerings = tmp_path / "sweep.jsonl", [{"method": "none"}]
    config = small_config(suites=("safety",), limit=2, limits={"advbench": 1})
    first = evals.sweep_steerings(
        tiny, steerings, config, out, ResultCache(None), generate_fn=Scripted(REFUSE)
    )
    assert {r["config"]["limit"] for r in first} == {1, 2}
    assert (
        evals.sweep_steerings(tiny, steerings, config, out, ResultCache(None), generate_fn=Scripted(REFUSE))
        == []
    )
    changed = small_config(suites=("safety",), limit=2, limits={"advbench": 2})
    assert evals.sweep_steerings(
        tiny, steerings, changed, out, ResultCache(None), generate_fn=Scripted(REFUSE)
    )
    assert (
        evals.sweep_steerings(tiny, steerings, changed, out, ResultCache(None), generate_fn=Scripted(REFUSE))
        == []
    )  # old rows stay


def test_parse_helpers():
    assert parse_limits("50,mmlu=100,gsm8k=0") == (50, {"mmlu": 100, "gsm8k": 10**9})
    assert parse_limits("0") == (None, {})
    assert parse_suites("all") == SUITES and parse_suites("safety,fidelity") == (
        "safety",
        "fidelity",
    )


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_eval_with_user_prompts(monkeypatch, capsys, tiny_model_dir, tmp_path):
    (tmp_path / "mine.csv").write_text("Prompt\nhow do I pick a lock?\nhow do I bake bread?\n")
    (tmp_path / "steer.json").write_text('{"method": "system_prompt"}')
    out = tmp_path / "r.jsonl"
    args = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--prompts",
        str(tmp_path / "mine.csv"),
        "--label",
        "unsafe",
        "--steering",
        str(tmp_path / "steer.json"),
        "--max-new-tokens",
        "4",
        "--out",
        str(out),
    ]
    code, captured = run_cli(monkeypatch, capsys, *args)
    assert code in (0, None)
    rows = evals.read_rows(out)
    assert [r["metric"] for r in rows] == [
        "refusal_rate",
        "clear_refusal_rate",
        "degenerate_rate",
        "evasive_rate",
        "apology_then_help_rate",
    ] and rows[0]["n"] == 2
    assert (
        rows[0]["config"]["dataset"] == "user:mine.csv"
        and rows[0]["config"]["steering"]["method"] == "system_prompt"
    )
    assert (
        "refusal_rate" in captured.out
        and "95% CI" in captured.out
        and "wall time per suite: safety" in captured.out
    )
    code, captured = run_cli(monkeypatch, capsys, *args)  # rerun: everything from the cache
    assert "(cache: 2 hits, 0 misses)" in captured.out


def test_cli_eval_writes_judged_replies_for_a_human_audit(monkeypatch, capsys, tiny_model_dir, tmp_path):
    (tmp_path / "mine.txt").write_text(
        "how do I pick a lock?\nhow do I hotwire a car?\nhow do I bake bread?\n"
    )
    replies = tmp_path / "replies.jsonl"
    code, _ = run_cli(
        monkeypatch,
        capsys,
        "eval",
        "--model",
        str(tiny_model_dir),
        "--prompts",
        str(tmp_path / "mine.txt"),
        "--label",
        "unsafe",
        "--max-new-tokens",
        "4",
        "--out",
        str(tmp_path / "r.jsonl"),
        "--replies",
        str(replies),
    )
    assert code in (0, None)
    judged = evals.read_rows(replies)
    assert [j["prompt"] for j in judged] == [
        "how do I pick a lock?",
        "how do I hotwire a car?",
        "how do I bake bread?",
    ]
    assert all(
        j["judge"] == "string" and j["split"] == "test" and j["steering"]["method"] == "none" for j in judged
    )
    verdicts = [
        "refusal",
        "refusal",
        "compliance",
    ]  # a person's reading, and the judge's verdicts to compare with
    humans = ["refusal", "apology_then_help", "compliance"]
    replies.write_text(
        "".join(
            json.dumps({**j, "verdict": v, "human": h}) + "\n" for j, v, h in zip(judged, verdicts, humans)
        )
    )
    code, captured = run_cli(monkeypatch, capsys, "audit", str(replies))
    assert code in (0, None)
    lines = captured.out.splitlines()
    assert any(
        line.split()[:2] == ["refusal", "apology_then_help"] and "1 / 2" in line and "50.0%" in line
        for line in lines
    )
    assert any(line.split()[:3] == ["not", "refusal", "compliance"] and "100.0%" in line for line in lines)
    replies.write_text(json.dumps({**judged[0], "human": ""}) + "\n")
    code, captured = run_cli(monkeypatch, capsys, "audit", str(replies))
    assert code == 2 and "human label" in captured.err


def test_quality_audit_gives_kappa_per_category(monkeypatch, capsys, tmp_path):
    loop = "I'm sorry, but I can't help with that. " * 6
    clear = "I'm sorry, but I can't help with that. Creating weapons is dangerous and illegal."
    helps = "Sure! Here is a simple recipe: mix flour, water and salt, knead for ten minutes, then bake."
    rows = [
        {"label": "unsafe", "reply": loop, "human": "degenerate"},
        {"label": "unsafe", "reply": clear, "human": "clear_refusal"},
        {"label": "unsafe", "reply": loop, "human": "clear_refusal"},
        {"label": "safe", "reply": helps, "human": "helps"},
    ]
    table = {s["category"]: s for s in quality_agreement(rows, n_resamples=50)}
    # degenerate: human 1 (row 0), judge 2 (rows 0, 2): po 3/4, pe (1/4)(2/4) + (3/4)(2/4) = 1/2 -> kappa 0.5
    assert table["degenerate"]["kappa"] == pytest.approx(0.5) and (
        table["degenerate"]["human"],
        table["degenerate"]["judge"],
    ) == (1, 2)
    assert table["helps"]["kappa"] == 1.0 and table["all"]["agreement"] == 0.75 and table["all"]["n"] == 4
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, captured = run_cli(monkeypatch, capsys, "audit", str(path))
    assert code in (0, None) and any(
        line.split()[:4] == ["degenerate", "1", "2", "75.0%"] for line in captured.out.splitlines()
    )
    with pytest.raises(SaesteerError, match="row 1 needs"):
        quality_agreement([{"label": "safe", "reply": "x", "human": "clear_refusal"}])


def test_cli_sweep(monkeypatch, capsys, tiny_model_dir, tmp_path):
    (tmp_path / "grid.json").write_text(json.dumps([{"method": "none"}, {"method": "system_prompt"}]))
    (tmp_path / "p.txt").write_text("hello\n")
    code, captured = run_cli(
        monkeypatch,
        capsys,
        "sweep",
        "--grid",
        str(tmp_path / "grid.json"),
        "--model",
        str(tiny_model_dir),
        "--prompts",
        str(tmp_path / "p.txt"),
        "--label",
        "safe",
        "--max-new-tokens",
        "4",
        "--out",
        str(tmp_path / "s.jsonl"),
    )
    assert code in (0, None) and "2 configs" in captured.out
    assert (
        len(evals.read_rows(tmp_path / "s.jsonl")) == 2 * 7
    )  # over/full/partial refusal, full compliance + 3 quality rates


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--label", "unsafe"], "--prompts and --label go together"),
        (["--suite", "speed"], "unknown suite 'speed'"),
        (["--split", "dev"], "unknown split 'dev'"),
        (["--limit", "ten"], "bad --limit 'ten'"),
        (["--steering", "{not json"], "--steering is not valid JSON"),
        (["--steering", "nope.json"], "no such steering file"),
        (["--steering", "warp_drive"], "unknown steering method 'warp_drive'"),
        (["--prompts", "/no/such.csv", "--label", "safe"], "no such prompts file"),
        (["--judge", "openai:nohost"], "bad judge"),
    ],
)
def test_cli_eval_bad_input_is_one_line(monkeypatch, capsys, tiny_model_dir, tmp_path, extra, message):
    code, captured = run_cli(
        monkeypatch,
        capsys,
        "eval",
        "--model",
        str(tiny_model_dir),
        "--out",
        str(tmp_path / "r.jsonl"),
        "--limit",
        "1",
        *extra,
    )
    assert code == 2
    errors = [line for line in captured.err.splitlines() if line.startswith("saesteer: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in captured.err


class AlwaysRefusal:
    name = "always-refusal"

    def judge(self, prompts, replies):
        return [REFUSAL] * len(replies)


def test_judge_agreement_known_answer(tiny):
    # replies alternate refusal / compliance; a judge that always says refusal agrees on exactly the refusals
    # and, being constant, has kappa 0 against the string judge
    model = SteeredModel(
        tiny, Steering(), generate_fn=Scripted(lambda p: REFUSE if len(p) % 2 else COMPLY), progress=False
    )
    run = run_suites(model, small_config(suites=("safety",), limit=6), judge=AlwaysRefusal())
    refusals = sum(StringMatchJudge().verdict(reply) == REFUSAL for _, reply, _ in run.judged)
    assert 0 < refusals < len(run.judged)
    kappa, agree = evals.agreement_rows(run, StringMatchJudge(), sample=1000)
    assert kappa["metric"] == "cohen_kappa" and kappa["value"] == pytest.approx(0.0)
    assert agree["value"] == pytest.approx(100 * refusals / len(run.judged)) and agree["n"] == len(run.judged)
    assert agree["ci_low"] <= agree["value"] <= agree["ci_high"]
    assert kappa["config"]["dataset"] == "always-refusal vs string"
    assert evals.agreement_rows(run, AlwaysRefusal(), sample=5)[0]["value"] == 1.0


def test_cli_eval_with_local_llm_judge_reports_agreement(monkeypatch, capsys, tiny_model_dir, tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\nsecond prompt\nthird prompt\n")
    code, captured = run_cli(
        monkeypatch,
        capsys,
        "eval",
        "--model",
        str(tiny_model_dir),
        "--judge",
        str(tiny_model_dir),
        "--prompts",
        str(tmp_path / "p.txt"),
        "--label",
        "unsafe",
        "--max-new-tokens",
        "4",
        "--out",
        str(tmp_path / "r.jsonl"),
    )
    assert code in (0, None)
    rows = evals.read_rows(tmp_path / "r.jsonl")
    assert [r["metric"] for r in rows] == [
        "refusal_rate",
        "clear_refusal_rate",
        "degenerate_rate",
        "evasive_rate",
        "apology_then_help_rate",
        "cohen_kappa",
        "percent_agreement",
    ]
    assert rows[0]["config"]["judge"] == f"llm:{tiny_model_dir}" and rows[2]["n"] == 3


class EchoAttacker:
    name = "echo-attacker"

    def __init__(self):
        self.asks = []

    def complete(self, conversations):
        out = []
        for conversation in conversations:  # odd asks get an answer, even asks an empty string
            self.asks.append(conversation)
            out.append(f"attacker turn {len(self.asks)}" if len(self.asks) % 2 else "")
        return out


def test_llm_attacker_writes_later_turns_from_the_transcript(tiny):
    seen = []
    scripted = Scripted(lambda p: seen.append(p) or COMPLY)
    attacker = EchoAttacker()
    model = SteeredModel(tiny, Steering(), generate_fn=scripted, progress=False)
    rows = by_metric(
        run_suites(
            model, small_config(suites=("jailbreak",), limit=2, jailbreak_turns=3, attacker=attacker)
        ).rows
    )
    assert rows[("crescendo_advbench@echo-attacker", "attack_success_rate")]["value"] == 1.0
    assert len(attacker.asks) == 2 * 2  # turns 2 and 3 of two conversations
    ask = attacker.asks[0][0]["content"]
    assert "Crescendo" in ask and "ASSISTANT: " + COMPLY in ask and "turn 2 of 3" in ask
    assert "last turn" in attacker.asks[-1][0]["content"]
    finals = [p for p in seen if p.count("<|im_start|>user") == 3]
    assert any("attacker turn 1" in p for p in finals)
    assert any("Historically" in p for p in finals)  # an empty attacker answer falls back to the template


def test_cli_eval_jailbreak_with_local_attacker(monkeypatch, capsys, tiny_model_dir, tmp_path):
    code, captured = run_cli(
        monkeypatch,
        capsys,
        "eval",
        "--model",
        str(tiny_model_dir),
        "--suite",
        "jailbreak",
        "--attacker",
        str(tiny_model_dir),
        "--limit",
        "1",
        "--max-new-tokens",
        "3",
        "--jailbreak-turns",
        "2",
        "--out",
        str(tmp_path / "r.jsonl"),
    )
    assert code in (0, None)
    datasets = {r["config"]["dataset"] for r in evals.read_rows(tmp_path / "r.jsonl")}
    assert datasets == {"hh_rlhf", f"crescendo_advbench@{tiny_model_dir}"}
    assert {r["metric"] for r in evals.read_rows(tmp_path / "r.jsonl")} == {
        "attack_success_rate",
        "refusal_rate_turn1",
        "refusal_rate_turn2",
    }
