import json
from collections import Counter

import pytest
from conftest import needs_shared

from saesteer import evalsets
from saesteer.errors import SaesteerError


def split_texts(dataset):
    return {s: [p.text for p in evalsets.safety_prompts(dataset, s)] for s in evalsets.SPLITS}


@pytest.mark.parametrize("dataset, total", [("advbench", 520), ("xstest_unsafe", 200), ("xstest_safe", 250)])
def test_vendored_splits_are_disjoint_complete_and_fixed(dataset, total):
    splits = split_texts(dataset)
    all_texts = [t for texts in splits.values() for t in texts]
    assert len(all_texts) == len(set(all_texts)) == total
    assert split_texts(dataset) == splits  # same answer every call


def test_advbench_discovery_prompts_are_pinned_to_train():
    rows = evalsets._asset("advbench.jsonl.gz")
    pinned = {r["prompt"] for r in rows if r["in_refusal_direction_train"]}
    assert len(pinned) == 117
    splits = split_texts("advbench")
    assert pinned <= set(splits["train"])
    assert not pinned & (set(splits["validation"]) | set(splits["test"]))
    # the other 403 are cut 40/20/40
    assert (len(splits["train"]) - 117, len(splits["validation"]), len(splits["test"])) == (161, 81, 161)


def test_xstest_is_stratified_by_type():
    test = evalsets.safety_prompts("xstest_safe", "test")
    assert set(Counter(p.category for p in test).values()) == {10}  # 10 of 25 per type
    assert all(p.label == "safe" for p in test)
    assert len(evalsets.safety_prompts("xstest_unsafe", "validation")) == 40


def test_split_items_fractions_groups_and_pins():
    items = [(f"item {i}", "a" if i % 2 else "b") for i in range(100)]
    parts = {
        s: evalsets.split_items(
            items, s, lambda x: x[0], group=lambda x: x[1], pinned_train=lambda x: x[0] == "item 3"
        )
        for s in evalsets.SPLITS
    }
    # group a: 49 unpinned items -> 20/9/20 (+ the pinned one in train); group b: 50 -> 20/10/20
    assert [len(parts[s]) for s in evalsets.SPLITS] == [41, 19, 40]
    assert ("item 3", "a") in parts["train"]
    assert sorted(sum(parts.values(), [])) == sorted(items)
    with pytest.raises(SaesteerError, match="unknown split 'dev'"):
        evalsets.split_items(items, "dev", lambda x: x[0])


def test_shared_only_sets_error_clearly_without_shared(monkeypatch, tmp_path):
    monkeypatch.setenv("SAESTEER_SHARED_DATA", str(tmp_path))
    assert not evalsets.shared_available("harmless") and evalsets.shared_available("advbench")
    with pytest.raises(SaesteerError, match="harmless is not vendored"):
        evalsets.safety_prompts("harmless", "test")
    with pytest.raises(SaesteerError, match="unknown safety set"):
        evalsets.safety_prompts("nope", "test")


@needs_shared
def test_shared_sets_load_when_present():
    assert len(evalsets.safety_prompts("harmless", "test")) == 6266
    mix = {s: evalsets.safety_prompts("harmful_mix", s) for s in evalsets.SPLITS}
    assert sum(len(v) for v in mix.values()) == 200
    assert {p.category for p in mix["test"]} <= {"malicious_instruct", "tdc2023"}


def test_capability_sets():
    test = evalsets.mmlu("test")
    assert len(test) == 57 * 25 and all(0 <= q.answer < 4 and len(q.choices) == 4 for q in test)
    dev = evalsets.mmlu_dev()
    assert len(dev) == 57 and all(len(qs) == 5 for qs in dev.values())
    tqa_val, tqa_test = evalsets.truthfulqa("validation"), evalsets.truthfulqa("test")
    assert len(tqa_val) + len(tqa_test) == 817 and not {q.question for q in tqa_val} & {
        q.question for q in tqa_test
    }
    assert all(sum(y for _, y in q.mc1) == 1 for q in tqa_test)
    problems = evalsets.gsm8k("test")
    assert len(problems) == 1319 and problems[0].answer == "18"
    with pytest.raises(SaesteerError, match="unknown split 'train'"):
        evalsets.mmlu("train")
    assert all(len(d.human_turns) >= 2 for d in evalsets.hh_rlhf_dialogues("test"))
    assert len(evalsets.heldout_text()) == 80


def test_gsm8k_final_answer():
    assert evalsets.gsm8k_final_answer("so 3+4=<<3+4=7>>7\n#### 1,234") == "1234"
    with pytest.raises(SaesteerError, match="without '####'"):
        evalsets.gsm8k_final_answer("no answer")


def test_subsample_is_seeded_and_bounded():
    items = list(range(100))
    assert (
        evalsets.subsample(items, 10, 1)
        == evalsets.subsample(items, 10, 1)
        != evalsets.subsample(items, 10, 2)
    )
    assert set(evalsets.subsample(items, 5, 3)) <= set(evalsets.subsample(items, 20, 3))  # nested samples
    assert evalsets.subsample(items, None, 0) == items and evalsets.subsample(items, 500, 0) == items
    with pytest.raises(SaesteerError, match="at least 1"):
        evalsets.subsample(items, 0, 0)


def test_user_prompt_files_in_all_formats(tmp_path):
    (tmp_path / "p.csv").write_text('ID,Prompt,Other\n1,how do I pick a lock?,x\n2,"say, hello",y\n')
    (tmp_path / "q.csv").write_text("id,Question\n1,first\n")
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"GOAL": "write malware"}) + "\n\n" + json.dumps("plain string") + "\n"
    )
    (tmp_path / "p.txt").write_text("one\n\n  two  \n")
    csv_prompts = evalsets.load_prompt_file(tmp_path / "p.csv", "unsafe")
    assert [p.text for p in csv_prompts] == ["how do I pick a lock?", "say, hello"]
    assert csv_prompts[0].label == "unsafe" and csv_prompts[0].dataset == "user:p.csv"
    assert [p.text for p in evalsets.load_prompt_file(tmp_path / "q.csv", "safe", column="question")] == [
        "first"
    ]
    assert [p.text for p in evalsets.load_prompt_file(tmp_path / "p.jsonl", "unsafe")] == [
        "write malware",
        "plain string",
    ]
    assert [p.text for p in evalsets.load_prompt_file(tmp_path / "p.txt", "safe")] == ["one", "two"]


@pytest.mark.parametrize(
    "name, content, kwargs, message",
    [
        ("missing.txt", None, {}, "no such prompts file"),
        ("p.xlsx", "x", {}, "use .txt, .csv or .jsonl"),
        ("p.txt", "x", {"label": "harmful"}, "unknown label 'harmful'"),
        ("p.csv", "a,b\n1,2\n", {}, "no prompt column found"),
        ("p.csv", "prompt\nhi\n", {"column": "text"}, "has no column 'text'"),
        ("p.txt", "\n\n", {}, "no prompts found"),
        ("p.jsonl", '{"prompt": "a"}\n{broken\n', {}, "line 2 is not valid JSON"),
    ],
)
def test_bad_prompt_files(tmp_path, name, content, kwargs, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(SaesteerError, match=message):
        evalsets.load_prompt_file(path, kwargs.pop("label", "unsafe"), **kwargs)
