"""Token generation: one prefill over the prompt, then one decode step per token against
a static KV cache; greedy or sampled (temperature, top-k, top-p, seed); stop on any eos
id or at max_new_tokens. The generator yields small responses; rendering is the CLI's job.

Prefix reuse: the caller may pass the token ids the states already hold; a prompt that
starts with them is prefilled only past the common prefix (see `reusable_prefix`).
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from typing import Iterator

import torch

from moerun.errors import MoerunError
from moerun.layers import context_of
from moerun.models.base import is_encoder_decoder


@dataclasses.dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0  # 1 means no nucleus cut
    seed: int | None = None
    min_p: float = 0.0  # drop tokens less likely than min_p x the top token's probability; 0: none
    # Penalties, applied to the logits before any of the above (greedy too):
    presence_penalty: float = 0.0  # OpenAI's: minus this for each token the reply already holds
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the token's count in the reply
    repeat_penalty: float = 1.0  # llama.cpp's: tokens of the last repeat_last_n (prompt + reply)
    repeat_last_n: int = 64  # have positive logits divided by it, negative ones multiplied
    logit_bias: dict[int, float] | None = None  # added to those tokens' logits

    @property
    def adjusts_logits(self) -> bool:
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.logit_bias
            or (self.repeat_penalty != 1.0 and self.repeat_last_n != 0)
        )

    def __post_init__(self):
        if self.temperature < 0:
            raise MoerunError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MoerunError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise MoerunError(f"top-k must be >= 0, got {self.top_k}")
        if self.seed is not None and not -(1 << 63) <= self.seed < (1 << 63):
            raise MoerunError(f"seed must be a whole number from -2**63 to 2**63-1, got {self.seed}")
        if not 0 <= self.min_p <= 1:
            raise MoerunError(f"min-p must be in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise MoerunError(f"repeat-penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < -1:
            raise MoerunError(f"repeat-last-n must be -1 (all), 0 (off) or more, got {self.repeat_last_n}")


@dataclasses.dataclass
class GenerationStats:
    """Counts and timings of one generation. Time to first token is `prompt_seconds`
    (prefill plus the first sample); `generation_tps` counts the tokens after the first
    over the decode time, as llama.cpp's eval rate does."""

    prompt_tokens: int
    generated_tokens: int
    prompt_seconds: float
    generation_seconds: float
    prompt_tps: float
    generation_tps: float
    peak_memory_bytes: int
    finish_reason: str  # "stop" (an eos id) or "length" (max_new_tokens or the context)
    # prompt_tokens = reused_tokens (already in the states) + prefilled_tokens (computed);
    # prompt_tps counts the prefilled ones, the work that was done.
    prefilled_tokens: int = 0
    reused_tokens: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class GenerationResponse:
    """One streamed step: the text this token made printable (maybe ""), its id, and
    on the last response the stats."""

    text: str
    token_id: int
    stats: GenerationStats | None = None


@dataclasses.dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    stats: GenerationStats


def adjust_logits(logits: torch.Tensor, params: SamplingParams, seen: list[int], n_prompt: int) -> torch.Tensor:
    """logits [V] -> a penalized copy, on their device. `seen`: the sequence so far (prompt, then
    reply), of which the first `n_prompt` are the prompt. Order as llama.cpp: logit bias, repeat
    penalty over the last repeat_last_n tokens of prompt + reply, then presence and frequency
    penalties over the reply's tokens (OpenAI's definition)."""
    logits = logits.float().clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=logits.device)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), device=logits.device)
    if params.repeat_penalty != 1.0 and params.repeat_last_n != 0 and seen:
        window = seen if params.repeat_last_n < 0 else seen[-params.repeat_last_n :]
        ids = torch.tensor(sorted(set(window)), device=logits.device)
        vals = logits[ids]
        logits[ids] = torch.where(vals > 0, vals / params.repeat_penalty, vals * params.repeat_penalty)
    reply = seen[n_prompt:]
    if (params.presence_penalty or params.frequency_penalty) and reply:
        counts = torch.bincount(torch.tensor(reply, device=logits.device), minlength=logits.numel()).float()
        logits -= counts * params.frequency_penalty + (counts > 0).float() * params.presence_penalty
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits [V] (float32, CPU) -> one token id. Order as in transformers: temperature,
    then top-k, then top-p."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(filtered_probs(logits, params), 1, generator=generator))


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [V] (float32, CPU; temperature > 0) -> the probabilities sample() draws from:
    temperature, then top-k, then top-p."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass;
        # the most likely token always stays.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        logits = logits.index_put((order[drop],), torch.tensor(float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:  # relative to the top token's probability, after the cuts above
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    return probs


def _next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits [V] where the model left them. Greedy takes the argmax there (one int comes
    to the host, not the vocabulary); sampling draws on the CPU with the seeded generator."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    return sample(logits.float().cpu(), params, generator)


def _rewindable(caches: list) -> bool:
    """Can every layer's state be cut back to any shorter prefix? Each state says
    (LayerState.can_rewind): full KV caches and MLA latents can; rings and recurrent
    states fold the past in and cannot."""
    return all(s is None or s.can_rewind for s in caches)


def reusable_prefix(held: list[int], prompt_ids: list[int], caches: list) -> int:
    """How many leading prompt tokens the states already hold (`held`: the ids of the
    sequence in them, positions 0..len-1). At least one prompt token is always left to
    prefill (its logits pick the first token). Rewindable states reuse any common prefix;
    others only the whole held sequence, else 0 (a fresh start)."""
    if not held or len(prompt_ids) < 2:
        return 0
    limit = min(len(held), len(prompt_ids) - 1)
    n = 0
    while n < limit and held[n] == prompt_ids[n]:
        n += 1
    if _rewindable(caches):
        return n
    return n if n == len(held) else 0


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory on CUDA; peak resident set of the process on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


@torch.inference_mode()
def stream_tokens(
    lm,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams,
    eos_ids: set[int],
    max_context: int,
    tokenizer,
    ignore_eos: bool = False,
    caches: list | None = None,
    graphs=None,
    held: list[int] | None = None,
    keep_special: tuple[str, ...] = (),
    constraint=None,
) -> Iterator[GenerationResponse]:
    """Prefill `prompt_ids`, then decode up to `max_new_tokens` tokens, yielding each.

    `caches`: the layers' preallocated state (moerun.load makes it for the planned
    context). The plan binds: generation never grows it. A prompt that leaves no room in
    it is refused before prefill; otherwise generation stops when it is full (at the
    planned context, as llama.cpp stops at n_ctx), with finish_reason "length".
    Without `caches`, state for the prompt plus max_new_tokens (capped at max_context) is
    made here. `graphs`: a moerun.graphs.DecodeGraphs over those caches, which then runs
    the decode steps (replayed CUDA graphs).

    `held` (with `caches`): the ids of the sequence the caches hold, kept up to date in
    place as positions are written (also when the generator is closed early, or a forward
    is interrupted); the prompt is prefilled from `reusable_prefix(held, ...)`. None:
    always from position 0.

    `keep_special`: special tokens the text keeps (a tool-call parser's markers).
    `constraint`: an object whose pick(logits, params, generator) chooses each token in
    place of sampling (moerun.json_constraint.JSONConstraint: JSON mode)."""
    if not prompt_ids:
        raise MoerunError("the prompt is empty")
    if max_new_tokens < 1:
        raise MoerunError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
    # An encoder-decoder model (the Switch Transformer): the prompt goes to the encoder, once;
    # the decoder starts from its start token. Its states hold up to cache_len encoder
    # positions and as many decoder positions.
    encoder_decoder = is_encoder_decoder(lm)
    decoder_needs = 1 + max_new_tokens if encoder_decoder else len(prompt_ids) + max_new_tokens
    if caches is None:
        if len(prompt_ids) >= max_context:
            raise MoerunError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {max_context}")
        caches = lm.make_caches(1, min(max(len(prompt_ids) + 1, decoder_needs), max_context))
        graphs = held = None
    elif graphs is not None and graphs.caches is not caches:
        raise ValueError("graphs were captured over other caches")
    cache_len = context_of(caches)
    if len(prompt_ids) >= cache_len:
        raise MoerunError(
            f"the prompt has {len(prompt_ids)} tokens; the planned context is {cache_len} "
            f"(load with a larger ctx, e.g. --ctx {min(2 * (len(prompt_ids) + max_new_tokens), max_context)})"
        )
    device = lm.lm_head.weight.device
    choose = constraint.pick if constraint is not None else _next_token
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    # Span-corruption models answer in sentinel tokens (<extra_id_0>): they are shown.
    # keep_special: special tokens the text keeps (a tool-call parser reads them).
    decoder = tokenizer.stream_decoder(skip_special_tokens=not encoder_decoder, keep_special=keep_special)
    if held is None or encoder_decoder:
        if held is not None:
            held.clear()  # the decoder's states are never reused across prompts
        held = []  # nobody reads it back
    start = reusable_prefix(held, prompt_ids, caches)
    del held[start:]
    rewindable = _rewindable(caches)
    encoder_ids = prompt_ids

    def forward(ids: list[int], at: int, decode: bool):
        # A forward cut short (Ctrl-C) leaves a rewindable state good up to `at`; any
        # other state is then unknown, so nothing is held.
        try:
            if decode and graphs is not None:
                out = graphs.step(ids[0], at)
            else:
                out = lm(torch.tensor([ids], device=device), caches, at, last_only=True)
        except BaseException:
            if not rewindable:
                held.clear()
            raise
        held.extend(ids)
        return out

    t0 = time.perf_counter()
    if encoder_decoder:
        lm.encode(torch.tensor([encoder_ids], device=device), caches)
        prompt_ids = [lm.decoder_start_token_id]
    # The sequence the penalties look at (kept only when a penalty is set).
    seen = list(prompt_ids) if params.adjusts_logits else None

    def pick(row: torch.Tensor) -> int:
        if seen is None:
            return choose(row, params, generator)
        token = choose(adjust_logits(row, params, seen, len(prompt_ids)), params, generator)
        seen.append(token)
        return token

    logits = forward(prompt_ids[start:], start, decode=False)
    token = pick(logits[0, -1])
    t_first = time.perf_counter()

    generated, position = 1, len(prompt_ids)  # position: where the next token's K/V go
    while True:
        stop = token in eos_ids and not ignore_eos
        text = "" if stop else decoder.add(token)
        if not (stop or generated >= max_new_tokens or position >= cache_len):
            yield GenerationResponse(text, token)
            logits = forward([token], position, decode=True)
            position += 1
            token = pick(logits[0, -1])
            generated += 1
            continue

        text += decoder.flush()
        prompt_s, gen_s = t_first - t0, time.perf_counter() - t_first
        prefilled = len(encoder_ids) - start
        stats = GenerationStats(
            prompt_tokens=len(encoder_ids),
            generated_tokens=generated,
            prompt_seconds=prompt_s,
            generation_seconds=gen_s,
            prompt_tps=prefilled / prompt_s if prompt_s > 0 else 0.0,
            generation_tps=(generated - 1) / gen_s if generated > 1 and gen_s > 0 else 0.0,
            peak_memory_bytes=peak_memory_bytes(device),
            finish_reason="stop" if stop else "length",
            prefilled_tokens=prefilled,
            reused_tokens=start,
        )
        yield GenerationResponse(text, token, stats)
        return
