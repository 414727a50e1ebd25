"""The evaluation result cache (the digests of the steering's files: `artefacts.artefact_digest`): generations and log-likelihoods keyed by (model, steering, digest of the
steering's files, rendered prompt, decoding), in an append-only JSONL file, so reruns and resumed sweeps
do not recompute them, and a retrained SAE or direction saved at the same path is never served stale replies.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from saesteer import dist


class ResultCache:
    """Append-only JSONL map from a hashed key to a JSON value; a torn last line (crash) is ignored."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, object] = {}
        self.hits = self.misses = 0
        self._torn = (
            False  # the file ends inside a line (a crash mid-write): start the next append on a new line
        )
        if self.path and self.path.is_file():
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell():
                    f.seek(-1, os.SEEK_END)
                    self._torn = f.read(1) != b"\n"
            with open(
                self.path, encoding="utf-8", errors="replace"
            ) as f:  # a torn line may end mid-character
                for line in f:
                    try:
                        record = json.loads(line)
                        self.entries[record["key"]] = record["value"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue

    @staticmethod
    def key(**parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str):
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put_many(self, items: dict[str, object]) -> None:
        """Remember the items; rank 0 also appends them to the file, flushed to disk."""
        self.entries.update(items)
        if not self.path or not dist.is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("\n" * self._torn)
            self._torn = False
            f.write(
                "".join(
                    json.dumps({"key": k, "value": v}, ensure_ascii=False) + "\n" for k, v in items.items()
                )
            )
            f.flush()
            os.fsync(f.fileno())
