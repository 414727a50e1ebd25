"""Collect residual-stream activations into a resumable safetensors cache, and stream them back.

Cache layout: `manifest.json` plus shards `shard-NNNNN.safetensors`, each one tensor "acts"
[tokens, d_model]. Shard g holds contexts [g*S, (g+1)*S) of the packed data (S = contexts per
shard), so every shard is a pure function of the config: a rerun after a crash skips the shards
the manifest lists and produces a cache byte-identical to an uninterrupted run. Under torchrun,
rank r collects shards g with g % world_size == r and rank 0 merges the per-rank manifests.

The manifest records each shard's sha256. A rerun re-hashes the shards it would skip and collects a
shard again (with a warning) if its bytes no longer match; `ActivationStore` checks a shard the first
time it loads it and raises SaesteerError, naming the shard, on a mismatch. Shards of manifests
written before checksums existed are trusted as they are: the first rerun hashes them and records
the checksums, and the store loads them unchecked until then.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save_file
from tqdm.auto import tqdm

from saesteer import dist
from saesteer.config import CollectConfig
from saesteer.corpus import iter_documents, pack_contexts, source_hash
from saesteer.errors import SaesteerError
from saesteer.hooks import residual_at
from saesteer.models import LoadedModel, load_model

MANIFEST = "manifest.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# Fields that define a collection: a folder holding a collection that differs in any of them is refused.
IDENTITY = ("model", "layer", "hook_point", "ctx", "dtype", "drop_special", "contexts_per_shard", "data")


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise SaesteerError(f"{path} is corrupt; delete the folder to start over") from None


def _rank_manifest(out: Path, rank: int) -> Path:
    return out / f"manifest.rank{rank}.json"


def _identity(manifest: dict) -> dict:
    return {key: manifest.get(key) for key in IDENTITY}


def _check_same_collection(out: Path, expected: dict) -> None:
    for path in [out / MANIFEST, *out.glob("manifest.rank*.json")]:
        if not path.is_file():
            continue
        found = _identity(json.loads(path.read_text()))
        diffs = [f"{k}: {found[k]!r} vs {expected[k]!r}" for k in IDENTITY if found[k] != expected[k]]
        if diffs:
            raise SaesteerError(f"{out} holds a different collection ({'; '.join(diffs)}); use another --out")


def _done_shards(out: Path) -> dict[int, dict]:
    """Shards recorded in the merged and per-rank manifests whose files exist and match their sha256
    (a shard that does not is left out, so it is collected again, with a warning; a shard recorded
    without a checksum, by an older saesteer, gets one computed now)."""
    done: dict[int, dict] = {}
    for path in [out / MANIFEST, *sorted(out.glob("manifest.rank*.json"))]:
        if path.is_file():
            for shard in json.loads(path.read_text())["shards"]:
                if (out / shard["file"]).is_file():
                    done[shard["index"]] = shard
    checked = {}
    for index, shard in done.items():
        digest = _sha256(out / shard["file"])
        if shard.get("sha256", digest) == digest:
            checked[index] = {**shard, "sha256": digest}
        else:
            print(
                f"saesteer: warning: {out / shard['file']} does not match its sha256 in the manifest "
                "(corrupted?); collecting it again",
                file=sys.stderr,
            )
    return checked


def _special_mask(input_ids: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
    return torch.isin(input_ids, torch.tensor(special_ids, dtype=input_ids.dtype))


def collect(
    config: CollectConfig, out: str | Path, loaded: LoadedModel | None = None, progress: bool = True
) -> dict:
    """Collect activations into `out` (resuming if it holds a partial run of the same config); return the manifest."""
    if config.dtype not in DTYPES:
        raise SaesteerError(f"unknown cache dtype {config.dtype!r}: use bfloat16 or float16")
    if config.tokens <= 0 or config.batch_size <= 0 or config.contexts_per_shard <= 0:
        raise SaesteerError("--tokens, --batch-size and --contexts-per-shard must be positive")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SaesteerError(f"--out {out} exists and is not a folder")
    rank, world = dist.rank_world()
    loaded = loaded or load_model(config.model, device=config.device)
    loaded.check_layer(config.layer)
    tokenizer = loaded.tokenizer
    manifest = _manifest(config, loaded)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_collection(out, manifest)

    n_contexts = math.ceil(config.tokens / config.ctx)
    n_shards = math.ceil(n_contexts / config.contexts_per_shard)
    expected = {
        g: min(config.contexts_per_shard, n_contexts - g * config.contexts_per_shard) for g in range(n_shards)
    }
    done = {
        g: s
        for g, s in _done_shards(out).items()
        if g in expected and (s["n_contexts"] == expected[g] or s.get("exhausted"))
    }
    mine = [g for g in range(n_shards) if g % world == rank]
    todo = [g for g in mine if g not in done]
    special_ids = sorted(set(tokenizer.all_special_ids))
    contexts = pack_contexts(iter_documents(config.data, tokenizer), tokenizer, config.ctx)
    first_context = next(contexts, None)
    if first_context is None:
        raise SaesteerError(f"no text found in {config.data.data} (empty dataset?)")
    contexts = itertools.chain([first_context], contexts)
    recorded = {g: done[g] for g in mine if g in done}

    bar = tqdm(
        total=sum(expected[g] for g in mine) * config.ctx,
        unit="tok",
        unit_scale=True,
        desc=f"collect L{config.layer}" + (f" rank {rank}" if world > 1 else ""),
        disable=not progress,
    )
    bar.update(sum(s["n_contexts"] for s in recorded.values()) * config.ctx)
    position = 0  # index of the next context the packer yields
    for g in todo:
        first, count = g * config.contexts_per_shard, expected[g]
        shard_contexts = list(itertools.islice(contexts, first - position, first - position + count))
        position = first + len(shard_contexts)
        if not shard_contexts:
            break
        acts = _activations(loaded, shard_contexts, config, special_ids, bar)
        entry = {
            "index": g,
            "file": _shard_name(g),
            "rank": rank,
            "n_contexts": len(shard_contexts),
            "n_tokens": int(acts.shape[0]),
            "exhausted": len(shard_contexts) < count,
        }
        tmp = out / (entry["file"] + ".tmp")
        save_file({"acts": acts}, str(tmp))
        entry["sha256"] = _sha256(tmp)
        os.replace(tmp, out / entry["file"])
        recorded[g] = entry
        _write_progress(out, manifest, recorded, rank, world)
        if len(shard_contexts) < count:
            break
    bar.close()
    _write_progress(out, manifest, recorded, rank, world)
    if world > 1:
        dist.barrier()
        if rank == 0:
            _merge_rank_manifests(out, manifest, world)
        dist.barrier()
    return json.loads((out / MANIFEST).read_text())


def _manifest(config: CollectConfig, loaded: LoadedModel) -> dict:
    """What a collection of `config` is (a cache's manifest, without its shards)."""
    return {
        "format": "saesteer-activations/1",
        "model": config.model,
        "layer": config.layer,
        "hook_point": config.hook_point,
        "d_model": loaded.d_model,
        "dtype": config.dtype,
        "ctx": config.ctx,
        "drop_special": config.drop_special,
        "contexts_per_shard": config.contexts_per_shard,
        "data": {**asdict(config.data), "sha256": source_hash(config.data.data)},
    }


def _activations(
    loaded: LoadedModel,
    contexts: list[list[int]] | torch.Tensor,
    config: CollectConfig,
    special_ids: list[int],
    bar,
) -> torch.Tensor:
    """Early-exit forward over contexts in batches; returns the kept positions' activations."""
    chunks = []
    for start in range(0, len(contexts), config.batch_size):
        ids = torch.as_tensor(contexts[start : start + config.batch_size], dtype=torch.long)
        t0 = time.perf_counter()
        hidden = (
            residual_at(loaded.model, ids.to(loaded.device), config.layer, config.hook_point).float().cpu()
        )
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if config.drop_special:
            hidden = hidden[~_special_mask(ids, special_ids).reshape(-1)]
        chunks.append(hidden.to(DTYPES[config.dtype]))
        bar.update(ids.numel())
        bar.set_postfix(tok_s=f"{ids.numel() / (time.perf_counter() - t0):,.0f}")
    return torch.cat(chunks)


def _write_progress(out: Path, manifest: dict, recorded: dict[int, dict], rank: int, world: int) -> None:
    shards = [recorded[g] for g in sorted(recorded)]
    body = {**manifest, "shards": shards, "n_tokens": sum(s["n_tokens"] for s in shards)}
    _write_json_atomic(out / MANIFEST if world == 1 else _rank_manifest(out, rank), body)


def _merge_rank_manifests(out: Path, manifest: dict, world: int) -> None:
    shards = {}
    previous = _read_manifest(out)
    for shard in previous["shards"] if previous else []:
        shards[shard["index"]] = shard
    for r in range(world):
        path = _rank_manifest(out, r)
        if path.is_file():
            for shard in json.loads(path.read_text())["shards"]:
                shards[shard["index"]] = shard
    ordered = [shards[g] for g in sorted(shards)]
    _write_json_atomic(
        out / MANIFEST, {**manifest, "shards": ordered, "n_tokens": sum(s["n_tokens"] for s in ordered)}
    )
    for r in range(world):
        _rank_manifest(out, r).unlink(missing_ok=True)


def _mix(seed: int, epoch: int, group: int) -> int:
    """A distinct RNG seed per (seed, epoch, group): group 0 orders the shards, group i+1 permutes group i."""
    return (seed * 1_000_003 + epoch) * 1_000_033 + group


class ActivationStore:
    """Read access to a collected cache: random-order batches for training, or one tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = _read_manifest(self.path)
        if manifest is None:
            raise SaesteerError(
                f"{self.path} holds no activation cache ({MANIFEST} missing); run `saesteer collect` first"
            )
        if not manifest["shards"]:
            raise SaesteerError(f"activation cache {self.path} has no shards yet")
        self.manifest = manifest
        self.shards = manifest["shards"]
        self._verified: set[str] = set()  # shards whose sha256 was checked (once per store)

    @property
    def d_model(self) -> int:
        return self.manifest["d_model"]

    @property
    def n_tokens(self) -> int:
        return self.manifest["n_tokens"]

    def load_shard(self, shard: dict) -> torch.Tensor:
        """A shard's activations; the first load of a shard checks its sha256 (if the manifest has one)."""
        path = self.path / shard["file"]
        try:
            if shard.get("sha256") and shard["file"] not in self._verified:
                data = path.read_bytes()
                if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                    raise SaesteerError(
                        f"shard {path} does not match its sha256 in the manifest (corrupted?): "
                        "rerun `saesteer collect` with the same arguments to collect it again"
                    )
                acts = load(data)["acts"]
                self._verified.add(shard["file"])
                return acts
            return load_file(str(path))["acts"]
        except SaesteerError:
            raise
        except Exception as err:  # safetensors raises its own error types on truncated files
            raise SaesteerError(f"cannot read shard {path}: {err}") from None

    def tensor(self, max_tokens: int | None = None) -> torch.Tensor:
        """The cache's first `max_tokens` activations (all if None) as float32."""
        parts, total = [], 0
        for shard in self.shards:
            if max_tokens is not None and total >= max_tokens:
                break
            part = self.load_shard(shard).float()
            parts.append(part)
            total += part.shape[0]
        return torch.cat(parts)[:max_tokens]

    def batches(
        self,
        batch_size: int,
        seed: int = 0,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shards_per_group: int = 4,
    ) -> Iterator[torch.Tensor]:
        """Endless, deterministic float32 batches [batch_size, d] in random order.

        Each epoch shuffles the shard order; groups of `shards_per_group` shards are loaded together,
        their rows permuted and cut into global batches of world_size * batch_size rows (a group's last
        partial batch is dropped), of which rank r takes slice r. `start_batch` skips batches without
        loading the groups they come from, so a resumed run sees exactly the batches it would have.
        """
        global_batch = batch_size * world_size
        per_epoch = sum(
            self._group_batches(group, global_batch) for group in self._groups(seed, 0, shards_per_group)
        )
        if per_epoch == 0:
            raise SaesteerError(
                f"cache {self.path} has fewer tokens per group than one batch of {global_batch}"
            )
        skip = start_batch
        for epoch in itertools.count():
            for index, group in enumerate(self._groups(seed, epoch, shards_per_group)):
                n_batches = self._group_batches(group, global_batch)
                if skip >= n_batches:
                    skip -= n_batches
                    continue
                rows = torch.cat([self.load_shard(s) for s in group])
                order = torch.randperm(
                    rows.shape[0], generator=torch.Generator().manual_seed(_mix(seed, epoch, index + 1))
                )
                for b in range(skip, n_batches):
                    take = order[
                        b * global_batch + rank * batch_size : b * global_batch + (rank + 1) * batch_size
                    ]
                    yield rows[take].float()
                skip = 0

    def _groups(self, seed: int, epoch: int, size: int) -> list[list[dict]]:
        order = torch.randperm(
            len(self.shards), generator=torch.Generator().manual_seed(_mix(seed, epoch, 0))
        )
        shuffled = [self.shards[i] for i in order.tolist()]
        return [shuffled[i : i + size] for i in range(0, len(shuffled), size)]

    @staticmethod
    def _group_batches(group: list[dict], global_batch: int) -> int:
        return sum(s["n_tokens"] for s in group) // global_batch


class StreamSource(ActivationStore):
    """Activations computed as training reads them, never written to disk: the shards `collect` would write
    for `config` (the same contexts and values, in the same batch order), each computed when a batch needs
    its group of shards, which is the shuffle buffer (`ActivationStore.batches`). Under torchrun every rank
    reads only its own shards (index % world_size == rank), so the model's forward passes are split too."""

    def __init__(self, config: CollectConfig, loaded: LoadedModel | None = None, progress: bool = True):
        self.config = config
        self.loaded = loaded or load_model(config.model, device=config.device)
        self.loaded.check_layer(config.layer)
        tokenizer = self.loaded.tokenizer
        documents = iter_documents(config.data, tokenizer)
        self.contexts = torch.empty(math.ceil(config.tokens / config.ctx), config.ctx, dtype=torch.int32)
        n = 0
        for n, context in enumerate(pack_contexts(documents, tokenizer, config.ctx), 1):
            self.contexts[n - 1] = torch.tensor(context, dtype=torch.int32)
            if n == len(self.contexts):
                break
        if n == 0:
            raise SaesteerError(f"no text found in {config.data.data} (empty dataset?)")
        self.contexts = self.contexts[:n]  # [n_contexts, ctx]
        self.special_ids = sorted(set(tokenizer.all_special_ids))
        kept = (
            (~_special_mask(self.contexts, self.special_ids)).sum(1)
            if config.drop_special
            else torch.full((n,), config.ctx)
        )
        per = config.contexts_per_shard
        self.shards = [
            {
                "index": g,
                "file": f"stream-{g}",
                "n_contexts": len(kept[start : start + per]),
                "n_tokens": int(kept[start : start + per].sum()),
            }
            for g, start in enumerate(range(0, n, per))
        ]
        self.manifest = {
            **_manifest(config, self.loaded),
            "stream": True,
            "shards": self.shards,
            "n_tokens": int(kept.sum()),
        }
        self.path = Path(f"stream:{config.model}@{config.layer}")
        self._verified: set[str] = set()
        self._kept: dict[int, torch.Tensor] = {}  # shards `tensor` computed, until training reads them
        self._keep = False
        self.rank, self.world = dist.rank_world()
        if len(self.shards) < self.world:
            raise SaesteerError(
                f"{len(self.shards)} streamed shards for {self.world} ranks: stream more tokens or lower "
                f"--contexts-per-shard"
            )
        self.bar = tqdm(
            unit="tok", unit_scale=True, desc=f"stream L{config.layer}", disable=not progress, leave=False
        )

    def batches(
        self,
        batch_size: int,
        seed: int = 0,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shards_per_group: int = 4,
    ) -> Iterator[torch.Tensor]:
        """`ActivationStore.batches` (the same batches as the cache of this collection); with several ranks,
        each rank's batches come from its own shards."""
        if world_size == 1:
            yield from super().batches(batch_size, seed, start_batch, shards_per_group=shards_per_group)
            return
        own = copy.copy(self)
        own.shards = [s for s in self.shards if s["index"] % world_size == rank]
        yield from ActivationStore.batches(
            own, batch_size, seed, start_batch, shards_per_group=shards_per_group
        )

    def tensor(self, max_tokens: int | None = None) -> torch.Tensor:
        """`ActivationStore.tensor`; the shards it computes are kept until training reads them (computed once)."""
        self._keep = True
        try:
            return super().tensor(max_tokens)
        finally:
            self._keep = False

    @torch.inference_mode()
    def load_shard(self, shard: dict) -> torch.Tensor:
        """The shard's activations, computed now (as `collect` computes them) unless `tensor` kept them."""
        if shard["index"] in self._kept:
            return self._kept.pop(shard["index"])
        per = self.config.contexts_per_shard
        contexts = self.contexts[shard["index"] * per : (shard["index"] + 1) * per]
        acts = _activations(self.loaded, contexts, self.config, self.special_ids, self.bar)
        if self._keep and shard["index"] % self.world == self.rank:  # a shard this rank will read
            self._kept[shard["index"]] = acts
        return acts
