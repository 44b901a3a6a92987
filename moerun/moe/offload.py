"""Swap a model's routed experts for the expert cache: build (or open) the host stores,
give each MoE layer its slots, link next-layer prefetch, calibrate the cold-expert policy.
Architectures are untouched: their MoE blocks call `experts(x, ids, weights)` either way."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from moerun.errors import MoerunError
from moerun.moe.cache import CachedExperts, ColdPolicy, make_prefetch_hook
from moerun.moe.experts import RoutedExperts, apply_expert
from moerun.moe.store import QuantizedCache, layer_expert_blobs
from moerun.quant.format import ExpertFormat
from moerun.weights import CheckpointWeights

COLD_MODES = ("gpu", "cpu", "auto")


def routed_expert_modules(lm: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """(layer index, module path, module) of every routed-experts module, in layer order."""
    found = []
    for i, layer in enumerate(lm.model.layers):
        for name, module in layer.named_modules():
            if isinstance(module, (RoutedExperts, CachedExperts)):
                found.append((i, f"model.layers.{i}.{name}", module))
    return found


def attach_expert_cache(
    lm: nn.Module,
    arch,
    folder: Path,
    bits: int,
    slots: int,
    device: torch.device,
    dtype: torch.dtype,
    cold: str = "gpu",
    prefetch: bool = True,
    progress=None,
) -> dict:
    """Replace every RoutedExperts in `lm` by a CachedExperts with `slots` slots.
    `progress(done, total)` is called per MoE layer while stores are built.

    16-bit stores are packed in memory from the checkpoint; 4- and 8-bit stores come from
    the on-disk quantized cache, built on first use. Returns facts for the report
    (whether the cache was built, where it lives)."""
    if cold not in COLD_MODES:
        raise MoerunError(f"cold must be one of {', '.join(COLD_MODES)}, got '{cold}'")
    modules = routed_expert_modules(lm)
    if not modules:
        raise MoerunError("this model has no routed experts to quantize or offload")
    args = lm.args
    fmts, n_experts = {}, {}
    for i, path, m in modules:
        E, two_i, D = m.w13.shape
        fmts[i] = ExpertFormat(bits, D, two_i // 2, dtype, bias=m.b13 is not None)
        n_experts[i] = E
    prefixes = {i: path for i, path, _ in modules}

    info: dict = {"bits": bits, "slots": slots}
    with CheckpointWeights.open(folder) as ckpt:

        def build(i: int) -> torch.Tensor:
            return layer_expert_blobs(ckpt, arch, args, i, prefixes[i], fmts[i])

        if bits == 16:
            stores = {}
            for done, i in enumerate(fmts, 1):
                stores[i] = build(i)
                if progress:
                    progress(done, len(fmts))
            info["quantized_cache"] = None
        else:
            qcache = QuantizedCache(folder, fmts, n_experts, bits)
            stores, built = qcache.load_or_build(build, progress)
            info.update(quantized_cache=str(qcache.path), cache_built=built)

    on_cuda = device.type == "cuda"
    copy_stream = torch.cuda.Stream(device) if on_cuda else None
    policy = ColdPolicy(mode=cold)
    cached: list[tuple[int, str, CachedExperts]] = []
    for i, path, original in modules:
        store = stores[i]
        if on_cuda and slots < n_experts[i]:
            # Pinned host memory: the only kind a copy engine reads asynchronously.
            store = torch.empty(store.shape, dtype=store.dtype, pin_memory=True).copy_(store)
        elif on_cuda:
            store = store.to(device)  # all resident: no host copy is kept
        module = CachedExperts(
            fmts[i], store, slots, device, dtype, policy, copy_stream, original.act, original.weights_on_input
        )
        owner_path, _, leaf = path.rpartition(".")
        setattr(lm.get_submodule(owner_path), leaf, module)
        cached.append((i, owner_path, module))

    if prefetch and slots < max(n_experts.values()):
        for (_, _, here), (_, next_owner, there) in zip(cached, cached[1:]):
            block = lm.get_submodule(next_owner)
            here.prefetch_hook = make_prefetch_hook(block.gate, there, block.top_k)

    if cold == "auto":
        calibrate(policy, cached[0][2])
        info["cold_policy"] = {k: getattr(policy, k) for k in ("copy_seconds", "cpu_fixed_seconds", "cpu_token_seconds")}
    return info


@torch.inference_mode()
def calibrate(policy: ColdPolicy, module: CachedExperts, repeats: int = 3) -> None:
    """Measure, on this machine, one expert's copy into a slot and its CPU compute for 1
    and 8 tokens; `auto` then picks the cheaper place per expert and batch."""
    fmt, store = module.fmt, module.store
    scratch = torch.empty_like(module.slots[0])

    def timed(fn) -> float:
        fn()  # warm-up
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return (time.perf_counter() - t0) / repeats

    def cpu_expert(n: int):
        x = torch.randn(n, fmt.hidden_size, dtype=module.compute_dtype)
        w = torch.ones(n, dtype=module.compute_dtype)
        return lambda: apply_expert(x, w, *fmt.unpack(store[0].cpu(), module.compute_dtype), module.act, False)

    policy.copy_seconds = timed(lambda: scratch.copy_(store[0], non_blocking=True))
    one, eight = timed(cpu_expert(1)), timed(cpu_expert(8))
    policy.cpu_token_seconds = max((eight - one) / 7, 0.0)
    policy.cpu_fixed_seconds = max(one - policy.cpu_token_seconds, 0.0)
