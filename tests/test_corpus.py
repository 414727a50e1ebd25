import gzip
import json

import pytest
from conftest import make_tokenizer

from saesteer.corpus import TextSource, iter_documents, pack_contexts, source_hash
from saesteer.errors import SaesteerError


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_reads_txt_jsonl_json_and_gz(tmp_path, tok):
    (tmp_path / "a.txt").write_text("first para\nline two\n\nsecond para\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "from jsonl"}) + "\n\n")
    (tmp_path / "c.json").write_text(json.dumps([{"body": "from json"}]))
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "from gzip"}) + "\n")
    assert list(iter_documents(TextSource(str(tmp_path / "a.txt")))) == [
        "first para\nline two\n",
        "second para\n",
    ]
    docs = list(iter_documents(TextSource(str(tmp_path), field="body")))
    # A folder's files are read round-robin so every prefix mixes them.
    assert docs == ["first para\nline two\n", "from jsonl", "from json", "from gzip", "second para\n"]


def test_chat_formatting(tmp_path, tok):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps({"q": "Hi?", "a": "Hello."})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Yo"}]})
        + "\n"
    )
    docs = list(iter_documents(TextSource(str(path), chat="q,a"), tok))
    assert docs[0] == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    assert docs[1] == "<|im_start|>user\nYo<|im_end|>\n"


def test_transcripts_become_chat(tmp_path, tok):
    path = tmp_path / "hh.jsonl"
    path.write_text(
        json.dumps({"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant: Bye!"}) + "\n"
    )
    [doc] = iter_documents(TextSource(str(path), field="chosen", chat="transcript"), tok)
    assert doc.count("<|im_start|>user") == 2 and doc.endswith("<|im_start|>assistant\nBye!<|im_end|>\n")


def test_pack_contexts_start_with_bos_and_keep_every_token(tok):
    docs = ["the quick brown fox", "jumps over the lazy dog"] * 5
    contexts = list(pack_contexts(docs, tok, ctx=8))
    assert contexts and all(len(c) == 8 and c[0] == tok.bos_token_id for c in contexts)
    stream = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert [t for c in contexts for t in c[1:]] == stream[: 7 * len(contexts)]


def test_bad_sources(tmp_path, tok):
    with pytest.raises(SaesteerError, match="no such file"):
        list(iter_documents(TextSource(str(tmp_path / "missing.jsonl"))))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(SaesteerError, match="expected .txt"):
        list(iter_documents(TextSource(str(tmp_path / "x.csv"))))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(SaesteerError, match="bad.jsonl:1 is not valid JSON"):
        list(iter_documents(TextSource(str(tmp_path / "bad.jsonl"))))
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(SaesteerError, match="no field 'text'"):
        list(iter_documents(TextSource(str(tmp_path / "nofield.jsonl"))))
    (tmp_path / "bin.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(SaesteerError, match="cannot read"):
        list(iter_documents(TextSource(str(tmp_path / "bin.txt.gz"))))


def test_source_hash_tracks_content(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one")
    first = source_hash(str(path))
    path.write_text("two")
    assert source_hash(str(path)) != first


def test_builtin_slice_is_readable():
    docs = list(iter_documents(TextSource()))
    assert len(docs) == 520 and sum(map(len, docs)) > 1_000_000
