"""Sparse autoencoders: TopK (Gao et al. 2024), BatchTopK, JumpReLU and standard ReLU at inference,
with training kernels for TopK that are sparse in k.

Conventions:
- Users pass *raw* activations. The SAE holds a scalar `cfg.norm_scale` (chosen at training
  time so that E|norm_scale * x|^2 = d_in) and applies it inside `encode`/`decode`, so
  `decode(encode(x))` is in raw units.
- Latent values `z` (and JumpReLU thresholds) are in *normalised* units (the SAE's internal space).
  The SAELens export folds the scale into the weights and gives the same `z` on raw activations.
- `W_dec` rows are directions, unit-norm for the SAEs saesteer trains but not always for loaded ones;
  decode(z) = z @ W_dec + b_dec holds either way.

Evaluation (`sae_metrics`; the `saesteer evaluate-sae` stage is `trainer.evaluate_sae`): FVU, L0 and dead/dense latent fractions on
activations (`reconstruction_metrics`, any architecture), and next-token CE with the SAE spliced into
the model, loss recovered and KL (`spliced_metrics`), on held-out contexts (`heldout_contexts`).

Training is TopK only. Only its encoder matmul is dense (2*d*n FLOPs per token). The decoder
forward/backward and the encoder weight gradient touch only the k selected latents per token (plus
the AuxK latents).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import warnings
import zipfile
from dataclasses import asdict, dataclass, field, fields
from numbers import Integral, Real
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saesteer.corpus import TextSource, iter_documents, pack_contexts
from saesteer.errors import SaesteerError, short
from saesteer.hooks import edit_residual, residual_at

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
CFG_FILE = "cfg.json"
GEMMA_SCOPE_WEIGHTS = "params.npz"
ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu")
SAELENS_ARCHITECTURES = {"topk": "topk", "batchtopk": "batchtopk", "jumprelu": "jumprelu", "standard": "relu"}


class SAEError(SaesteerError):
    """Bad SAE config, input or file."""


MAX_WEIGHTS = 2**31  # per encoder or decoder matrix: 8 GiB in float32, far above any SAE of a 70B model


@dataclass
class SAEConfig:
    """Shape and architecture of the SAE plus where it was trained; saved with the weights."""

    d_in: int
    """width of the activations it reads"""
    n_latents: int
    """number of latents (dictionary size)"""
    k: int | None = None
    """latents kept per token (topk only)"""
    architecture: str = "topk"
    """z = ReLU(TopK(pre)) for topk; relu(pre) * (pre > threshold) for jumprelu and batchtopk (a BatchTopK SAE
    at inference, as sae_lens saves it); relu(pre) for relu"""
    norm_scale: float = 1.0
    """raw activations are multiplied by this before encoding"""
    model: str = ""
    """the model it was trained on"""
    layer: int | None = None
    """the decoder layer it reads (None: unknown, e.g. Gemma Scope's params.npz)"""
    hook_point: str = "resid_post"
    """resid_post or resid_pre"""
    training_data: dict = field(default_factory=dict)
    """e.g. {source, sha256, dtype, ctx}"""
    training_tokens: int = 0
    """activations it was trained on"""

    def __post_init__(self):
        # cfg.json is user input: a field of the wrong type is one SAEError line, not a TypeError later.
        for names, kinds, what in (
            (("d_in", "n_latents", "training_tokens"), Integral, "an integer"),
            (("k", "layer"), (Integral, type(None)), "an integer or null"),
            (("norm_scale",), Real, "a number"),
            (("model", "hook_point", "architecture"), str, "a string"),
            (("training_data",), dict, "a JSON object"),
        ):
            for name in names:
                value = getattr(self, name)
                if not isinstance(value, kinds) or isinstance(value, bool):
                    raise SAEError(f"SAE config field {name} must be {what}, got {short(repr(value))}")
        if self.architecture not in ARCHITECTURES:
            raise SAEError(
                f"unknown SAE architecture {short(self.architecture)!r}: use one of {', '.join(ARCHITECTURES)}"
            )
        if (
            min(self.d_in, self.n_latents) < 1
            or self.architecture == "topk"
            and not 1 <= (self.k or 0) <= self.n_latents
        ):
            raise SAEError(
                f"need d_in, n_latents >= 1 and, for topk, 1 <= k <= n_latents; got d_in={self.d_in}, "
                f"n_latents={self.n_latents}, k={self.k}"
            )
        if self.d_in * self.n_latents > MAX_WEIGHTS:
            raise SAEError(
                f"an SAE of d_in {self.d_in} x n_latents {self.n_latents} is too large to load "
                f"(over {MAX_WEIGHTS:,} weights per matrix)"
            )
        if not (math.isfinite(self.norm_scale) and self.norm_scale > 0):
            raise SAEError(f"norm_scale must be a positive finite number, got {self.norm_scale}")

    @classmethod
    def from_dict(cls, d: dict) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR tensor, valid by construction (sorted, distinct columns), without torch's beta warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class _LatentMajor:
    """Latent-major (CSR, n x B) view of a token-major top-k pattern `indices` [B, kk].

    Rows are latents, columns the tokens that selected them, sorted and distinct (a token selects
    a latent at most once), so it is a valid CSR tensor for torch.sparse kernels; the same arrays
    are embedding_bag (indices, offsets) with one bag per latent.
    """

    def __init__(self, indices: Tensor, n: int):
        flat = indices.reshape(-1)
        self.shape = (n, indices.shape[0])
        self.order = flat.argsort(stable=True)
        self.crow = F.pad(torch.bincount(flat, minlength=n).cumsum(0), (1, 0))
        self.tokens = self.order // indices.shape[1]

    def t_matmul(self, values: Tensor, dense: Tensor) -> Tensor:
        """S^T @ dense, where S[b, indices[b, s]] = values[b, s]: the [n, m] per-latent sums.

        One bag per latent over the rows of `dense` (3x faster on CPU than a CSR matmul, which
        copies and zero-fills its operands)."""
        vals = values.reshape(-1)[self.order]
        return F.embedding_bag(self.tokens, dense, self.crow[:-1], per_sample_weights=vals, mode="sum")

    def sampled_dots(self, rows: Tensor, dense: Tensor) -> Tensor:
        """out[b, s] = <rows[indices[b, s]], dense[b]>, shaped like `indices`."""
        pattern = _csr(self.crow, self.tokens, rows.new_zeros(self.order.numel()), self.shape)
        dots = torch.sparse.sampled_addmm(pattern, rows, dense.T, beta=0.0).values()
        out = torch.empty_like(dots)
        out[self.order] = dots
        return out.view(self.shape[1], -1)


def _exact_preacts(indices: Tensor, xc: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """Pre-activations [B, kk] of the chosen latents `indices` [B, kk] in the dtype of xc [B, d]: the chosen
    (token, latent) pairs only, so a top-k chosen from a low-precision matmul gets exact values."""
    return _LatentMajor(indices, W_enc.shape[0]).sampled_dots(W_enc, xc) + b_enc[indices]


class _TopKEncode(torch.autograd.Function):
    """z = ReLU(TopK(W_enc (x - b_dec) + b_enc)) as (values, indices), plus AuxK's top-k_aux
    over the `dead` latents. Backward is sparse: only selected (token, latent) pairs get grads."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k, dead, k_aux, workspace):
        xc = x - b_dec
        # a lower-precision workspace only chooses the top-k; the chosen values are recomputed in xc's dtype
        low = workspace is not None and workspace.dtype.itemsize < xc.dtype.itemsize
        if workspace is None:
            pre = torch.addmm(b_enc, xc, W_enc.T)
        else:
            dt = workspace.dtype
            pre = torch.addmm(b_enc.to(dt), xc.to(dt), W_enc.to(dt).T, out=workspace)
        values, indices = pre.topk(k, dim=1, sorted=False)
        if low:
            values = _exact_preacts(indices, xc, W_enc, b_enc)
        values.relu_()
        if dead is not None and k_aux > 0:
            aux_values, pos = pre.index_select(1, dead).topk(k_aux, dim=1, sorted=False)
            aux_indices = dead[pos]
            if low:
                aux_values = _exact_preacts(aux_indices, xc, W_enc, b_enc)
            aux_values.relu_()
        else:
            aux_values = values.new_empty(x.shape[0], 0)
            aux_indices = indices.new_empty(x.shape[0], 0)
        ctx.save_for_backward(xc, W_enc, values, indices, aux_values, aux_indices)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, g_values, _g_indices, g_aux, _g_aux_indices):
        xc, W_enc, values, indices, aux_values, aux_indices = ctx.saved_tensors
        n = W_enc.shape[0]
        parts = [(indices, g_values * (values > 0))]
        if aux_indices.shape[1] and g_aux is not None:
            parts.append((aux_indices, g_aux * (aux_values > 0)))

        grad_W = None
        grad_b_enc = values.new_zeros(n)
        grad_x = torch.zeros_like(xc) if ctx.needs_input_grad[0] else None
        for idx, g in parts:
            gw = _LatentMajor(idx, n).t_matmul(g, xc)
            grad_W = gw if grad_W is None else grad_W.add_(gw)
            grad_b_enc.index_add_(0, idx.reshape(-1), g.reshape(-1))
            if grad_x is not None:
                grad_x += F.embedding_bag(idx, W_enc, per_sample_weights=g, mode="sum")
        grad_b_dec = -(grad_b_enc @ W_enc) if ctx.needs_input_grad[3] else None
        return grad_x, grad_W, grad_b_enc, grad_b_dec, None, None, None, None


class _SparseDecode(torch.autograd.Function):
    """out[b] = sum_s values[b, s] * W_dec[indices[b, s]] (no bias); sparse backward."""

    @staticmethod
    def forward(ctx, values, indices, W_dec):
        ctx.save_for_backward(values, indices, W_dec)
        return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, g_out):
        values, indices, W_dec = ctx.saved_tensors
        pattern = _LatentMajor(indices, W_dec.shape[0])
        g_values = pattern.sampled_dots(W_dec, g_out) if ctx.needs_input_grad[0] else None
        g_W = pattern.t_matmul(values, g_out) if ctx.needs_input_grad[2] else None
        return g_values, None, g_W


class TrainOutput(NamedTuple):
    x_hat: Tensor  # reconstruction, normalised units, without grad
    values: Tensor  # [B, k] latent values (post-ReLU)
    indices: Tensor  # [B, k] latent ids
    fvu: Tensor  # sum |x - x_hat|^2 / total variance
    auxk: Tensor  # AuxK loss (0 when no latent is dead)


class SAE(nn.Module):
    """An SAE of any `cfg.architecture` (trainable when TopK). Parameters live in normalised space;
    public encode/decode take raw activations."""

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        super().__init__()
        self.cfg = cfg
        W = torch.randn(cfg.n_latents, cfg.d_in, device=device)
        W /= W.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W)  # [n, d], unit rows
        self.W_enc = nn.Parameter(W.clone())  # [n, d]: encoder initialised as decoder^T
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents, device=device))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device))
        # [n] per-latent JumpReLU threshold on the pre-activation (jumprelu, batchtopk); None otherwise
        gated = cfg.architecture in ("jumprelu", "batchtopk")
        self.threshold = nn.Parameter(torch.zeros(cfg.n_latents, device=device)) if gated else None

    # ---------------------------------------------------------------- inference (raw units)
    def _check(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.cfg.d_in:
            raise SAEError(f"activations have d={x.shape[-1]} but the SAE expects d_in={self.cfg.d_in}")
        return x.reshape(-1, self.cfg.d_in).to(self.W_enc.dtype) * self.cfg.norm_scale

    def encode_topk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Raw activations [..., d_in] -> (values, indices) [..., k]; values >= 0, normalised units.
        TopK SAEs only."""
        if self.cfg.architecture != "topk":
            raise SAEError(f"encode_topk needs a topk SAE, this one is {self.cfg.architecture}")
        values, indices, _, _ = _TopKEncode.apply(
            self._check(x), self.W_enc, self.b_enc, self.b_dec, self.cfg.k, None, 0, None
        )
        shape = (*x.shape[:-1], self.cfg.k)
        return values.view(shape), indices.view(shape)

    def encode(self, x: Tensor) -> Tensor:
        """Raw activations [..., d_in] -> dense latents [..., n_latents] (normalised units)."""
        if self.cfg.architecture == "topk":
            values, indices = self.encode_topk(x)
            z = values.new_zeros(*values.shape[:-1], self.cfg.n_latents)
            return z.scatter_(-1, indices, values)
        pre = torch.addmm(self.b_enc, self._check(x) - self.b_dec, self.W_enc.T)
        return self._activate(pre).view(*x.shape[:-1], self.cfg.n_latents)

    def _activate(self, pre: Tensor, latents: Tensor | None = None) -> Tensor:
        """The non-TopK nonlinearity on pre-activations [N, m] of `latents` [m] (all latents if None)."""
        z = pre.relu()
        if self.threshold is None:
            return z
        return z * (pre > (self.threshold if latents is None else self.threshold[latents]))

    def latent_codes(self, x: Tensor, latents: Tensor) -> Tensor:
        """encode(x)[..., latents] -> [..., m] for raw x [..., d_in] and latent ids `latents` [m], without
        the full encoder where the architecture allows. JumpReLU/BatchTopK/ReLU latents depend only on
        their own pre-activation. A TopK latent with pre-activation <= 0 is 0 whatever the top-k does, so
        the full encoder runs only on the (few) tokens where a requested latent is positive."""
        xc = self._check(x) - self.b_dec
        pre = xc @ self.W_enc[latents].T + self.b_enc[latents]
        if self.cfg.architecture != "topk":
            return self._activate(pre, latents).view(*x.shape[:-1], len(latents))
        codes = torch.zeros_like(pre)
        maybe = (pre > 0).any(-1).nonzero().squeeze(-1)
        if len(maybe):
            values, indices = self.encode_topk(x.reshape(-1, self.cfg.d_in)[maybe])
            codes[maybe] = torch.where(indices[:, None, :] == latents[:, None], values[:, None, :], 0.0).sum(
                -1
            )
        return codes.view(*x.shape[:-1], len(latents))

    def decode(self, z: Tensor) -> Tensor:
        """Dense latents [..., n_latents] -> reconstruction in raw units [..., d_in]."""
        return (z @ self.W_dec + self.b_dec) / self.cfg.norm_scale

    def decode_topk(self, values: Tensor, indices: Tensor) -> Tensor:
        """(values, indices) [..., k] -> reconstruction in raw units, touching only k rows."""
        k = values.shape[-1]
        flat = _SparseDecode.apply(values.reshape(-1, k), indices.reshape(-1, k), self.W_dec)
        return ((flat + self.b_dec) / self.cfg.norm_scale).view(*values.shape[:-1], self.cfg.d_in)

    def forward(self, x: Tensor) -> Tensor:
        """Raw activations -> raw reconstruction, in x's dtype."""
        if self.cfg.architecture == "topk":
            return self.decode_topk(*self.encode_topk(x)).to(x.dtype)
        return self.decode(self.encode(x)).to(x.dtype)

    # ------------------------------------------------------------- training (normalised units)
    def training_loss(
        self,
        x: Tensor,
        dead: Tensor | None = None,
        total_variance: Tensor | None = None,
        workspace: Tensor | None = None,
    ) -> TrainOutput:
        """Losses on *normalised* activations x [B, d_in].

        dead: ids of latents that have not fired recently; AuxK (Gao et al. App. B.1) makes the
        top-k_aux (k_aux = d_in/2) of them reconstruct the residual. total_variance: the FVU
        denominator; pass the global value when the batch is sharded across ranks. workspace: an
        optional reusable [B, n_latents] buffer for the pre-activations (a fresh 75 MB allocation
        per step costs ~10% on CPU, in page faults); the dense encoder matmul runs in its dtype, and when
        that is lower than x's (bfloat16) it only chooses each token's top-k: the chosen latents' values,
        the loss and every gradient stay in x's precision. TopK SAEs only.
        """
        if self.cfg.architecture != "topk":
            raise SAEError(f"only topk SAEs train, this one is {self.cfg.architecture}")
        if total_variance is None:
            total_variance = (x - x.mean(0)).pow(2).sum()
        k_aux = min(self.cfg.d_in // 2, 0 if dead is None else dead.numel())
        values, indices, aux_values, aux_indices = _TopKEncode.apply(
            x, self.W_enc, self.b_enc, self.b_dec, self.cfg.k, dead, k_aux, workspace
        )
        x_hat = _SparseDecode.apply(values, indices, self.W_dec) + self.b_dec
        err = x - x_hat
        fvu = err.pow(2).sum() / total_variance
        if k_aux:
            err_hat = _SparseDecode.apply(aux_values, aux_indices, self.W_dec)
            scale = min(dead.numel() / (self.cfg.d_in // 2), 1.0)
            auxk = scale * (err_hat - err.detach()).pow(2).sum() / total_variance
        else:
            auxk = fvu.new_zeros(())
        return TrainOutput(x_hat.detach(), values.detach(), indices, fvu, auxk)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Project out the gradient component along each (unit) decoder row."""
        g = self.W_dec.grad
        if g is not None:
            g.addcmul_((g * self.W_dec).sum(1, keepdim=True), self.W_dec, value=-1)

    @torch.no_grad()
    def init_from_sample(self, x: Tensor) -> None:
        """Set cfg.norm_scale so E|scale*x|^2 = d_in, and b_dec to the sample's geometric median."""
        x = x.to(self.W_enc.dtype)
        mean_sq = x.pow(2).sum(1).mean().item()
        if not (math.isfinite(mean_sq) and mean_sq > 0):
            raise SAEError("initialisation sample is all zeros or not finite")
        self.cfg.norm_scale = math.sqrt(self.cfg.d_in / mean_sq)
        self.b_dec.copy_(geometric_median(x * self.cfg.norm_scale))

    # ---------------------------------------------------------------------------- formats
    def save(self, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write SAELens format (cfg.json + sae_weights.safetensors), normalisation folded in; `dtype`
        float32 or bfloat16 (half the size, for shipping). A BatchTopK SAE is written as sae_lens writes one
        for inference: a JumpReLU (its `architecture` kept in the saesteer metadata)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        s = self.cfg.norm_scale
        weights = {
            "W_enc": (self.W_enc.detach() * s).T.contiguous(),
            "b_enc": self.b_enc.detach().clone(),
            "W_dec": (self.W_dec.detach() / s).contiguous(),
            "b_dec": (self.b_dec.detach() / s).contiguous(),
        }
        if self.threshold is not None:
            weights["threshold"] = (
                self.threshold.detach().clone()
            )  # pre-activation units: unchanged by the fold
        weights = {name: w.to("cpu", dtype).contiguous() for name, w in weights.items()}
        hook = (
            self.cfg.hook_point
            if self.cfg.layer is None
            else f"blocks.{self.cfg.layer}.hook_{self.cfg.hook_point}"
        )
        cfg = {
            "architecture": {"relu": "standard", "batchtopk": "jumprelu"}.get(
                self.cfg.architecture, self.cfg.architecture
            ),
            "d_in": self.cfg.d_in,
            "d_sae": self.cfg.n_latents,
            **(
                {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}
                if self.cfg.architecture == "topk"
                else {}
            ),
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",  # the scale is folded into the weights
            "reshape_activations": "none",
            "dtype": str(dtype).removeprefix("torch."),
            "device": "cpu",
            "metadata": {
                "sae_lens_version": "6.0.0",  # config schema version this file follows
                "model_name": self.cfg.model,
                "hook_name": hook,
                "saesteer": asdict(self.cfg),
            },
        }
        save_file(weights, str(path / SAELENS_WEIGHTS))
        (path / CFG_FILE).write_text(json.dumps(cfg, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> SAE:
        """Load a directory in SAELens (cfg.json + sae_weights.safetensors), EleutherAI sparsify
        (cfg.json + sae.safetensors) or Gemma Scope (params.npz) format, or a Gemma Scope .npz file."""
        path = Path(path)
        npz = path if path.suffix == ".npz" else path / GEMMA_SCOPE_WEIGHTS
        try:
            if npz.is_file():
                sae = cls._from_gemma_scope(_read_npz(npz), npz)
            elif not isinstance(raw_cfg := json.loads((path / CFG_FILE).read_text(encoding="utf-8")), dict):
                raise SAEError(f"{path / CFG_FILE} must hold a JSON object, not {type(raw_cfg).__name__}")
            elif (path / SAELENS_WEIGHTS).exists():
                sae = cls._from_saelens(raw_cfg, load_file(str(path / SAELENS_WEIGHTS)))
            elif (path / SPARSIFY_WEIGHTS).exists():
                sae = cls._from_sparsify(raw_cfg, load_file(str(path / SPARSIFY_WEIGHTS)))
            else:
                raise SAEError(
                    f"{path} has none of {SAELENS_WEIGHTS} (SAELens), {SPARSIFY_WEIGHTS} (sparsify), "
                    f"{GEMMA_SCOPE_WEIGHTS} (Gemma Scope)"
                )
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError, zipfile.BadZipFile) as e:
            raise SAEError(f"cannot read SAE at {path}: {e}") from e
        except (TypeError, AttributeError, ValueError) as e:  # a field of the wrong JSON type
            raise SAEError(f"malformed {CFG_FILE} at {path}: {short(str(e), 200)}") from None
        except KeyError as e:
            raise SAEError(f"SAE at {path} is missing field or tensor {e}") from e
        return sae.to(device) if device is not None else sae

    @classmethod
    def from_sae_lens(cls, release: str, sae_id: str) -> SAE:
        """`sae_id` of `release` from sae_lens's pretrained registry (downloads from the Hugging Face hub)."""
        try:
            from sae_lens import SAE as SaeLensSAE
        except ImportError:
            raise SAEError(
                "loading saelens:<release>/<id> needs the sae-lens package: pip install sae-lens"
            ) from None
        try:
            theirs = SaeLensSAE.from_pretrained(release, sae_id, device="cpu")
        except Exception as e:  # unknown release or id, offline, download failure: sae_lens raises many kinds
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SAEError(f"sae_lens cannot load {release}/{sae_id}: {short(first, 200)}") from None
        return cls._from_saelens(
            theirs.cfg.to_dict(), {name: t.detach() for name, t in theirs.state_dict().items()}
        )

    @classmethod
    def _from_saelens(cls, c: dict, w: dict[str, Tensor]) -> SAE:
        architecture = SAELENS_ARCHITECTURES.get(c.get("architecture"))
        if architecture is None:
            raise SAEError(
                f"SAELens architecture {short(c.get('architecture'))!r} is not supported: "
                f"use one of {', '.join(SAELENS_ARCHITECTURES)}"
            )
        if c.get("normalize_activations", "none") not in ("none", False, None):
            raise SAEError(
                f"SAELens normalize_activations={c['normalize_activations']!r} is not supported; fold it first"
            )
        meta = c.get("metadata") or {}
        k = c.get("k") or (c.get("activation_fn_kwargs") or {}).get("k")
        hook = re.fullmatch(r"blocks\.(\d+)\.hook_(resid_pre|resid_post)", meta.get("hook_name") or "")
        saved = meta.get("saesteer") or {}  # the SAEConfig saesteer wrote, if it wrote this file
        settings = {
            "model": meta.get("model_name") or "",
            **({"layer": int(hook[1]), "hook_point": hook[2]} if hook else {}),
            **saved,
            "architecture": architecture,
            "d_in": c["d_in"],
            "n_latents": c["d_sae"],
        }
        if architecture == "jumprelu" and saved.get("architecture") == "batchtopk":  # see `save`
            settings["architecture"] = "batchtopk"
        cfg = SAEConfig.from_dict({**settings, "k": k if settings["architecture"] == "topk" else None})
        W_enc, b_enc, W_dec, b_dec = (w[n].float() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
        W_enc = W_enc.T
        if "threshold" in w:
            threshold = w["threshold"].float()
        elif "log_threshold" in w:  # older sae_lens JumpReLU checkpoints
            threshold = w["log_threshold"].float().exp()
        elif "topk_threshold" in w:  # a sae_lens BatchTopK training checkpoint: one threshold for all latents
            threshold = w["topk_threshold"].float().expand(cfg.n_latents)
        else:
            threshold = None
        # fold decoder norms (as sae_lens does); a threshold is already in the rescaled pre-activation's units
        if c.get("rescale_acts_by_decoder_norm", False):
            norms = W_dec.norm(dim=1).clamp_min(1e-8)
            W_dec, W_enc, b_enc = W_dec / norms[:, None], W_enc * norms[:, None], b_enc * norms
        if not c.get("apply_b_dec_to_input", True):
            b_enc = b_enc + W_enc @ b_dec
        s = cfg.norm_scale
        return cls._with_weights(cfg, W_enc / s, b_enc, W_dec * s, b_dec * s, threshold)

    @classmethod
    def _from_sparsify(cls, c: dict, w: dict[str, Tensor]) -> SAE:
        if c.get("activation", "topk") != "topk" or c.get("transcode") or c.get("skip_connection"):
            raise SAEError(
                "only sparsify TopK autoencoders (no transcoder, no skip connection) are supported"
            )
        n = c.get("num_latents") or c["d_in"] * c["expansion_factor"]
        cfg = SAEConfig(d_in=c["d_in"], n_latents=n, k=c["k"])
        return cls._with_weights(cfg, w["encoder.weight"], w["encoder.bias"], w["W_dec"], w["b_dec"])

    @classmethod
    def _from_gemma_scope(cls, w: dict[str, Tensor], path: Path) -> SAE:
        """Gemma Scope's JumpReLU arrays: W_enc [d_in, n], W_dec [n, d_in], b_enc, threshold [n], b_dec [d_in].
        Its encoder reads x itself, not x - b_dec. The file names no model or layer: the layer comes from a
        `layer_<n>` folder in `path` (Gemma Scope's repository layout), if any."""
        if w["W_enc"].ndim != 2:
            raise SAEError(f"W_enc has shape {tuple(w['W_enc'].shape)}, expected [d_in, n_latents]")
        d_in, n = w["W_enc"].shape
        layers = [int(part[6:]) for part in path.parts if re.fullmatch(r"layer_\d+", part)]
        cfg = SAEConfig(d_in=d_in, n_latents=n, architecture="jumprelu", layer=layers[-1] if layers else None)
        sae = cls._with_weights(cfg, w["W_enc"].T, w["b_enc"], w["W_dec"], w["b_dec"], w["threshold"])
        with torch.no_grad():
            sae.b_enc += sae.W_enc @ sae.b_dec
        return sae

    @classmethod
    def _with_weights(cls, cfg: SAEConfig, W_enc, b_enc, W_dec, b_dec, threshold=None) -> SAE:
        """An SAE with these normalised-space weights (W_enc and W_dec [n, d_in]), shapes checked."""
        expected = {
            "W_enc": (cfg.n_latents, cfg.d_in),
            "b_enc": (cfg.n_latents,),
            "W_dec": (cfg.n_latents, cfg.d_in),
            "b_dec": (cfg.d_in,),
        }
        tensors = [W_enc, b_enc, W_dec, b_dec]
        sae = cls(cfg)
        if sae.threshold is not None:
            if threshold is None:
                raise SAEError(f"a {cfg.architecture} SAE needs a threshold tensor")
            expected["threshold"] = (cfg.n_latents,)
            tensors.append(threshold)
        with torch.no_grad():
            for name, t in zip(expected, tensors):
                if tuple(t.shape) != expected[name]:
                    raise SAEError(f"{name} has shape {tuple(t.shape)}, config says {expected[name]}")
                getattr(sae, name).copy_(t)
        return sae


def _read_npz(path: Path) -> dict[str, Tensor]:
    """The arrays of an .npz file as float32 tensors (object arrays refused: no pickle)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: torch.from_numpy(np.asarray(data[name], dtype=np.float32)) for name in data.files}
    except ValueError as e:
        raise SAEError(f"cannot read {path} as plain arrays: {short(str(e), 200)}") from None


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 50, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to rows of x."""
    x = x.double()
    median = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - median).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(0) / w.sum()
        done = (new - median).norm() <= tol * median.norm().clamp_min(1.0)
        median = new
        if done:
            break
    return median.float()


# ------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def reconstruction_metrics(
    sae: SAE, acts: Tensor, batch_size: int = 1024, dense_threshold: float = 0.1
) -> dict:
    """FVU, mean L0, and the fractions of latents that never fire (dead) or fire on more than
    `dense_threshold` of tokens (dense), on raw activations [N, d_in]; any SAE architecture."""
    if acts.ndim != 2 or acts.shape[1] != sae.cfg.d_in:
        raise SAEError(f"activations have shape {tuple(acts.shape)}, the SAE expects [N, {sae.cfg.d_in}]")
    device = sae.W_enc.device
    sse = total = sq = 0.0
    l0 = 0
    counts = torch.zeros(sae.cfg.n_latents, device=device)
    for start in range(0, acts.shape[0], batch_size):
        x = acts[start : start + batch_size].to(device, torch.float32)
        if not torch.isfinite(x).all():
            raise SAEError(f"activations contain NaN or Inf (rows {start}..{start + x.shape[0] - 1})")
        z = sae.encode(x)  # [B, n_latents]
        x_hat = sae.decode(z)
        active = z > 0
        counts += active.sum(0)
        l0 += int(active.sum())
        sse += (x - x_hat).double().pow(2).sum().item()
        total = total + x.double().sum(0)
        sq += x.double().pow(2).sum().item()
    n_tok = acts.shape[0]
    variance = sq - (total.pow(2).sum().item() / n_tok)
    freq = counts / n_tok
    return {
        "tokens": n_tok,
        "fvu": sse / variance,
        "l0": l0 / n_tok,
        "dead_frac": (counts == 0).float().mean().item(),
        "dense_frac": (freq > dense_threshold).float().mean().item(),
    }


@torch.no_grad()
def spliced_metrics(
    sae: SAE,
    model: torch.nn.Module,
    contexts: Tensor,
    layer: int,
    point: str = "resid_post",
    batch_size: int = 8,
    skip_ids: list[int] | None = None,
) -> dict:
    """Next-token CE of the clean model, with the SAE reconstruction spliced in at (`layer`,
    `point`), and with the residual stream zero-ablated there; loss recovered and KL(clean || SAE).

    Positions holding `skip_ids` (BOS/EOS/special tokens, which training caches drop) keep their
    clean activations in both interventions.
    """
    device = next(model.parameters()).device
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl": 0.0}
    n_pred = 0
    for start in range(0, contexts.shape[0], batch_size):
        ids = contexts[start : start + batch_size].to(device)
        keep = torch.isin(ids, torch.tensor(skip_ids or [], dtype=ids.dtype, device=device))

        def splice(h, replace):
            new = replace(h)
            return torch.where(keep[..., None], h, new.to(h.dtype))

        targets = ids[:, 1:].reshape(-1)
        logits = model(input_ids=ids).logits[:, :-1].float()
        clean_logp = logits.log_softmax(-1).reshape(-1, logits.shape[-1])
        with edit_residual(model, layer, lambda h: splice(h, sae), point):
            sae_logp = (
                model(input_ids=ids).logits[:, :-1].float().log_softmax(-1).reshape(-1, logits.shape[-1])
            )
        with edit_residual(model, layer, lambda h: splice(h, torch.zeros_like), point):
            zero_logp = (
                model(input_ids=ids).logits[:, :-1].float().log_softmax(-1).reshape(-1, logits.shape[-1])
            )
        for name, logp in (("clean", clean_logp), ("sae", sae_logp), ("zero", zero_logp)):
            sums[name] += F.nll_loss(logp, targets, reduction="sum").item()
        sums["kl"] += F.kl_div(sae_logp, clean_logp, log_target=True, reduction="sum").item()
        n_pred += targets.numel()
    ce = {name: sums[name] / n_pred for name in ("clean", "sae", "zero")}
    return {
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero": ce["zero"],
        "loss_recovered": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
        "kl_sae": sums["kl"] / n_pred,
        "predictions": n_pred,
    }


def heldout_contexts(
    sae: SAE, tokenizer, n_contexts: int, data: str | None = None, ctx: int | None = None
) -> Tensor:
    """`n_contexts` token contexts [n, ctx] the SAE was not trained on: from `data` if given, else
    from its training text source, skipping the contexts its activation cache used."""
    record = sae.cfg.training_data
    if data is None and not record.get("data"):
        raise SAEError("the SAE does not record its training text; pass --data")
    source = (
        TextSource(data=data)
        if data
        else TextSource(**{k: record[k] for k in ("data", "field", "chat", "split") if k in record})
    )
    ctx = ctx or record.get("ctx") or 128
    skip = 0 if data else record.get("n_contexts", 0)
    packed = pack_contexts(iter_documents(source, tokenizer), tokenizer, ctx)
    contexts = list(itertools.islice(packed, skip, skip + n_contexts))
    if not contexts:
        raise SAEError(
            f"no held-out text in {source.data} beyond the {skip} contexts used for training; pass --data"
        )
    return torch.tensor(contexts)


def sae_metrics(sae: SAE, model: torch.nn.Module, tokenizer, contexts: Tensor, batch_size: int = 8) -> dict:
    """Reconstruction metrics on the contexts' activations (special-token positions dropped, as in
    training caches) plus the spliced-model metrics, at the SAE's layer and hook point."""
    if sae.cfg.layer is None:
        raise SAEError("the SAE does not record its layer; cannot splice it into the model")
    point = sae.cfg.hook_point
    device = next(model.parameters()).device
    special = sorted(set(tokenizer.all_special_ids))
    acts = []
    for start in range(0, contexts.shape[0], batch_size):
        ids = contexts[start : start + batch_size]
        hidden = residual_at(model, ids.to(device), sae.cfg.layer, point).float().cpu()
        keep = ~torch.isin(ids, torch.tensor(special, dtype=ids.dtype))
        acts.append(hidden[keep])
    return {
        **reconstruction_metrics(sae, torch.cat(acts)),
        **spliced_metrics(sae, model, contexts, sae.cfg.layer, point, batch_size, special),
    }
