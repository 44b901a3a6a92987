"""Swap a model's routed experts for the expert cache: build (or open) the host stores,
give each MoE layer its slots, link next-layer prefetch, calibrate the cold-expert policy.
Architectures are untouched: their MoE blocks call `experts(x, ids, weights)` either way."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from torch import nn

from moerun.errors import MoerunError
from moerun.moe.backends import Routed
from moerun.moe.cache import CachedExperts
from moerun.moe.experts import RoutedExperts
from moerun.moe.residency import CacheStats, ColdPolicy, make_prefetch_hook
from moerun.moe.routing import Router
from moerun.moe.store import QuantizedCache, layer_expert_blobs
from moerun.quant.format import ExpertFormat
from moerun.spec import check_cold
from moerun.weights import CheckpointWeights


def routed_expert_modules(lm: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """(layer index, module path, module) of every routed-experts module, in layer order."""
    # Every family's model names its layers' paths (an encoder-decoder's are not model.layers).
    paths = lm.layer_paths()
    found = []
    for i, path in enumerate(paths):
        for name, module in lm.get_submodule(path).named_modules():
            if isinstance(module, (RoutedExperts, CachedExperts)):
                found.append((i, f"{path}.{name}", module))
    return found


def cache_stats(lm: nn.Module) -> dict:
    """Expert-cache counters of `lm`, in total and per MoE layer; {} when its experts are
    plain resident weights."""
    layers, total = {}, CacheStats()
    for i, _, module in routed_expert_modules(lm):
        if isinstance(module, CachedExperts):
            layers[i] = module.residency.stats.to_dict()
            total.add(module.residency.stats)
    return {"total": total.to_dict(), "layers": layers} if layers else {}


def reset_cache_stats(lm: nn.Module) -> None:
    for _, _, module in routed_expert_modules(lm):
        if isinstance(module, CachedExperts):
            module.residency.stats = CacheStats()


def expert_formats(lm: nn.Module, bits: int, dtype: torch.dtype) -> tuple[dict, dict, dict]:
    """Per MoE layer: its ExpertFormat at `bits`, its expert count, its module path."""
    modules = routed_expert_modules(lm)
    if not modules:
        raise MoerunError("this model has no routed experts to quantize or offload")
    fmts, n_experts, paths = {}, {}, {}
    for i, path, m in modules:
        E, _, D = m.w13.shape
        fmts[i] = ExpertFormat(bits, D, m.intermediate_size, dtype, bias=m.b13 is not None, gated=m.act.gated)
        n_experts[i], paths[i] = E, path
    return fmts, n_experts, paths


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
    ckpt: CheckpointWeights | None = None,
) -> dict:
    """Replace every RoutedExperts in `lm` by a CachedExperts with `slots` slots, with the
    experts of the checkpoint in `folder`.

    16-bit stores are packed in memory from the checkpoint; 4- and 8-bit stores come from
    the on-disk quantized cache, built on first use. `progress(done, total)` is called per
    MoE layer while stores are built. Returns facts for the report (whether the cache was
    built, where it lives)."""
    fmts, n_experts, paths = expert_formats(lm, bits, dtype)
    info: dict = {"bits": bits, "slots": slots}
    with contextlib.ExitStack() as stack:
        if ckpt is None:  # the caller's open checkpoint, else one opened here
            ckpt = stack.enter_context(CheckpointWeights.open(folder))

        def build(i: int) -> torch.Tensor:
            return layer_expert_blobs(ckpt, arch, lm.args, i, paths[i], fmts[i])

        if bits == 16:
            stores = {}
            to_device = device.type == "cuda" and slots >= max(n_experts.values())
            for done, i in enumerate(fmts, 1):
                # All resident on the GPU: each layer goes there as it is packed, so host
                # RAM never holds more than one layer of it.
                stores[i] = build(i).to(device) if to_device else build(i)
                if progress:
                    progress(done, len(fmts))
            info["quantized_cache"] = None
        else:
            qcache = QuantizedCache(folder, fmts, n_experts, bits, ckpt.fingerprint)
            stores, built = qcache.load_or_build(build, progress)
            info.update(quantized_cache=str(qcache.path), cache_built=built, cache_repaired=qcache.repaired)
    info.update(install_expert_cache(lm, stores, fmts, slots, device, dtype, cold, prefetch))
    return info


def install_expert_cache(
    lm: nn.Module,
    stores: dict[int, torch.Tensor],
    fmts: dict[int, ExpertFormat],
    slots: int,
    device: torch.device,
    dtype: torch.dtype,
    cold: str = "gpu",
    prefetch: bool = True,
) -> dict:
    """Swap each layer's RoutedExperts for a CachedExperts over `stores[layer]` (uint8
    [E, blob_bytes] host tensors), link prefetch, and calibrate the cold policy."""
    check_cold(cold)
    on_cuda = device.type == "cuda"
    copy_stream = torch.cuda.Stream(device) if on_cuda else None
    policies: dict[ExpertFormat, ColdPolicy] = {}  # one per expert format: layers alike share it
    cached: list[tuple[int, str, CachedExperts]] = []
    for i, path, original in routed_expert_modules(lm):
        store = stores[i]
        if on_cuda and slots < store.shape[0]:
            # Pinned host memory: the only kind a copy engine reads asynchronously.
            store = torch.empty(store.shape, dtype=store.dtype, pin_memory=True).copy_(store)
        elif on_cuda:
            store = store.to(device)  # all resident: no host copy is kept
        policy = policies.setdefault(fmts[i], ColdPolicy(mode=cold))
        module = CachedExperts(
            fmts[i], store, slots, device, dtype, policy, copy_stream, original.act, original.weights_on_input
        )
        owner_path, _, leaf = path.rpartition(".")
        setattr(lm.get_submodule(owner_path), leaf, module)
        cached.append((i, owner_path, module))

    if prefetch and slots < max(m.n_experts for _, _, m in cached):
        for (_, _, here), (_, next_block, there) in zip(cached, cached[1:]):
            router = _router_of(lm.get_submodule(next_block))
            # Not when this layer's experts see another width than the next router (a latent MoE).
            width = getattr(getattr(router, "weight", None), "shape", (here.fmt.hidden_size,))[-1]
            if router is not None and width == here.fmt.hidden_size:
                here.residency.prefetch_next = make_prefetch_hook(router, there.residency)

    info = {}
    if cold == "auto" and slots < max(m.n_experts for _, _, m in cached):
        info["cold_policy"] = {}
        for fmt, policy in policies.items():
            calibrate(policy, next(m for _, _, m in cached if m.fmt == fmt))
            info["cold_policy"][fmt.name + f" {fmt.hidden_size}x{fmt.intermediate_size}"] = {
                k: getattr(policy, k) for k in ("copy_seconds", "cpu_fixed_seconds", "cpu_token_seconds")
            } | {"cpu_up_to_tokens": policy.cpu_up_to_tokens()}
    return info


def _router_of(block: nn.Module) -> nn.Module | None:
    """The router of an MoE block: the shared Router (whatever the family's rule, it gives
    (ids, weights) for flat tokens) among the block's own modules; None for a block that
    routes otherwise (Switch's capacity-limited top-1), which is then not prefetched."""
    return next((m for m in block.children() if isinstance(m, Router)), None)


@torch.inference_mode()
def calibrate(policy: ColdPolicy, module: CachedExperts, repeats: int = 3) -> None:
    """Measure, on this machine, one expert's copy into a slot and its CPU compute (the
    path cold experts really take: the layer's cold backend, the fused CPU kernels or
    dequantize-and-multiply) at 1 and 8 tokens; `auto` then picks the cheaper place per
    expert and token count.

    The CPU side runs one expert per token over enough distinct experts (>= 64 MiB, their
    pages faulted in first) that it reads RAM, as a cold expert does, not the caches."""
    fmt, store = module.fmt, module.residency.store
    scratch = torch.empty_like(module.residency.slots[0])
    E = store.shape[0]
    n = min(E, max(4, -(-(64 << 20) // fmt.blob_bytes)))
    experts = list(range(n))

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

    def cpu_experts(tokens_each: int):
        ids = torch.arange(n).repeat_interleave(tokens_each)[:, None]
        x = torch.randn(ids.shape[0], fmt.hidden_size).to(module.compute_dtype)
        routed = Routed.group(ids, torch.ones(ids.shape[0], 1), E)
        out = torch.zeros(x.shape)
        return lambda: module.cold_backend.add(out, x, routed, experts, experts)

    for e in range(n):  # fault the pages in: the first touch of a memory-mapped store is not its steady cost
        store[e].cpu().view(torch.uint8)[::4096].sum()
    policy.copy_seconds = timed(lambda: [scratch.copy_(store[e], non_blocking=True) for e in range(n)]) / n
    one, eight = timed(cpu_experts(1)) / n, timed(cpu_experts(8)) / n
    policy.cpu_token_seconds = max((eight - one) / 7, 0.0)
    policy.cpu_fixed_seconds = max(one - policy.cpu_token_seconds, 0.0)
