"""Token generation: one prefill over the prompt, then one decode step per token against
a static KV cache; greedy or sampled (temperature, top-k, top-p, seed); stop on any eos
id or at max_new_tokens. The generator yields small responses; rendering is the CLI's job.
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


@dataclasses.dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0  # 1 means no nucleus cut
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise MoerunError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MoerunError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise MoerunError(f"top-k must be >= 0, got {self.top_k}")


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


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits [V] (float32, CPU) -> one token id. Order as in transformers: temperature,
    then top-k, then top-p."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
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
    return int(torch.multinomial(probs, 1, generator=generator))


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
) -> Iterator[GenerationResponse]:
    """Prefill `prompt_ids`, then decode up to `max_new_tokens` tokens, yielding each.

    `caches`: the layers' preallocated state (moerun.load makes it for the planned
    context). The plan binds: generation never grows it. A prompt that leaves no room in
    it is refused before prefill; otherwise generation stops when it is full (at the
    planned context, as llama.cpp stops at n_ctx), with finish_reason "length".
    Without `caches`, state for the prompt plus max_new_tokens (capped at max_context) is
    made here. `graphs`: a moerun.graphs.DecodeGraphs over those caches, which then runs
    the decode steps (replayed CUDA graphs)."""
    if not prompt_ids:
        raise MoerunError("the prompt is empty")
    if max_new_tokens < 1:
        raise MoerunError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
    if caches is None:
        if len(prompt_ids) >= max_context:
            raise MoerunError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {max_context}")
        caches = lm.make_caches(1, min(len(prompt_ids) + max_new_tokens, max_context))
        graphs = None
    elif graphs is not None and graphs.caches is not caches:
        raise ValueError("graphs were captured over other caches")
    cache_len = context_of(caches)
    if len(prompt_ids) >= cache_len:
        raise MoerunError(
            f"the prompt has {len(prompt_ids)} tokens; the planned context is {cache_len} "
            f"(load with a larger ctx, e.g. --ctx {min(2 * (len(prompt_ids) + max_new_tokens), max_context)})"
        )
    device = lm.lm_head.weight.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    decoder = tokenizer.stream_decoder()

    t0 = time.perf_counter()
    logits = lm(torch.tensor([prompt_ids], device=device), caches, 0, last_only=True)
    token = sample(logits[0, -1].float().cpu(), params, generator)
    t_first = time.perf_counter()

    generated, position = 1, len(prompt_ids)  # position: where the next token's K/V go
    while True:
        stop = token in eos_ids and not ignore_eos
        text = "" if stop else decoder.add(token)
        if not (stop or generated >= max_new_tokens or position >= cache_len):
            yield GenerationResponse(text, token)
            if graphs is not None:
                logits = graphs.step(token, position)
            else:
                logits = lm(torch.tensor([[token]], device=device), caches, position)
            position += 1
            token = sample(logits[0, -1].float().cpu(), params, generator)
            generated += 1
            continue

        text += decoder.flush()
        prompt_s, gen_s = t_first - t0, time.perf_counter() - t_first
        stats = GenerationStats(
            prompt_tokens=len(prompt_ids),
            generated_tokens=generated,
            prompt_seconds=prompt_s,
            generation_seconds=gen_s,
            prompt_tps=len(prompt_ids) / prompt_s if prompt_s > 0 else 0.0,
            generation_tps=(generated - 1) / gen_s if generated > 1 and gen_s > 0 else 0.0,
            peak_memory_bytes=peak_memory_bytes(device),
            finish_reason="stop" if stop else "length",
        )
        yield GenerationResponse(text, token, stats)
        return
