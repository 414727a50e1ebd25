"""Text sources for activation collection: read documents, optionally chat-format them, pack into contexts.

A source is a file (.txt, .jsonl, .json, optionally .gz), a folder of such files, or `hf:<dataset id>`
(needs the `datasets` package and a network). Plain text is split into documents at blank lines.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from importlib.resources import files
from pathlib import Path

from saesteer.config import TextSource
from saesteer.errors import SaesteerError

_BUILTIN = {"builtin:corpus-slice": "corpus_slice.jsonl.gz"}
_SUFFIXES = (".txt", ".jsonl", ".json", ".txt.gz", ".jsonl.gz", ".json.gz")


def builtin_path(name: str) -> Path:
    return Path(str(files("saesteer") / "assets" / _BUILTIN[name]))


def source_files(data: str) -> list[Path]:
    """The files behind a local source, sorted, or an error naming what is wrong."""
    if data in _BUILTIN:
        return [builtin_path(data)]
    path = Path(data).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(_SUFFIXES))
        if not found:
            raise SaesteerError(f"no .txt/.jsonl/.json(.gz) files in folder {data}")
        return found
    if path.is_file():
        if not path.name.endswith(_SUFFIXES):
            raise SaesteerError(f"cannot read {data}: expected .txt, .jsonl or .json, optionally .gz")
        return [path]
    raise SaesteerError(f"no such file or folder: {data}")


def source_hash(data: str) -> str:
    """sha256 over the bytes of a local source's files (or of the dataset id for hub sources)."""
    digest = hashlib.sha256()
    if data.startswith("hf:"):
        digest.update(data.encode())
        return digest.hexdigest()
    for path in source_files(data):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _open_text(path: Path):
    try:
        if path.name.endswith(".gz"):
            return gzip.open(path, "rt", encoding="utf-8")
        return open(path, encoding="utf-8")
    except OSError as err:
        raise SaesteerError(f"cannot read {path}: {err.strerror or err}") from None


def _records(path: Path) -> Iterator[dict | str]:
    name = path.name.removesuffix(".gz")
    try:
        with _open_text(path) as f:
            if name.endswith(".jsonl"):
                for number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError:
                            raise SaesteerError(f"{path}:{number} is not valid JSON") from None
            elif name.endswith(".json"):
                try:
                    data = json.load(f)
                except json.JSONDecodeError as err:
                    raise SaesteerError(f"{path} is not valid JSON: {err}") from None
                yield from data if isinstance(data, list) else [data]
            else:
                paragraph: list[str] = []
                for line in f:
                    if line.strip():
                        paragraph.append(line)
                    elif paragraph:
                        yield "".join(paragraph)
                        paragraph = []
                if paragraph:
                    yield "".join(paragraph)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as err:
        raise SaesteerError(f"cannot read {path}: {err}") from None


def _hub_records(source: TextSource) -> Iterator[dict]:
    try:
        import datasets
    except ImportError:
        raise SaesteerError("hub datasets need the `datasets` package: pip install 'saesteer[hub]'") from None
    try:
        yield from datasets.load_dataset(source.data[3:], split=source.split, streaming=True)
    except Exception as err:  # the datasets library raises many types for offline / missing ids
        raise SaesteerError(f"cannot load dataset {source.data[3:]!r}: {str(err).splitlines()[0]}") from None


def iter_documents(source: TextSource, tokenizer=None) -> Iterator[str]:
    """Yield the source's documents as text, chat-formatted when asked, `passes` times over."""
    if source.passes < 1:
        raise SaesteerError(f"--passes must be at least 1, got {source.passes}")
    for _ in range(source.passes):
        yield from _documents(source, tokenizer)


def _documents(source: TextSource, tokenizer) -> Iterator[str]:
    records: Iterable = (
        _hub_records(source)
        if source.data.startswith("hf:")
        else _round_robin([_records(path) for path in source_files(source.data)])
    )
    transcript = source.chat == "transcript"
    pair = source.chat.split(",") if source.chat and not transcript else None
    if pair is not None and len(pair) != 2:
        raise SaesteerError(f"--chat expects 'prompt_field,response_field', got {source.chat!r}")
    for record in records:
        if isinstance(record, str):
            text = record
        elif "messages" in record:
            text = render_chat(tokenizer, record["messages"])
        elif transcript:
            text = render_chat(tokenizer, parse_transcript(record.get(source.field, "")))
        elif pair:
            try:
                messages = [
                    {"role": "user", "content": record[pair[0]]},
                    {"role": "assistant", "content": record[pair[1]]},
                ]
            except KeyError as err:
                raise SaesteerError(
                    f"record has no field {err.args[0]!r} (fields: {', '.join(record)})"
                ) from None
            text = render_chat(tokenizer, messages)
        else:
            if source.field not in record:
                raise SaesteerError(
                    f"record has no field {source.field!r} (fields: {', '.join(record)}); use --field"
                )
            text = record[source.field]
        if text and text.strip():
            yield text


def _round_robin(streams: list[Iterator]) -> Iterator:
    while streams:
        for stream in list(streams):
            item = next(stream, _END)
            if item is _END:
                streams.remove(stream)
            else:
                yield item


_END = object()
_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_transcript(text: str) -> list[dict]:
    """Split a "\n\nHuman: ...\n\nAssistant: ..." dialogue into chat messages."""
    parts = _TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2]) if c.strip()]


def render_chat(tokenizer, messages: list[dict]) -> str:
    """Render messages with the tokenizer's chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise SaesteerError("chat formatting needs a tokenizer with a chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False)


def pack_contexts(documents: Iterable[str], tokenizer, ctx: int) -> Iterator[list[int]]:
    """Concatenate tokenised documents (each closed by EOS) and cut them into contexts of `ctx`
    tokens, each starting with the BOS token (EOS where the model has no BOS)."""
    if ctx < 2:
        raise SaesteerError(f"--ctx must be at least 2, got {ctx}")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    buffer: list[int] = []
    for text in documents:
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + separator)
        while len(buffer) >= ctx - 1:
            yield [start] + buffer[: ctx - 1]
            del buffer[: ctx - 1]
