"""Rebuild the vendored evaluation sets in src/saesteer/assets/evals/ from ../shared/datasets.

Only permissively licensed sets are vendored (see assets/evals/SOURCE.md). Subsets are drawn with
fixed seeds, so rerunning this script reproduces the files byte for byte.
Run: python scripts/build_eval_assets.py [--shared ../shared/datasets]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
import shutil
from pathlib import Path

SEED = 0
MMLU_TEST_PER_SUBJECT = 25
MMLU_VAL_PER_SUBJECT = 10
GSM8K_VALIDATION = 200
HELDOUT_CHUNKS = 80
HELDOUT_CHARS = 2000
BENIGN_PER_PUBLIC_SOURCE = 250  # TruthfulQA, MMLU and GSM8K questions in the shippable benign set
WRITTEN_STYLES = ("everyday", "framed", "imperative")  # the styles of the project's harmful/benign pairs
WRITTEN = Path(__file__).resolve().parents[1] / "data" / "written"
OUT = Path(__file__).resolve().parents[1] / "src" / "saesteer" / "assets" / "evals"
LICENSES = {
    "advbench/LICENSE": "LICENSE-advbench-MIT.txt",
    "mmlu/LICENSE": "LICENSE-mmlu-MIT.txt",
    "gsm8k/LICENSE": "LICENSE-gsm8k-MIT.txt",
    "hh_rlhf_harmless/LICENSE": "LICENSE-hh-rlhf-MIT.txt",
    "truthfulqa/LICENSE": "LICENSE-truthfulqa-Apache-2.0.txt",
    "xstest/LICENSE": "LICENSE-xstest-CC-BY-4.0.txt",
    "corpus/LICENSE-ProjectGutenberg.txt": "LICENSE-ProjectGutenberg.txt",
}


def write(name: str, rows: list[dict]) -> None:
    path = OUT / name
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
    print(f"{name}: {len(rows)} rows, {path.stat().st_size / 1024:.0f} KiB")


def mmlu_rows(folder: Path, split: str, per_subject: int | None) -> list[dict]:
    rows = []
    for path in sorted(folder.glob(f"*_{split}.csv")):
        subject = path.name[: -len(f"_{split}.csv")]
        with open(path, newline="", encoding="utf-8") as f:
            items = [r for r in csv.reader(f)]
        if per_subject is not None and len(items) > per_subject:
            picked = sorted(random.Random(f"{SEED}:{subject}:{split}").sample(range(len(items)), per_subject))
            items = [items[i] for i in picked]
        for q, a, b, c, d, answer in items:
            rows.append(
                {
                    "subject": subject,
                    "question": q,
                    "choices": [a, b, c, d],
                    "answer": "ABCD".index(answer.strip()),
                }
            )
    return rows


def seeded(items: list, n: int, name: str) -> list:
    """n items drawn with random.Random(f"{SEED}:{name}"), kept in their original order."""
    return [items[i] for i in sorted(random.Random(f"{SEED}:{name}").sample(range(len(items)), n))]


def benign_rows(tqa: list[dict], mmlu_val_unused: list[dict], gsm_train_unused: list[dict]) -> list[dict]:
    """The shippable benign prompt set: public questions (none of them in a capability eval's test subset)
    plus the project's own written requests and benign twins (data/written, Apache-2.0)."""
    rows = [
        {"prompt": q["question"], "source": "truthfulqa"}
        for q in seeded(tqa, BENIGN_PER_PUBLIC_SOURCE, "benign:truthfulqa")
    ]
    rows += [
        {
            "prompt": q["question"] + "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", q["choices"])),
            "source": "mmlu",
        }
        for q in seeded(mmlu_val_unused, BENIGN_PER_PUBLIC_SOURCE, "benign:mmlu")
    ]
    rows += [
        {"prompt": q["question"], "source": "gsm8k"}
        for q in seeded(gsm_train_unused, BENIGN_PER_PUBLIC_SOURCE, "benign:gsm8k")
    ]
    for name, source in (("benign_requests.jsonl", "written"), ("benign_twins.jsonl", "benign_twins")):
        rows += [
            {"prompt": r["prompt"], "source": source}
            for r in map(json.loads, (WRITTEN / name).read_text().splitlines())
        ]
    return rows


def written_pairs() -> list[dict]:
    """The project's harmful requests with their benign twins, in three styles (data/written/pairs_*.jsonl)."""
    return [
        {"harmful": r["harmful"], "benign": r["benign"], "style": style, "category": r["category"]}
        for style in WRITTEN_STYLES
        for r in map(json.loads, (WRITTEN / f"pairs_{style}.jsonl").read_text().splitlines())
    ]


def hh_dialogues(path: Path) -> list[dict]:
    """Dialogues with >= 2 human turns; `first_turn_label` is the project's reading of the first human turn
    (harmful / benign / unclear; data/written/hh_rlhf_first_turn_labels.jsonl), null where unlabelled."""
    labels = {
        r["id"]: r["label"]
        for r in map(json.loads, (WRITTEN / "hh_rlhf_first_turn_labels.jsonl").read_text().splitlines())
    }
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            transcript = json.loads(line)["chosen"]
            turns = [part.split("\n\nAssistant:")[0].strip() for part in transcript.split("\n\nHuman:")[1:]]
            if len(turns) >= 2 and all(turns):
                rows.append({"id": i, "human_turns": turns, "first_turn_label": labels.get(i)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "datasets"
    )
    shared = parser.parse_args().shared
    OUT.mkdir(parents=True, exist_ok=True)
    for source, name in LICENSES.items():
        shutil.copyfile(shared / source, OUT / name)

    with open(shared / "xstest/xstest_prompts.csv", newline="", encoding="utf-8") as f:
        write(
            "xstest.jsonl.gz",
            [
                {
                    "id": int(r["id"]),
                    "prompt": r["prompt"],
                    "type": r["type"],
                    "label": r["label"],
                    "focus": r["focus"],
                    "note": r["note"],
                }
                for r in csv.DictReader(f)
            ],
        )

    train = {
        d["instruction"]
        for d in json.loads((shared / "refusal_direction/dataset/splits/harmful_train.json").read_text())
    }
    with open(shared / "advbench/data/advbench/harmful_behaviors.csv", newline="", encoding="utf-8") as f:
        write(
            "advbench.jsonl.gz",
            [
                {"prompt": r["goal"], "in_refusal_direction_train": r["goal"] in train}
                for r in csv.DictReader(f)
            ],
        )

    mmlu = shared / "mmlu/data"
    write("mmlu_test.jsonl.gz", mmlu_rows(mmlu / "test", "test", MMLU_TEST_PER_SUBJECT))
    mmlu_validation = mmlu_rows(mmlu / "val", "val", MMLU_VAL_PER_SUBJECT)
    write("mmlu_validation.jsonl.gz", mmlu_validation)
    write("mmlu_dev.jsonl.gz", mmlu_rows(mmlu / "dev", "dev", None))

    tqa = json.loads((shared / "truthfulqa/data/v1/mc_task.json").read_text())
    write(
        "truthfulqa_mc.jsonl.gz",
        [
            {"question": q["question"], "mc1_targets": q["mc1_targets"], "mc2_targets": q["mc2_targets"]}
            for q in tqa
        ],
    )

    def gsm(path: Path) -> list[dict]:
        return [
            {"question": r["question"], "answer": r["answer"]}
            for r in map(json.loads, path.read_text().splitlines())
        ]

    write("gsm8k_test.jsonl.gz", gsm(shared / "gsm8k/test.jsonl"))
    gsm_train = gsm(shared / "gsm8k/train.jsonl")
    picked = sorted(random.Random(f"{SEED}:gsm8k").sample(range(len(gsm_train)), GSM8K_VALIDATION))
    write("gsm8k_validation.jsonl.gz", [gsm_train[i] for i in picked])
    mmlu_unused = [r for r in mmlu_rows(mmlu / "val", "val", None) if r not in mmlu_validation]
    gsm_unused = [r for i, r in enumerate(gsm_train) if i not in set(picked)]
    write("benign.jsonl.gz", benign_rows(tqa, mmlu_unused, gsm_unused))

    write("written_pairs.jsonl.gz", written_pairs())
    write("hh_rlhf_dialogues.jsonl.gz", hh_dialogues(shared / "hh_rlhf_harmless/harmless-base/test.jsonl.gz"))

    chunks = [json.loads(line) for line in (shared / "corpus/gutenberg-001.jsonl").read_text().splitlines()]
    picked = sorted(random.Random(f"{SEED}:heldout").sample(range(len(chunks)), HELDOUT_CHUNKS))
    write(
        "heldout_text.jsonl.gz",
        [
            {
                "text": chunks[i]["text"][:HELDOUT_CHARS],
                "doc_id": chunks[i]["doc_id"],
                "chunk": chunks[i]["chunk"],
            }
            for i in picked
        ],
    )


if __name__ == "__main__":
    main()
