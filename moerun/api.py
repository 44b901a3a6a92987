"""The Python API: `moerun.load(...)` returns a `Model` with logits(), generate() and
stream_generate(). The CLI is a thin shell over this module."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import torch
from torch import nn

from moerun import hub, library, plan
from moerun.errors import MoerunError
from moerun.generate import (
    GenerationOutput,
    GenerationResponse,
    GenerationStats,
    SamplingParams,
    reusable_prefix,
    stream_tokens,
)
from moerun.graphs import DecodeGraphs, graphs_enabled
from moerun.models import check_config, get_architecture, load_model
from moerun.models.base import is_encoder_decoder
from moerun.moe.offload import attach_expert_cache, cache_stats, reset_cache_stats
from moerun.progress import ExpertsPrepared, FitChecked, OnEvent, download_callbacks
from moerun.spec import LoadSpec
from moerun.tokenizer import Tokenizer
from moerun.units import params_short
from moerun.weights import CheckpointWeights

Prompt = str | Sequence[int] | Sequence[dict]


def pull_if_missing(name: str, spec: LoadSpec = LoadSpec(), on_event: OnEvent | None = None) -> None:
    """Pull on first use, as `ollama run` does: an alias or repo id that is not in the
    local cache is planned first from its Hub headers (`moerun.fit`, a few hundred KB) at
    the spec's bits and budgets, refused when it cannot fit (unless `spec.force`: nothing
    is downloaded), else downloaded. Offline, for a folder or a cached repo, or for a given
    revision (pull fetches the main one), nothing happens. on_event gets the fit (FitChecked) before any download, then its bytes
    (Downloaded)."""
    repo_id = hub.repo_id_for(name)
    if repo_id is None or spec.revision is not None or hub.is_cached(repo_id) or hub.is_offline():
        return
    from moerun import fit

    # The Hub first: unreachable, that is the error to report (a fit from the shipped config
    # would say "0 bytes to download" and judge a download that cannot happen).
    repo = hub.remote_repo(repo_id)
    report = fit.fit(repo_id, bits=spec.bits, vram=spec.vram, ram=spec.ram, ctx=spec.ctx, measure=False)
    if on_event is not None:
        on_event(FitChecked(repo_id, spec.bits, report))
    if report.plan.verdict is plan.Verdict.NO and not spec.force:
        raise MoerunError(
            f"{repo_id} will not fit: {report.plan.reason}{plan.bits_hint(report.plans, spec.bits)}; "
            "nothing was downloaded (--force, or force=True, pulls anyway)"
        )
    on_start, on_bytes = download_callbacks(repo_id, on_event)
    hub.pull(repo_id, None, repo=repo, on_start=on_start, on_bytes=on_bytes)


def _eos_ids(folder: Path, config: dict, tokenizer: Tokenizer) -> set[int]:
    """Every id that ends a reply: generation_config.json's eos_token_id (an int or a
    list), config.json's, and the tokenizer's eos token (a chat model's end-of-turn)."""
    ids: set[int] = set()
    sources = [config.get("eos_token_id")]
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        try:
            sources.append(json.loads(gen_path.read_text()).get("eos_token_id"))
        except json.JSONDecodeError as e:
            raise MoerunError(f"{gen_path} is not valid JSON: {e}") from e
    sources.append(tokenizer.eos_token_id)
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    return ids


def _check_vocab(tokenizer: Tokenizer, vocab_size: int, folder: Path) -> None:
    """Refuse a tokenizer with ids the model's embedding lacks. A tokenizer smaller than
    vocab_size is the usual case (padded embeddings); only ids >= vocab_size matter."""
    beyond = tokenizer.tokens_from(vocab_size)
    if beyond:
        token, token_id = beyond[0]
        more = f" and {len(beyond) - 1} more" if len(beyond) > 1 else ""
        raise MoerunError(
            f"the tokenizer in {folder} has token {token!r} at id {token_id}{more}, but the model's "
            f"vocab_size (config.json) is {vocab_size}: the tokenizer and the model disagree"
        )


class Model:
    """A loaded model: its tokenizer, logits, and generation."""

    def __init__(self, lm, tokenizer: Tokenizer, config: dict, folder: Path, name: str, device, dtype):
        self.lm = lm
        self.tokenizer = tokenizer
        self.config = config
        self.folder = folder
        self.name = name
        self.device = device
        self.dtype = dtype
        self.eos_token_ids = _eos_ids(folder, config, tokenizer)
        self.max_context = int(config.get("max_position_embeddings") or 4096)
        # The longest context generate() can fill; the static KV cache holds min(this, ctx).
        self.last_stats: GenerationStats | None = None
        self.plan: plan.Plan | None = None
        self.offload_info: dict | None = None
        self.kv_caches: list | None = None  # static, for the planned context; see load()
        # Decode steps over kv_caches, replayed from CUDA graphs (see moerun/graphs.py);
        # None runs them eagerly.
        self.decode_graphs = None
        # The token ids of the sequence kv_caches hold (positions 0..len-1), for prefix
        # reuse; tied to the caches object they describe.
        self.cached_ids: list[int] = []
        self._cached_for = None

    @property
    def stats(self) -> dict:
        """Expert-cache counters, in total and per MoE layer: hits, misses, prefetch hits,
        prefetches, experts computed on the CPU, bytes copied host->device. Empty when the
        experts are plain resident weights (bits=16 with everything in RAM, on the CPU)."""
        return cache_stats(self.lm)

    def reset_stats(self) -> None:
        reset_cache_stats(self.lm)

    def reusable_tokens(self, ids: Sequence[int]) -> int:
        """How many leading tokens of `ids` the next generation takes from the states
        instead of prefilling them."""
        if self.kv_caches is None or self._cached_for is not self.kv_caches:
            return 0
        return reusable_prefix(self.cached_ids, [int(t) for t in ids], self.kv_caches)

    def forget_prefix(self) -> None:
        """Drop the held sequence: the next generation prefills from position 0."""
        self.cached_ids = []

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.lm.parameters())

    def describe(self) -> str:
        size = params_short(self.num_parameters)
        dtype = str(self.dtype).removeprefix("torch.")
        if self.plan is not None and self.plan.linear_dtype:
            dtype += f" (matrices {self.plan.linear_dtype})"
        return f"{self.name} · {self.config.get('model_type')} · {size} params · {self.device} · {dtype}"

    @property
    def is_encoder_decoder(self) -> bool:
        """An encoder-decoder model (the Switch Transformer): the prompt goes to the encoder."""
        return is_encoder_decoder(self.lm)

    @property
    def is_chat_model(self) -> bool:
        """Can it chat? Not an encoder-decoder span-corruption model, unless its checkpoint
        ships a chat template."""
        return not self.is_encoder_decoder or self.tokenizer.has_chat_template

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids LongTensor [B, T] -> float32 logits [B, T, vocab], from a fresh state.
        An encoder-decoder model takes the encoder's input_ids [B, S] and the decoder's
        decoder_input_ids [B, T], and gives the decoder's logits [B, T, vocab]."""
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        if input_ids.dim() != 2:
            raise MoerunError(f"input_ids must be [batch, tokens], got shape {list(input_ids.shape)}")
        if not self.is_encoder_decoder:
            if decoder_input_ids is not None:
                raise MoerunError("decoder_input_ids is for encoder-decoder models only")
            caches = self.lm.make_caches(input_ids.shape[0], input_ids.shape[1])
            return self.lm(input_ids.to(self.device), caches, 0).float()
        if decoder_input_ids is None:
            raise MoerunError("an encoder-decoder model needs decoder_input_ids as well as input_ids")
        decoder_input_ids = torch.as_tensor(decoder_input_ids, dtype=torch.long)
        if decoder_input_ids.dim() != 2 or decoder_input_ids.shape[0] != input_ids.shape[0]:
            raise MoerunError(
                f"decoder_input_ids must be [{input_ids.shape[0]}, tokens], got shape {list(decoder_input_ids.shape)}"
            )
        caches = self.lm.make_caches(input_ids.shape[0], max(input_ids.shape[1], decoder_input_ids.shape[1]))
        self.lm.encode(input_ids.to(self.device), caches)
        return self.lm(decoder_input_ids.to(self.device), caches, 0).float()

    def encode_prompt(self, prompt: Prompt, chat: bool) -> list[int]:
        """Token ids for `prompt`: ids pass through; a list of messages, or a string with
        chat=True, goes through the chat template; a plain string is encoded as is (always,
        for a model that does not chat: a span-corruption encoder-decoder)."""
        if isinstance(prompt, str):
            if not chat or not self.is_chat_model:
                return self.tokenizer.encode(prompt)
            prompt = [{"role": "user", "content": prompt}]
        prompt = list(prompt)
        if prompt and isinstance(prompt[0], dict):
            return self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        ids = [int(t) for t in prompt]
        vocab = self.lm.args.vocab_size
        bad = next((t for t in ids if t < 0 or (vocab and t >= vocab)), None)
        if bad is not None:
            raise MoerunError(f"token id {bad} is not in the model's vocabulary (0 to {vocab - 1})")
        return ids

    def stream_generate(
        self,
        prompt: Prompt,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        chat: bool = False,
        ignore_eos: bool = False,
        reuse_prefix: bool = True,
        keep_special: tuple[str, ...] = (),
        json_mode: bool = False,
        **penalties,
    ) -> Iterator[GenerationResponse]:
        """Yield one GenerationResponse per generated token; the last carries the stats.

        The states keep the last sequence: a prompt that starts with it (the next turn of
        a chat) is prefilled only past the common prefix, with the same logits as a fresh
        prefill (`stats.reused_tokens` / `prefilled_tokens` count them). For states that
        cannot be rewound (recurrent layers, sliding-window rings) only a prompt that
        extends the whole held sequence reuses it. reuse_prefix=False prefills from 0.
        Closing the generator early is safe: the states then hold what was computed.

        keep_special: special tokens kept in the text (e.g. "[TOOL_CALLS]", for a
        tool-call parser). json_mode: constrained decoding to one JSON object
        (moerun.json_constraint); the reply ends when the object does. `penalties`: SamplingParams'
        min_p, presence_penalty, frequency_penalty, repeat_penalty, repeat_last_n, logit_bias."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, **penalties)
        ids = self.encode_prompt(prompt, chat)
        constraint = None
        if json_mode:
            from moerun.json_constraint import JSONConstraint

            constraint = JSONConstraint(self.tokenizer, self.eos_token_ids)
        held = None
        if self.kv_caches is not None:
            if self._cached_for is not self.kv_caches:  # new caches: they hold nothing yet
                self.cached_ids, self._cached_for = [], self.kv_caches
            held = self.cached_ids
            if not reuse_prefix:
                held.clear()
        for response in stream_tokens(
            self.lm,
            ids,
            max_new_tokens,
            params,
            self.eos_token_ids,
            self.max_context,
            self.tokenizer,
            ignore_eos,
            self.kv_caches,
            self.decode_graphs,
            held,
            tuple(keep_special),
            constraint,
        ):
            if response.stats is not None:
                self.last_stats = response.stats
            yield response

    def generate(self, prompt: Prompt, max_new_tokens: int = 64, **kwargs) -> GenerationOutput:
        """Generate a whole reply: `.text`, `.token_ids` (generated ids, eos included when
        it stopped the reply) and `.stats`. Options as stream_generate."""
        pieces, token_ids, stats = [], [], None
        for response in self.stream_generate(prompt, max_new_tokens, **kwargs):
            pieces.append(response.text)
            token_ids.append(response.token_id)
            stats = response.stats or stats
        return GenerationOutput("".join(pieces), token_ids, stats)


def load(
    name_or_path: str,
    bits: int = 16,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str | None = None,
    vram: str | int | None = None,
    expert_slots: int | None = None,
    revision: str | None = None,
    ram: str | int | None = None,
    cold: str = "gpu",
    prefetch: bool = True,
    ctx: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    cuda_graphs: bool | None = None,
    threads: int | None = None,
    pull: bool = True,
    force: bool = False,
) -> Model:
    """Load a model from a folder in the Hub layout, an alias (`moerun models`), or a repo
    id in the local Hugging Face cache.

    bits: 16 keeps the checkpoint's precision; 8 and 4 quantize the routed experts (int8
    per-row, NF4), cached on disk after the first load. vram / ram: budgets ("12GiB",
    bytes); the planner fits non-expert weights and the KV cache for `ctx` tokens first,
    then as many expert slots per MoE layer as fit; `expert_slots` overrides it. cold:
    where non-resident experts run, "gpu" (copied into a slot), "cpu" (computed in RAM) or
    "auto". prefetch: guess the next layer's experts and copy them early.
    progress: called as progress(done_layers, total_layers) while expert stores are built.
    device: "auto" (CUDA when available), "cpu" or "cuda". dtype: None or "auto" keeps the
    checkpoint's (on a CPU without native bf16/fp16 matmuls: float32). cuda_graphs: replay
    decode steps from CUDA graphs; None means on CUDA unless MOERUN_CUDA_GRAPHS=0 (False
    runs them eagerly; the CPU never uses them). threads: CPU threads for torch and the CPU
    kernels (torch.set_num_threads, process-wide); None leaves torch's default.
    pull: an alias or repo id missing from the local cache is fit-checked from its Hub
    headers and downloaded (see pull_if_missing; `force` pulls even when it will not fit).

    The keywords become one LoadSpec (moerun.spec), checked there; `load_spec` takes one.
    """
    spec = LoadSpec(
        bits=bits,
        dtype=dtype,
        device=device,
        vram=vram,
        ram=ram,
        expert_slots=expert_slots,
        ctx=ctx,
        cold=cold,
        prefetch=prefetch,
        threads=threads,
        cuda_graphs=cuda_graphs,
        revision=revision,
        pull=pull,
        force=force,
    )

    def on_event(event) -> None:
        if progress is not None and isinstance(event, ExpertsPrepared):
            progress(event.done, event.total)

    return load_spec(name_or_path, spec, on_event)


def load_spec(name_or_path: str, spec: LoadSpec, on_event: OnEvent | None = None) -> Model:
    """`load`, from a spec: pull if missing, read the checkpoint's config and tokenizer,
    then plan and assemble (`assemble`), then the KV cache and decode graphs for the plan.
    on_event: the progress events (moerun.progress) of the pull and the expert stores."""
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)  # process-wide: the CPU kernels use the same count
    if spec.pull:
        pull_if_missing(name_or_path, spec, on_event)
    folder = hub.resolve(name_or_path, revision=spec.revision)
    config = hub.read_config(folder)
    library.mark_used(folder)  # for `moerun ls`: one empty file's mtime
    family = get_architecture(config.get("model_type"))  # refuse unknown families before reading anything big
    args = check_config(config, folder / "config.json")  # a bad value, named, before anything is built from it
    tokenizer = Tokenizer.from_dir(folder)
    _check_vocab(tokenizer, args.vocab_size, folder)
    device = spec.resolve_device()

    # The headers are read once, here: the plan, the loader and the expert stores share them.
    with CheckpointWeights.open(folder) as ckpt:
        source = CheckpointSource(name_or_path, config, folder, family, ckpt)
        lm, memory_plan, info, dtype = assemble(source, spec, device, on_event)
    model = Model(lm, tokenizer, config, folder, name_or_path, device, dtype)
    model.plan, model.offload_info = memory_plan, info
    # The KV cache for the planned context is allocated once, up front, as planned.
    model.kv_caches = lm.make_caches(1, memory_plan.ctx)
    if graphs_enabled(device) if spec.cuda_graphs is None else spec.cuda_graphs:
        model.decode_graphs = DecodeGraphs(lm, model.kv_caches, capture_graphs=True)
    return model


class Source(Protocol):
    """Where a model's weights come from: a checkpoint (CheckpointSource) or the random
    weights of `bench --synthetic` (moerun.bench.SyntheticSource). Both are planned and
    assembled by `assemble`."""

    name: str
    config: dict

    def summary(self) -> plan.ModelSummary:
        """What the planner needs, from the model built on the meta device."""

    def build(
        self, memory_plan: plan.Plan, spec: LoadSpec, device: torch.device, dtype: torch.dtype, on_event: OnEvent | None
    ) -> tuple[nn.Module, dict | None]:
        """The LM with its weights placed as `memory_plan` says, and the expert cache's info."""


def assemble(
    source: Source, spec: LoadSpec, device: torch.device, on_event: OnEvent | None = None
) -> tuple[nn.Module, plan.Plan, dict | None, torch.dtype]:
    """Plan `source` for `spec` on `device` (refused with numbers when it does not fit),
    build it as planned; on the CPU, its decode-step GEMVs through the C kernel. Returns
    the LM, the plan, the expert cache's info and the dtype the rest computes in."""
    if spec.dtype == "auto":
        dtype = plan.default_dtype(source.config, device.type)
        linears = plan.linear_dtype(source.config, device.type, dtype)
    else:
        dtype = linears = plan.DTYPES[spec.dtype]
    memory_plan = plan.plan_load(source.summary(), spec, device, dtype, source.name, linears)
    lm, info = source.build(memory_plan, spec, device, dtype, on_event)
    if device.type == "cpu":
        from moerun.kernels.cpu_linear import use_cpu_linears

        use_cpu_linears(lm)
    return lm, memory_plan, info, dtype


@dataclasses.dataclass
class CheckpointSource:
    """A checkpoint in the Hub layout, its headers opened once (`ckpt`)."""

    name: str
    config: dict
    folder: Path
    family: object
    ckpt: CheckpointWeights

    def summary(self) -> plan.ModelSummary:
        return plan.summarize(self.config, self.ckpt.headers())

    def build(self, memory_plan, spec, device, dtype, on_event):
        # On CUDA even 16-bit resident experts go through the expert cache's slot buffers: that
        # is what the Triton kernels read (no Python loop over experts, and capturable).
        from moerun import kernels

        on_kernels = device.type == "cuda" and kernels.available(device)
        offload = spec.bits != 16 or memory_plan.expert_slots_per_layer < memory_plan.n_experts or on_kernels
        linears = plan.DTYPES[memory_plan.linear_dtype] if memory_plan.linear_dtype else None
        lm = load_model(
            self.folder, self.config, dtype, device, routed_experts=not offload, ckpt=self.ckpt, linear_dtype=linears
        )
        if not offload:
            return lm, None

        def progress(done: int, total: int) -> None:
            if on_event is not None:
                on_event(ExpertsPrepared(spec.bits, done, total))

        slots = memory_plan.expert_slots_per_layer
        info = attach_expert_cache(
            lm, self.family, self.folder, spec.bits, slots, device, dtype, spec.cold, spec.prefetch, progress, self.ckpt
        )
        return lm, info
