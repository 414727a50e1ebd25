"""One generation engine for evals, the demo, `generate`, lm-eval and the server.

Continuous batching: up to `DECODE_ROWS` rows decode together, and a finished row's place is refilled by
the next waiting reply before the next step (prompts sharing a prefix, such as the chat template's system
prompt, compute it once: `MIN_PREFIX`). Each row carries its own steering edits (`hooks.Edit`), decided
once per row before its prefill; rows given the same edit objects are edited in one batched call, so a
batch mixing K steerings makes K calls per hook point, not one per row.

Two backends run the forward passes:
- `_LlamaForward` (Llama, Qwen2, Mistral): the model's own modules around a preallocated KV cache whose
  row r is batch row r; prompts are prefilled right-padded with causal attention, each decoding step writes
  one key per row at that row's own length, and only the last position reaches the output head.
- `_HFForward` (any other causal LM): the model's forward with a left-padded `DynamicCache`, steered
  through forward hooks.
Both call the same edits with the same `Rows`, so a steering means the same on either.
"""

from __future__ import annotations

import collections
import inspect
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saesteer.hooks import LAYERLESS_POINTS, Edit, Rows, decoder_layers, edit_residual, edit_rows
from saesteer.models import LoadedModel, left_padded

LLAMA_FAMILY = ("llama", "qwen2", "mistral")  # model types `_LlamaForward` runs; others use `_HFForward`


@dataclass(eq=False)
class Reply:
    """One reply to generate, and its state while it decodes."""

    ids: list[int]
    """the chat-rendered prompt's token ids"""
    edits: list[Edit] = field(default_factory=list)
    """this row's steering edits (from `Steering.row_edits`)"""
    max_new_tokens: int = 64
    """the most tokens to generate (the end-of-turn token excluded)"""
    stop: tuple[str, ...] = ()
    """strings that end the reply once its text holds one (kept in `tokens`)"""
    temperature: float = 0.0
    """0: greedy; otherwise sample from softmax(logits / temperature)"""
    top_p: float = 1.0
    """nucleus sampling: sample among the most likely tokens up to this probability mass"""
    generator: torch.Generator | None = None
    """the row's own random generator (sampling only)"""
    on_update: Callable[[Reply], None] | None = None
    """called after each token is taken and when the row ends (the server streams from it)"""
    key: int = -1
    """the row's identity in `Rows` (set at prefill)"""
    tokens: list[int] = field(default_factory=list)
    """generated token ids, end-of-turn excluded"""
    generated: int = 0
    """tokens generated, end-of-turn included"""
    finish: str | None = None
    """None while decoding; then "stop" (end of turn or a stop string), "length", "nonfinite" (the logits
    held NaN or inf) or "cancelled\""""
    cancelled: bool = False
    """set from outside to drop the row at the next step"""


DECODE_ROWS = 128  # rows decoded together: CPU matmuls of 576-wide layers reach ~90% of peak from ~128 rows
MIN_PREFIX = 8  # the shortest prompt prefix shared by a prefill's rows that is computed once and cached
PREFIX_ENTRIES = 16  # cached (prefix, edits) pairs, least recently used dropped first
KV_BUDGET = 4 << 30  # bytes of KV cache `run` may reserve: fewer rows decode together when replies are long


class Engine:
    """Decodes replies with continuous batching on one loaded model (one thread at a time): up to `rows`
    rows decode together, and each step admits up to `prefill` waiting replies in one prefill."""

    def __init__(self, loaded: LoadedModel, prefill: int = 16, rows: int = DECODE_ROWS):
        self.loaded, self.prefill, self.max_batch = loaded, prefill, max(rows, prefill)
        eos = loaded.model.generation_config.eos_token_id
        self.eos = {*(eos if isinstance(eos, list) else [eos] if eos is not None else [])}
        self.eos.add(loaded.tokenizer.eos_token_id)
        family = getattr(loaded.model.config, "model_type", None) in LLAMA_FAMILY
        self.forward = (
            _LlamaForward(loaded, self._edit)
            if family
            else _HFForward(loaded, self._edit, lambda: self._groups)
        )
        self.rows: list[Reply] = []
        self.waiting: collections.deque[Reply] = collections.deque()
        self._groups: dict[tuple[int, str], list[tuple[Callable, list[int] | None]]] = {}
        self._pass_rows: Rows | None = None
        self._prefixes: collections.OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = (
            collections.OrderedDict()
        )

    def run(self, replies: list[Reply], progress: bool = False, desc: str = "generate") -> list[Reply]:
        """Decode every reply to its end (shortest prompts first, so batches pad little); returns them."""
        self.waiting.extend(sorted(replies, key=lambda r: len(r.ids)))
        if replies:
            width = max(len(r.ids) + r.max_new_tokens for r in replies)
            self.max_batch = min(self.max_batch, max(1, KV_BUDGET // self.forward.row_bytes(width)))
            self.prefill = min(self.prefill, self.max_batch)
            self.forward.reserve(min(self.max_batch, len(replies)), width)
        with tqdm(total=len(replies), desc=desc, disable=not progress) as bar:
            while self.rows or self.waiting:
                bar.update(len(self.step()))
        return replies

    @torch.inference_mode()
    def step(self) -> list[Reply]:
        """Admit waiting replies into free rows (one prefill), then decode one token for every row; returns
        the replies that finished."""
        finished = self._drop()
        admitted = []
        while (
            self.waiting and len(self.rows) + len(admitted) < self.max_batch and len(admitted) < self.prefill
        ):
            reply = self.waiting.popleft()
            if reply.cancelled or reply.max_new_tokens < 1:
                reply.finish = "cancelled" if reply.cancelled else "length"
                finished.append(reply)
                if reply.on_update is not None:
                    reply.on_update(reply)
            else:
                admitted.append(reply)
        if admitted:
            self._admit(admitted)
            finished += self._drop()
        if self.rows:
            self._pass_rows = Rows([r.key for r in self.rows], [r.tokens for r in self.rows], False)
            self._take_all(self.rows, self.forward.decode([r.tokens[-1] for r in self.rows]))
            finished += self._drop()
        return finished

    def _admit(self, admitted: list[Reply]) -> None:
        """Prefill new replies (their shared prompt prefix from the prefix cache) and take their first tokens."""
        self.forward.reserve(
            len(self.rows) + len(admitted), max(len(r.ids) + r.max_new_tokens for r in admitted)
        )
        prompts = [r.ids for r in admitted]
        shared = _common_prefix(prompts) if isinstance(self.forward, _LlamaForward) else 0
        past = self._prefix(admitted, shared) if shared >= MIN_PREFIX else None
        self._pass_rows = Rows.prompts(len(admitted))
        for reply, key in zip(admitted, self._pass_rows.keys):
            reply.key = key
        self._plan(admitted)
        logits = self.forward.prefill([p[shared:] for p in prompts] if past else prompts, past)
        self.rows += admitted
        self._plan(self.rows)
        self._take_all(admitted, logits)

    def _prefix(self, admitted: list[Reply], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [layers, rows, kv heads, length, head dim] of the first `length` prompt tokens that
        every admitted row shares, computed once per distinct row edits and cached."""
        tokens = tuple(admitted[0].ids[:length])
        kinds = {tuple(r.edits): r for r in admitted}
        missing = [edits for edits in kinds if (tokens, edits) not in self._prefixes]
        if missing:
            self._plan([kinds[edits] for edits in missing])
            self._pass_rows = Rows.prompts(len(missing))
            k, v = self.forward.prefix(list(tokens), len(missing))
            for j, edits in enumerate(missing):
                self._prefixes[(tokens, edits)] = k[:, j], v[:, j]
        for edits in kinds:
            self._prefixes.move_to_end((tokens, edits))
        while len(self._prefixes) > max(PREFIX_ENTRIES, len(kinds)):
            self._prefixes.popitem(last=False)
        cached = [self._prefixes[(tokens, tuple(r.edits))] for r in admitted]
        return torch.stack([k for k, _ in cached], 1), torch.stack([v for _, v in cached], 1)

    def _plan(self, replies: list[Reply]) -> None:
        """Group the edits of `replies` (the rows of the next passes, in order) by edit function."""
        groups: dict[tuple[int, str], dict[Callable, list[int]]] = {}
        for i, reply in enumerate(replies):
            for layer, point, fn in reply.edits:
                where = (0 if point in LAYERLESS_POINTS else layer, point)
                groups.setdefault(where, {}).setdefault(fn, []).append(i)
        n = len(replies)
        self._groups = {
            where: [(fn, None if len(index) == n else index) for fn, index in fns.items()]
            for where, fns in groups.items()
        }

    def _edit(self, layer: int, point: str, h: torch.Tensor) -> torch.Tensor:
        """The pass's tensor at (layer, point) [rows, T, ...], edited row by row by each row's own edits."""
        for fn, index in self._groups.get((layer, point), ()):
            h = edit_rows(fn, h, self._pass_rows, index)
        return h

    def _take_all(self, replies: list[Reply], logits: torch.Tensor) -> None:
        """Each reply's next token from its row of `logits` [rows, vocab]."""
        logits = logits.contiguous()
        finite = torch.isfinite(logits.amax(-1)).tolist()  # NaN, or a steering that overflowed to inf
        greedy = logits.argmax(-1).tolist()
        for i, reply in enumerate(replies):
            if reply.cancelled or not finite[i]:
                reply.finish = "cancelled" if reply.cancelled else "nonfinite"
                if reply.on_update is not None:
                    reply.on_update(reply)
            elif reply.temperature > 0:
                self._take(reply, _sample(logits[i], reply))
            else:
                self._take(reply, greedy[i])

    def _take(self, reply: Reply, token: int) -> None:
        """Append the row's next token and apply its stop rules."""
        reply.generated += 1
        if token in self.eos:
            reply.finish = "stop"
        else:
            reply.tokens.append(token)
            if len(reply.tokens) >= reply.max_new_tokens:
                reply.finish = "length"
            elif reply.stop:
                text = self.loaded.tokenizer.decode(reply.tokens, skip_special_tokens=True)
                reply.finish = "stop" if any(s in text for s in reply.stop) else None
        if reply.on_update is not None:
            reply.on_update(reply)

    def _drop(self) -> list[Reply]:
        """Remove finished and cancelled rows, each hole filled by a row from the end (few cache moves);
        returns the finished."""
        for reply in self.rows:
            if reply.cancelled and reply.finish is None:
                reply.finish = "cancelled"
        alive = [i for i, reply in enumerate(self.rows) if reply.finish is None]
        if len(alive) == len(self.rows):
            return []
        done = [reply for reply in self.rows if reply.finish is not None]
        movers = iter(i for i in alive if i >= len(alive))
        keep = [i if self.rows[i].finish is None else next(movers) for i in range(len(alive))]
        self.forward.keep(keep)
        self.rows = [self.rows[i] for i in keep]
        self._plan(self.rows)
        return done


class _LlamaForward:
    """Llama-family forward passes over a preallocated KV cache [layers, rows, kv heads, width, head dim]."""

    def __init__(self, loaded: LoadedModel, edit: Callable):
        self.model, self.edit = loaded.model, edit
        self.layers = decoder_layers(loaded.model)
        attention = self.layers[0].self_attn
        config = loaded.model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = attention.head_dim
        self.scale = attention.scaling
        self.rotary = loaded.model.model.rotary_emb
        self.device, self.dtype = loaded.device, loaded.dtype
        self.k = self.v = torch.zeros(len(self.layers), 0, self.kv_heads, 0, self.head_dim)
        self.lengths: list[int] = []  # tokens cached per row

    def row_bytes(self, width: int) -> int:
        """The cache's bytes per row of `width` positions."""
        return 2 * len(self.layers) * self.kv_heads * width * self.head_dim * self.dtype.itemsize

    def reserve(self, rows: int, width: int) -> None:
        """Grow the cache to hold at least `rows` rows of `width` positions, keeping what it holds."""
        have_rows, have_width = self.k.shape[1], self.k.shape[3]
        if rows <= have_rows and width <= have_width:
            return
        rows = max(rows, have_rows)
        width = max(width, have_width if width <= have_width else int(1.25 * have_width))
        shape = (len(self.layers), rows, self.kv_heads, width, self.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)  # never NaN bits under the mask
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        n, w = len(self.lengths), max(self.lengths, default=0)
        k[:, :n, :, :w], v[:, :n, :, :w] = self.k[:, :n, :, :w], self.v[:, :n, :, :w]
        self.k, self.v = k, v

    def prefix(self, tokens: list[int], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [layers, rows, kv heads, T, head dim] of one token sequence run as `rows` rows (each
        with its own edits), outside the cache."""
        ids = torch.tensor([tokens] * rows, device=self.device)
        keys, values = [], []

        def attend(i: int, q, k, v):
            keys.append(k)
            values.append(v)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)

        self._layers(ids, torch.arange(len(tokens), device=self.device).expand(rows, -1), attend)
        return torch.stack(keys), torch.stack(values)

    def prefill(self, prompts: list[list[int]], past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Run new prompts (appended as the last rows), after `past`: the keys and values of a prefix they all
        follow ([layers, rows, kv heads, P, head dim]); next-token logits [m, vocab]."""
        first, m, width = len(self.lengths), len(prompts), max(map(len, prompts))
        start = 0 if past is None else past[0].shape[3]
        self.reserve(first + m, start + width + 1)
        new = slice(first, first + m)
        if past is not None:
            self.k[:, new, :, :start], self.v[:, new, :, :start] = past
        ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=self.device)
        positions = torch.arange(start, start + width, device=self.device).expand(m, width)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        causal = (
            torch.arange(start + width, device=self.device) <= positions[0][:, None]
        )  # [width, start+width]

        def attend(i: int, q, k, v):
            self.k[i, new, :, start : start + width], self.v[i, new, :, start : start + width] = k, v
            if past is None:
                return F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=self.scale, enable_gqa=True
                )
            keys, values = self.k[i, new, :, : start + width], self.v[i, new, :, : start + width]
            return F.scaled_dot_product_attention(
                q, keys, values, attn_mask=causal, scale=self.scale, enable_gqa=True
            )

        h = self._layers(ids, positions, attend)
        self.lengths += [start + len(p) for p in prompts]
        return self._logits(h[torch.arange(m, device=self.device), last])

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feed each row its next token; next-token logits [rows, vocab]."""
        n = len(tokens)
        self.reserve(n, max(self.lengths) + 1)
        at = torch.tensor(self.lengths, device=self.device)
        width = max(self.lengths) + 1
        rows = torch.arange(n, device=self.device)
        visible = (torch.arange(width, device=self.device) <= at[:, None])[:, None, None, :]
        group = self.heads // self.kv_heads

        def attend(i: int, q, k, v):
            self.k[i, rows, :, at], self.v[i, rows, :, at] = k[:, :, 0], v[:, :, 0]
            keys, values = self.k[i, :n, :, :width], self.v[i, :n, :, :width]
            # the query heads that share a key head attend as that head's queries: no repeated keys
            q = q.reshape(n, self.kv_heads, group, self.head_dim)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=self.scale)
            return out.reshape(n, self.heads, 1, self.head_dim)

        h = self._layers(torch.tensor(tokens, device=self.device)[:, None], at[:, None], attend)
        self.lengths = [length + 1 for length in self.lengths]
        return self._logits(h[:, 0])

    def _layers(self, ids: torch.Tensor, positions: torch.Tensor, attend: Callable) -> torch.Tensor:
        """The residual stream [rows, T, d] after every decoder layer, edited at each hook point."""
        h = self.model.get_input_embeddings()(ids)
        cos, sin = self.rotary(h, positions)
        rows, width = ids.shape
        for i, layer in enumerate(self.layers):
            h = self.edit(i, "resid_pre", h)
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(rows, width, -1, self.head_dim).transpose(1, 2)
            k = a.k_proj(x).view(rows, width, -1, self.head_dim).transpose(1, 2)
            v = a.v_proj(x).view(rows, width, -1, self.head_dim).transpose(1, 2)
            q, k = _rotate(q, k, cos, sin)
            out = attend(i, q, k, v)
            h = h + a.o_proj(out.transpose(1, 2).reshape(rows, width, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            h = self.edit(i, "resid_post", h)
        return h

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        """Next-token logits [rows, vocab] from the last residual [rows, d] (the only position that needs them)."""
        head = self.model.get_output_embeddings()
        # vocab x rows: this orientation of the widest matmul runs ~1.5x faster on CPU (bench/generate.py)
        logits = torch.mm(head.weight, self.model.model.norm(last).T).T
        if head.bias is not None:
            logits = logits + head.bias
        return self.edit(0, "logits", logits[:, None])[:, -1].float()

    def keep(self, index: list[int]) -> None:
        """Keep only rows `index`, row j of the batch becoming old row index[j] (each index[j] >= j or in place)."""
        for new, old in enumerate(index):
            if new != old:
                length = self.lengths[old]
                self.k[:, new, :, :length] = self.k[:, old, :, :length]
                self.v[:, new, :, :length] = self.v[:, old, :, :length]
        self.lengths = [self.lengths[i] for i in index]


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary position embeddings on q, k [rows, heads, T, head dim] (cos, sin [rows, T, head dim])."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


class _HFForward:
    """Any causal LM's own forward with a left-padded `DynamicCache`, steered through forward hooks."""

    def __init__(self, loaded: LoadedModel, edit: Callable, groups: Callable):
        """`groups()`: the hook points the next pass edits (the engine's plan)."""
        self.loaded, self.edit, self.groups = loaded, edit, groups
        forward = inspect.signature(loaded.model.forward).parameters
        self.cache_arg = "cache" if "cache" in forward else "past_key_values"  # renamed in transformers 5
        self.cache = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=loaded.device)  # [rows, cached], 0 on padding
        self.positions: list[int] = []  # the next position of each row

    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        with ExitStack() as stack:
            for layer, point in self.groups():
                fn = lambda h, layer=layer, point=point: self.edit(layer, point, h)  # noqa: E731
                stack.enter_context(edit_residual(self.loaded.model, layer, fn, point))
            out = self.loaded.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{self.cache_arg: cache},
            )
        return out.logits[:, -1].float()

    def row_bytes(self, width: int) -> int:
        """Unbounded here: the cache grows as it goes, as HF `generate`'s does."""
        return 1

    def reserve(self, rows: int, width: int) -> None:
        """Nothing to reserve: the cache grows as it goes."""

    def prefill(self, prompts: list[list[int]], past: None = None) -> torch.Tensor:
        from transformers import DynamicCache

        device = self.loaded.device
        ids, mask, positions = left_padded(prompts, self.loaded.tokenizer.pad_token_id, device)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache)
        new = [(layer.keys, layer.values) for layer in cache.layers]
        if self.cache is not None:
            width = max(self.mask.shape[1], mask.shape[1])
            old = [(layer.keys, layer.values) for layer in self.cache.layers]
            new = [
                tuple(torch.cat([_pad_left(a, width), _pad_left(b, width)]) for a, b in zip(o, n))
                for o, n in zip(old, new)
            ]
            mask = torch.cat([_pad_left(self.mask, width, dim=1), _pad_left(mask, width, dim=1)])
        self.cache, self.mask = DynamicCache(new), mask
        self.positions += [len(p) for p in prompts]
        return logits

    def decode(self, tokens: list[int]) -> torch.Tensor:
        device = self.loaded.device
        ids = torch.tensor(tokens, device=device)[:, None]
        positions = torch.tensor(self.positions, device=device)[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
        logits = self._forward(ids, self.mask, positions, self.cache)
        self.positions = [p + 1 for p in self.positions]
        return logits

    def keep(self, index: list[int]) -> None:
        self.positions = [self.positions[i] for i in index]
        if not index:
            self.cache, self.mask = None, self.mask[:0, :0]
            return
        at = torch.tensor(index, device=self.loaded.device)
        mask = self.mask[at]
        start = int((mask.sum(0) > 0).nonzero()[0])  # drop columns that are padding in every remaining row
        self.mask = mask[:, start:]
        from transformers import DynamicCache

        self.cache = DynamicCache(
            [(layer.keys[at, :, start:], layer.values[at, :, start:]) for layer in self.cache.layers]
        )


def _sample(logits: torch.Tensor, reply: Reply) -> int:
    """A token drawn from softmax(logits [vocab] / temperature), among the top tokens up to top_p."""
    probs = torch.softmax(logits.float() / reply.temperature, dim=-1)
    ranked, order = probs.sort(descending=True)
    ranked[ranked.cumsum(0) - ranked > reply.top_p] = 0.0
    return int(order[torch.multinomial(ranked, 1, generator=reply.generator)])


def _common_prefix(prompts: list[list[int]]) -> int:
    """The length of the longest prefix every prompt shares, leaving each at least one token of its own."""
    first, shortest = prompts[0], min(map(len, prompts))
    n = 0
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def _pad_left(x: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """`x` zero-padded on the left of `dim` to `width` positions (KV tensors [B, heads, T, d]: dim 2)."""
    pad = width - x.shape[dim]
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def generate(
    loaded: LoadedModel,
    prompts: list[list[int]],
    edits: list[list[Edit]] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = False,
    stop: list[str] | None = None,
) -> list[str]:
    """Greedy replies (decoded, special tokens dropped) to rendered prompts given as token ids, row i
    steered by `edits[i]`; up to `batch_size` prompts are prefilled together and `DECODE_ROWS` rows decode
    together; a reply ends at the end of turn, after `max_new_tokens` tokens, or once it holds one of the
    `stop` strings (kept in it)."""
    replies = [
        Reply(ids, list(row_edits), max_new_tokens, tuple(stop or ()))
        for ids, row_edits in zip(prompts, edits or [[]] * len(prompts))
    ]
    Engine(loaded, batch_size).run(replies, progress)
    return loaded.tokenizer.batch_decode([r.tokens for r in replies], skip_special_tokens=True)
