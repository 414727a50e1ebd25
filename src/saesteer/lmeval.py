"""lm-evaluation-harness model `saesteer`: any model `load_model` takes, under any steering `parse_steering` takes.

    saesteer-lm-eval --model saesteer --model_args model=smollm2-135m-instruct,steering=refusal --tasks mmlu

model_args: model (a `load_model` spec), steering (preset, method name, JSON object or JSON file, as
`--steering`; default unsteered), dtype, max_length; lm-eval's --batch_size and --device apply.
Log-likelihoods come from `scoring.continuation_scores` (the capability suite's scorer) and replies from
`saesteer.engine` (greedy, continuous batching), with the steering applied. A conditional steering decides per request on
its context (for rolling log-likelihoods, on the document), as it decides on the prompt before
generating. Log-likelihoods are prefill passes, so edits limited to generated tokens (`positions:
generated`) leave them unchanged.

lm-eval 0.4 discovers no models outside its own source tree, so `saesteer-lm-eval` is lm-eval's
command line with this module imported (which registers the model); in Python, import this module and
call `lm_eval.simple_evaluate(model="saesteer", ...)`.
"""

from __future__ import annotations

import logging
import sys

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from saesteer.errors import SaesteerError, short
from saesteer.models import DEFAULT_MODEL, load_model
from saesteer.scoring import continuation_scores
from saesteer.steering import Conditional, Steering, generate_rendered, parse_steering, steering_from_dict

Pair = tuple[list[int], list[int]]  # (context token ids, continuation token ids)


@register_model("saesteer")
class SaesteerLM(TemplateLM):
    """A saesteer-loaded model under one steering, batched `batch_size` sequences at a time."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        steering: str | dict | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise SaesteerError(
                f"unknown saesteer model_args {short(', '.join(map(str, unknown)))}: "
                "use model, steering, dtype, max_length"
            )
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise SaesteerError(f"batch_size must be a positive integer, not {short(str(batch_size))!r}")
        self.steering = (
            steering_from_dict(steering) if isinstance(steering, dict) else parse_steering(steering)
        )
        if (
            device and device.startswith("cuda") and not torch.cuda.is_available()
        ):  # lm_eval's default is cuda:0
            logging.getLogger(__name__).warning(
                "no CUDA: the saesteer model picks cpu or mps, not %s", device
            )
            device = None
        self.loaded = load_model(str(model), device, dtype)
        self.tokenizer = self.loaded.tokenizer
        self.batch_size = int(batch_size)
        config = self.loaded.model.config
        self.max_length = int(
            max_length
            or getattr(config, "max_position_embeddings", None)
            or getattr(config, "n_positions", None)
            or 2048
        )
        probe = [{"role": "user", "content": "?"}]
        self._rewrites = self.steering.prepare(probe) != probe  # e.g. adds a system prompt
        self._chat = False  # whether lm-eval renders prompts through `apply_chat_template`

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and each rolling document) is conditioned on: BOS, else EOS."""
        return (
            self.tokenizer.eos_token_id
            if self.tokenizer.bos_token_id is None
            else self.tokenizer.bos_token_id
        )

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens)).input_ids

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The chat, after the steering's `prepare` (e.g. a system prompt), through the model's chat template."""
        self._chat = True
        return self.tokenizer.apply_chat_template(
            self.steering.prepare(chat_history),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def _check_prompts(self, chat: bool) -> None:
        if self._rewrites and not (chat and self._chat):
            how = (
                "run lm_eval with --apply_chat_template"
                if chat
                else "it cannot steer rolling log-likelihoods"
            )
            raise SaesteerError(f"steering {self.steering.method} acts by rewriting the chat: {how}")

    def _fit(self, context: list[int], continuation: list[int]) -> Pair:
        """Drop the oldest context tokens so that context + continuation fits in `max_length`."""
        room = self.max_length - len(continuation)
        if room < 1:
            raise SaesteerError(
                f"a continuation of {len(continuation)} tokens exceeds max_length {self.max_length}"
            )
        return context[-room:], continuation

    @torch.inference_mode()
    def _gate(self, prompts: list[list[int]]) -> list[bool]:
        """Conditional steering's decision per prompt (token ids), from left-padded batches."""
        unique = list(dict.fromkeys(map(tuple, prompts)))
        flagged = {}
        for start in range(0, len(unique), self.batch_size):
            chunk = unique[start : start + self.batch_size]
            batch = self.tokenizer.pad(
                {"input_ids": [list(p) for p in chunk]}, padding=True, return_tensors="pt"
            )
            batch = batch.to(self.loaded.device)
            scores = self.steering.scores(self.loaded, batch["input_ids"], batch["attention_mask"])
            flagged.update(zip(chunk, (scores > self.steering.threshold).tolist()))
        return [flagged[tuple(p)] for p in prompts]

    def _score(self, pairs: list[Pair], steering: Steering) -> list[tuple[float, bool]]:
        """(log-probability, greedy?) per pair under `steering`; pairs sharing a context share a request."""
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (context, _) in enumerate(pairs):
            by_context.setdefault(tuple(context), []).append(i)
        requests = [(list(context), [pairs[i][1] for i in rows]) for context, rows in by_context.items()]
        with steering.applied(self.loaded):
            scored = continuation_scores(self.loaded, requests, self.batch_size)
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for rows, scores in zip(by_context.values(), scored):
            for i, score in zip(rows, scores):
                out[i] = score
        return out

    def _steered_scores(self, pairs: list[Pair], gate_on: list[list[int]]) -> list[tuple[float, bool]]:
        """`_score` under the steering; a conditional one steers pair i only if the gate flags gate_on[i]."""
        if not isinstance(self.steering, Conditional):
            return self._score(pairs, self.steering)
        flagged = self._gate(gate_on)
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for flag, steering in ((True, self.steering.inner), (False, Steering())):
            rows = [i for i, f in enumerate(flagged) if f == flag]
            for i, score in zip(rows, self._score([pairs[i] for i in rows], steering) if rows else []):
                out[i] = score
        return out

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs,
    ) -> list[tuple[float, bool]]:
        """(sum log-probability of the continuation, whether it is the greedy continuation) per request."""
        self._check_prompts(chat=True)
        pairs = [self._fit(context, continuation) for _, context, continuation in requests]
        out = self._steered_scores(pairs, [context for context, _ in pairs])
        for (strings, _, _), result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", strings, result)
        return out

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Sum log-probability of each whole text after the prefix token, in disjoint `max_length` windows."""
        self._check_prompts(chat=False)
        pairs, owners, documents = [], [], []
        for r, (text,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(text)
            documents.append(tokens[: self.max_length])
            windows = get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length - 1, 1)
            for pair in map(make_disjoint_window, windows):
                pairs.append(pair)
                owners.append(r)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owners, self._steered_scores(pairs, [documents[r] for r in owners])):
            totals[r] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy, steered replies, cut before the first `until` string and at most `max_gen_toks` tokens long."""
        self._check_prompts(chat=True)
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, request in enumerate(requests):
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample"):
                raise SaesteerError(
                    "the saesteer model decodes greedily; this task asks for sampling (do_sample)"
                )
            until = kwargs.get("until") or [self.tokenizer.decode([self.eot_token_id])]
            until = tuple(s for s in ([until] if isinstance(until, str) else until) if s)
            max_gen = int(kwargs.get("max_gen_toks", 256))
            if len(self.tok_encode(context)) + max_gen > self.max_length:
                raise SaesteerError(
                    f"a prompt plus max_gen_toks {max_gen} exceeds max_length {self.max_length}"
                )
            groups.setdefault((until, max_gen), []).append(i)
        out = [""] * len(requests)
        for (until, max_gen), rows in groups.items():
            replies = generate_rendered(
                self.loaded,
                [requests[i].args[0] for i in rows],
                self.steering,
                max_new_tokens=max_gen,
                batch_size=self.batch_size,
                stop=list(until),
            )
            for i, reply in zip(rows, replies):
                for stop in until:
                    reply = reply.split(stop)[0]
                out[i] = reply
                self.cache_hook.add_partial("generate_until", requests[i].args, reply)
        return out


def main() -> None:
    """`saesteer-lm-eval`: lm-eval's command line with the `saesteer` model registered; user errors become
    one line on stderr and exit code 2."""
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except SaesteerError as err:
        print(f"saesteer-lm-eval: error: {err}", file=sys.stderr)
        sys.exit(2)
