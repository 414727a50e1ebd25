"""Artefacts on disk, read once: the shipped folder (`builtin:` names), SAEs, direction files and the digests
that key cached results to the exact files a steering read. A leaf of the package: it imports no steering,
gate or evaluation code, so every runtime module can load artefacts through it."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from saesteer.config import RESIDUAL_POINTS
from saesteer.errors import SaesteerError, short
from saesteer.sae import SAE

SHIPPED = "builtin:"  # prefix of paths inside the package's shipped artefacts (assets/shipped/)


def shipped_dir() -> Path:
    """The folder of the package's shipped artefacts (assets/shipped/)."""
    return Path(str(files("saesteer") / "assets" / "shipped"))


def resolve(path: str) -> str:
    """A file path, with `builtin:<name>` mapped into the shipped artefacts (and never out of them)."""
    if not path.startswith(SHIPPED):
        return path
    shipped = shipped_dir()
    target = shipped / path[len(SHIPPED) :]
    if not target.resolve().is_relative_to(shipped.resolve()):
        raise SaesteerError(f"{short(path)} leaves the shipped artefacts: builtin: names a file inside them")
    return str(target)


def file_identity(path: str) -> tuple:
    """What a file or folder is, however it is spelled: its real path, device, inode, size and mtime (so
    `builtin:sae/.` and `builtin:sae` are one SAE, and a file rewritten in place is another)."""
    real = Path(resolve(path)).resolve(strict=True)
    stat = real.stat()
    return str(real), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def load_sae(path: str):
    """Load (once per file, then cached) an SAE: a SAELens, sparsify or Gemma Scope folder, a Gemma Scope
    .npz file, `builtin:sae` (the shipped one) or `saelens:<release>/<sae id>` (sae_lens's pretrained registry).

    Returns a `saesteer.sae.SAE` in eval mode with frozen weights: `encode` maps raw residual activations
    [..., d_in] to latent codes [..., n_latents] in the SAE's latent units (the units of an `sae` steering's
    `values`), `decode` maps codes back to raw activations [..., d_in]; `cfg` holds d_in, n_latents, k,
    layer and hook_point. Every spelling of one file shares one cached copy (`file_identity`; at most 8 SAEs are
    kept). Raises SaesteerError when the path holds no SAE."""
    if path.startswith("saelens:"):
        release, _, sae_id = path.removeprefix("saelens:").partition("/")
        if not (release and sae_id):
            raise SaesteerError(f"{short(path)} is not saelens:<release>/<sae id>")
        return _load_registry_sae(release, sae_id)
    try:
        identity = file_identity(path)
    except (OSError, ValueError, RuntimeError):  # missing, a name too long or with NUL, a symlink loop
        raise SaesteerError(f"cannot read SAE at {short(path)}: no such folder or file") from None
    return _load_sae_file(*identity)


def clear_cache() -> None:
    """Forget every loaded SAE and direction (a file rewritten inside an SAE folder keeps the folder's identity)."""
    for cached in (_load_registry_sae, _load_sae_file, _load_direction_file):
        cached.cache_clear()


@functools.lru_cache(maxsize=8)
def _load_registry_sae(release: str, sae_id: str):
    return SAE.from_sae_lens(release, sae_id).eval().requires_grad_(False)


@functools.lru_cache(maxsize=8)
def _load_sae_file(real: str, *identity) -> SAE:
    return SAE.load(real).eval().requires_grad_(False)


def save_direction(
    path: str | Path, direction: torch.Tensor, layer: int, model: str, hook_point: str = "resid_post", **meta
) -> None:
    """Write a direction with the layer and model it belongs to (safetensors, string metadata)."""
    info = {
        "layer": str(layer),
        "model": model,
        "hook_point": hook_point,
        **{k: str(v) for k, v in meta.items()},
    }
    save_file({"direction": direction.detach().float().cpu().contiguous()}, str(path), metadata=info)


def load_direction(path: str) -> tuple[torch.Tensor, dict]:
    """A unit direction and its metadata (layer, model, ...) from a safetensors file, read once per file
    however it is spelled (the conditional detector asks for it at every prefill; at most 16 are kept)."""
    try:
        return _load_direction_file(*file_identity(path))
    except SaesteerError:
        raise
    except Exception as err:  # missing file, bad header, missing tensor
        raise SaesteerError(f"cannot read direction file {short(path)}: {short(str(err), 200)}") from None


@functools.lru_cache(maxsize=16)
def _load_direction_file(real: str, *identity) -> tuple[torch.Tensor, dict]:
    with safe_open(real, "pt") as f:
        direction, meta = f.get_tensor("direction").float(), f.metadata() or {}
    layer_of(meta, real)  # checked where the file is read, not where a batch uses it
    if meta.get("hook_point", "resid_post") not in RESIDUAL_POINTS:
        raise SaesteerError(
            f"direction file {short(real)} names an unknown hook point {short(meta['hook_point'])!r}"
        )
    return direction / direction.norm(), meta


def layer_of(meta: dict, path: str) -> int:
    """The decoder layer a direction file's metadata names (-1 when it names none)."""
    try:
        return int(meta.get("layer", -1))
    except ValueError:
        raise SaesteerError(f"direction file {short(path)} names a layer that is not an integer") from None


def exists(path: str, test: Callable[[Path], bool]) -> bool:
    """`test(Path(path))`, False where the name cannot be a path at all (too long, NUL byte)."""
    try:
        return test(Path(path))
    except (OSError, ValueError):
        return False


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artefact_digest(paths: list[str]) -> str:
    """SHA-256 over the contents of the named files, in order (a folder: every file in it, sorted); empty
    when there are none. Cached results carry it, so a retrained SAE saved at the same path is never served
    stale replies."""
    found: list[Path] = []
    for name in paths:
        path = Path(resolve(name)) if name else None
        if path is not None and path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path is not None and path.is_file():
            found.append(path)
    if not found:
        return ""
    digests = "".join(_file_digest(str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in found)
    return hashlib.sha256(digests.encode()).hexdigest()
