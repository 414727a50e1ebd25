"""The result cache: an append-only JSONL map that survives a torn last line and counts hits and misses."""

from __future__ import annotations

import json

import torch

from saesteer.artefacts import artefact_digest, save_direction
from saesteer.cache import ResultCache
from saesteer.steering import Stack


def test_keys_do_not_depend_on_the_order_of_their_parts():
    assert ResultCache.key(model="m", prompt="p") == ResultCache.key(prompt="p", model="m")
    assert ResultCache.key(model="m", prompt="p") != ResultCache.key(model="m", prompt="q")


def test_entries_persist_and_a_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = ResultCache(path)
    cache.put_many({"a": "reply a", "b": [1.0, 2.0]})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"key": "c", "val')  # a crash mid-write
    reloaded = ResultCache(path)
    assert reloaded.get("a") == "reply a" and reloaded.get("b") == [1.0, 2.0] and reloaded.get("c") is None
    assert (reloaded.hits, reloaded.misses) == (2, 1)
    reloaded.put_many({"c": "reply c"})  # appends after the torn line, which stays ignored
    assert ResultCache(path).get("c") == "reply c"
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()[-1:]] == ["c"]


def test_a_line_torn_inside_a_character_is_ignored_too(tmp_path):
    path = tmp_path / "c.jsonl"
    ResultCache(path).put_many({"a": "it’s fine"})
    with open(path, "ab") as f:
        f.write('{"key": "b", "value": "it’s'.encode()[:-1])  # cut inside the 3-byte apostrophe
    reloaded = ResultCache(path)
    assert reloaded.get("a") == "it’s fine" and reloaded.get("b") is None


def test_a_stack_digests_the_files_of_its_parts(tmp_path):
    direction = tmp_path / "d.safetensors"
    save_direction(direction, torch.ones(4), layer=1, model="m")
    stack = Stack(steerings=[{"method": "system_prompt"}, {"method": "actadd", "direction": str(direction)}])
    assert stack.files() == [str(direction)] and artefact_digest(stack.files()) == artefact_digest(
        [str(direction)]
    )
    assert artefact_digest(stack.files()) != ""


def test_a_cache_without_a_file_keeps_entries_in_memory_only(tmp_path):
    cache = ResultCache(None)
    cache.put_many({"a": 1})
    assert cache.get("a") == 1 and not list(tmp_path.iterdir())


def test_the_artefact_digest_follows_file_contents(tmp_path):
    folder = tmp_path / "sae"
    folder.mkdir()
    (folder / "cfg.json").write_text("{}")
    before = artefact_digest([str(folder)])
    assert before and artefact_digest([str(folder)]) == before
    (folder / "cfg.json").write_text('{"k": 1}')
    assert artefact_digest([str(folder)]) != before
    assert artefact_digest([]) == "" and artefact_digest([str(tmp_path / "missing")]) == ""
