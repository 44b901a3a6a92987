"""Quantized experts and the expert cache, on the CPU: formats against bitsandbytes,
offloaded logits equal to fully resident ones, counters, the on-disk cache, the planner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import moerun
from moerun.errors import MoerunError
from moerun.moe.cache import CachedExperts
from moerun.moe.experts import SILU, ExpertActivation, RoutedExperts
from moerun.moe.offload import routed_expert_modules
from moerun.moe.residency import ColdPolicy, LRUPolicy
from moerun.quant import ExpertFormat, int8, nf4
from tests.model_fixtures import ARCH_CONFIGS, make_checkpoint
from tests.parity import rel_err

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOERUN_CACHE", str(tmp_path / "moerun-cache"))


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request, tmp_path_factory):
    arch = request.param
    return arch, make_checkpoint(tmp_path_factory.mktemp(arch), arch, dtype=torch.bfloat16, shards=2)


def n_experts(arch: str) -> int:
    cfg = ARCH_CONFIGS[arch]
    return cfg.get("num_local_experts") or cfg["num_experts"]


IDS = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(5))


# -- formats -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(128, 64), (256, 4096 // 16), (14336 // 64, 128), (7, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nf4_bytes_and_dequant_equal_bitsandbytes(shape, dtype):
    import bitsandbytes.functional as bnbf

    w = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(hash(shape) % 1000))
    packed, absmax = nf4.quantize(w)
    ref_packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(packed, ref_packed.flatten()) and torch.equal(absmax, state.absmax)
    assert torch.equal(nf4.dequantize(packed, absmax, shape, dtype), bnbf.dequantize_4bit(packed.view(-1, 1), state))


@pytest.mark.parametrize("shape", [(3, 50), (5, 96), (1, 1)])
def test_nf4_odd_shapes_equal_bitsandbytes_generic_path(shape):
    # bitsandbytes' CPU C++ kernel assumes per-row blocks when the last dim is not a
    # multiple of 64, disagreeing with its own quantizer; its generic (and CUDA) path
    # reads flat blocks, as moerun does.
    import bitsandbytes.functional as bnbf
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    w = torch.randn(shape)
    packed, absmax = nf4.quantize(w)
    ref_packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(packed, ref_packed.flatten())
    ref = _dequantize_4bit_compute(packed, absmax, state.code, 64, shape, torch.float32)
    assert torch.equal(nf4.dequantize(packed, absmax, shape, torch.float32), ref)


def test_formats_reconstruct_gaussian_weights_within_their_known_error():
    w = torch.randn(512, 256, generator=torch.Generator().manual_seed(0))
    # NF4 on N(0,1) weights: ~9.5% relative RMS error; int8 per row: ~0.7%.
    assert 0.07 < rel_err(nf4.dequantize(*nf4.quantize(w), w.shape, torch.float32), w) < 0.11
    assert rel_err(int8.dequantize(*int8.quantize(w), torch.float32), w) < 0.01


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_expert_blob_round_trip_and_alignment(bits):
    fmt = ExpertFormat(bits, 64, 96, torch.bfloat16)
    assert fmt.blob_bytes % 64 == 0 and all(s.offset % 64 == 0 for s in fmt.sections)
    w13, w2 = torch.randn(192, 64), torch.randn(64, 96)
    blob = fmt.pack(w13, w2)
    assert blob.dtype == torch.uint8 and blob.shape == (fmt.blob_bytes,)
    a, b, no_b13, no_b2 = fmt.unpack(blob, torch.float32)
    assert no_b13 is None and no_b2 is None
    bound = {16: 0.005, 8: 0.01, 4: 0.11}[bits]
    assert rel_err(a, w13) < bound and rel_err(b, w2) < bound


# -- the LRU policy ----------------------------------------------------------------------


def test_lru_fills_free_slots_then_evicts_least_recent():
    p = LRUPolicy(n_experts=5, n_slots=3)
    assert [p.admit(e) for e in (0, 1, 2)] == [(0, None), (1, None), (2, None)]
    p.touch(0)  # order now 1, 2, 0
    assert p.lru_order() == [1, 2, 0]
    assert p.admit(3) == (1, 1)  # expert 1 was least recent; its slot is reused
    assert not p.is_resident(1) and p.slot_of[3] == 1
    assert p.admit(4, protected={2}) == (0, 0)  # 2 is in use: the next least recent goes
    assert sorted(p.slot_of.values()) == [0, 1, 2]


def test_lru_refuses_when_every_slot_is_protected():
    p = LRUPolicy(2, 1)
    p.admit(0)
    with pytest.raises(RuntimeError):
        p.admit(1, protected={0})
    with pytest.raises(ValueError):
        LRUPolicy(4, 0)


# -- offloading is exact ------------------------------------------------------------------


def expert_uses(model) -> tuple[int, list]:
    """Count the distinct experts each MoE layer needs per forward, independently of the cache."""
    uses = [0]
    handles = [
        m.register_forward_pre_hook(lambda mod, args: uses.__setitem__(0, uses[0] + args[1].unique().numel()))
        for _, _, m in routed_expert_modules(model.lm)
    ]
    return uses, handles


@pytest.mark.parametrize("bits", [8, 4])
def test_any_slot_count_prefetch_and_cold_equal_fully_resident(checkpoint, bits):
    arch, folder = checkpoint
    E = n_experts(arch)
    resident = moerun.load(str(folder), bits=bits, device="cpu", dtype="float32")
    expected = resident.logits(IDS)
    assert resident.stats["total"]["misses"] == 0  # all resident: filled at load, never missed
    for slots in range(1, E + 1):
        for prefetch, cold in ((True, "gpu"), (False, "gpu"), (True, "cpu"), (False, "auto")):
            model = moerun.load(
                str(folder), bits=bits, device="cpu", dtype="float32", expert_slots=slots, prefetch=prefetch, cold=cold
            )
            uses, _ = expert_uses(model)
            got = model.logits(IDS)
            assert rel_err(got, expected) < 1e-6, (slots, prefetch, cold)
            total = model.stats["total"]
            assert total["hits"] + total["misses"] == uses[0]
            assert total["prefetch_hits"] <= total["hits"]
            if slots == E:
                assert total["misses"] == 0
            if slots == 1:
                assert total["misses"] > 0
            if cold == "cpu":
                assert total["cpu_experts"] == total["misses"]
            if not prefetch:
                assert total["prefetches"] == 0 and total["prefetch_hits"] == 0


def test_16_bit_offloading_equals_the_plain_model(checkpoint):
    _, folder = checkpoint
    expected = moerun.load(str(folder), device="cpu", dtype="float32").logits(IDS)
    model = moerun.load(str(folder), device="cpu", dtype="float32", expert_slots=1)
    assert rel_err(model.logits(IDS), expected) < 1e-6
    assert model.stats["total"]["misses"] > 0


def test_warm_cache_stops_missing(tmp_path):
    # Enough slots for every expert: after one pass everything is resident.
    folder = make_checkpoint(tmp_path, "qwen3_moe", dtype=torch.float32, shards=1)
    model = moerun.load(
        str(folder), bits=8, device="cpu", dtype="float32", expert_slots=n_experts("qwen3_moe") - 1, prefetch=False
    )
    model.generate("warm up", max_new_tokens=8, ignore_eos=True)
    model.reset_stats()
    out = model.generate("warm up", max_new_tokens=8, ignore_eos=True)
    total = model.stats["total"]
    assert total["hits"] > total["misses"]  # 5 of 6 experts resident: most uses hit
    assert len(out.token_ids) == 8


@pytest.mark.parametrize("bits,max_rel,min_top1", [(8, 0.10, 0.9), (4, 0.45, 0.5)])
def test_quantization_error_against_16_bit(checkpoint, bits, max_rel, min_top1):
    # Measured on these fixtures: 8-bit 0.4-6 %, 4-bit 7-30 %: a flipped routing decision
    # compounds through the layers, most in Mixtral's all-MoE fixture. A nibble-swapped
    # NF4 gives 57-121 %. The per-weight bounds above are the tight check.
    _, folder = checkpoint
    reference = moerun.load(str(folder), device="cpu", dtype="float32").logits(IDS)
    got = moerun.load(str(folder), bits=bits, device="cpu", dtype="float32").logits(IDS)
    assert rel_err(got, reference) < max_rel
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() >= min_top1


# -- the on-disk quantized cache ---------------------------------------------------------


def test_second_load_does_not_requantize(tmp_path, monkeypatch):
    folder = make_checkpoint(tmp_path / "m", "mixtral", shards=1)
    first = moerun.load(str(folder), bits=4, device="cpu", dtype="float32")
    assert first.offload_info["cache_built"] is True
    manifest = json.load(open(os.path.join(first.offload_info["quantized_cache"], "manifest.json")))
    assert manifest["bits"] == 4 and manifest["moerun_version"] == moerun.__version__
    assert set(manifest["layers"]) == {"0", "1", "2"}

    def no_quantizing(*a, **k):
        raise AssertionError("quantized again")

    monkeypatch.setattr(ExpertFormat, "pack", no_quantizing)
    second = moerun.load(str(folder), bits=4, device="cpu", dtype="float32")
    assert second.offload_info["cache_built"] is False
    # The same files mapped again (the same offsets, so the same alignment) and the same
    # kernels: the same bits.
    assert torch.equal(second.logits(IDS), first.logits(IDS))


def test_corrupt_or_stale_cache_is_rebuilt(tmp_path):
    folder = make_checkpoint(tmp_path / "m", "qwen3_moe", shards=1)
    path = moerun.load(str(folder), bits=8, device="cpu", dtype="float32").offload_info["quantized_cache"]
    layer = os.path.join(path, "layer-001.safetensors")
    with open(layer, "r+b") as f:  # truncate a layer file
        f.truncate(os.path.getsize(layer) // 2)
    again = moerun.load(str(folder), bits=8, device="cpu", dtype="float32")
    assert again.offload_info["cache_built"] is True and again.offload_info["quantized_cache"] == path

    manifest = json.load(open(os.path.join(path, "manifest.json")))
    manifest["format_version"] = -1  # a cache written by an older format
    json.dump(manifest, open(os.path.join(path, "manifest.json"), "w"))
    assert moerun.load(str(folder), bits=8, device="cpu", dtype="float32").offload_info["cache_built"] is True

    # A new revision of the checkpoint (same shapes, other values) gets its own cache.
    make_checkpoint(tmp_path / "m", "qwen3_moe", shards=1, seed=1)
    newer = moerun.load(str(folder), bits=8, device="cpu", dtype="float32")
    assert newer.offload_info["cache_built"] is True and newer.offload_info["quantized_cache"] != path


def test_killed_build_leaves_nothing_trusted(tmp_path):
    folder = make_checkpoint(tmp_path / "m", "mixtral", shards=1)
    cache = tmp_path / "moerun-cache"
    # Kill the process with SIGKILL right after it has written the first layer file.
    script = (
        "import os, signal, moerun, moerun.moe.store as s\n"
        "real = s.save_file\n"
        "def save_then_die(*a, **k):\n"
        "    real(*a, **k); os.kill(os.getpid(), signal.SIGKILL)\n"
        "s.save_file = save_then_die\n"
        f"moerun.load({str(folder)!r}, bits=4, device='cpu', dtype='float32')\n"
    )
    env = {**os.environ, "MOERUN_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p for p in (cache / "experts").iterdir() if not p.name.endswith(".lock")]
    assert leftovers and all(p.name.startswith(".") and ".tmp-" in p.name for p in leftovers)
    assert not any((p / "manifest.json").exists() for p in leftovers)
    model = moerun.load(str(folder), bits=4, device="cpu", dtype="float32")
    assert model.offload_info["cache_built"] is True
    # The dead builder's lock is free, so its temporary folder went at once (not after an hour).
    assert not any(p.exists() for p in leftovers)
    assert [p.name for p in (cache / "experts").iterdir() if not p.name.startswith(".")] == [
        os.path.basename(model.offload_info["quantized_cache"])
    ]


# -- the planner -------------------------------------------------------------------------


def device_bytes(model) -> int:
    """Bytes of tensors the model holds on its compute device: weights, slots, KV cache."""
    seen, total = set(), 0
    for p in model.lm.parameters():
        if p.device.type != "meta" and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    for _, _, m in routed_expert_modules(model.lm):
        if isinstance(m, CachedExperts):
            total += m.residency.resident_bytes()
    total += sum(c.k.numel() * c.k.element_size() * 2 for c in model.kv_caches)
    return total


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_planner_prediction_matches_allocation(checkpoint, bits):
    _, folder = checkpoint
    full = moerun.load(str(folder), bits=bits, device="cpu", dtype="float32", ctx=256)
    assert full.plan.verdict == "ram"  # on the CPU: everything in RAM
    assert abs(device_bytes(full) - full.plan.gpu_bytes) <= 0.05 * full.plan.gpu_bytes
    # A budget between "one slot" and "everything" gives an offload plan that fits it.
    p = full.plan
    budget = p.non_expert_bytes + p.kv_cache_bytes + 2 * p.expert_blob_bytes * p.n_moe_layers + 100
    model = moerun.load(str(folder), bits=bits, device="cpu", dtype="float32", ctx=256, vram=budget)
    assert model.plan.verdict == "offload" and model.plan.expert_slots_per_layer == 2
    assert device_bytes(model) <= budget
    assert abs(device_bytes(model) - model.plan.gpu_bytes) <= 0.05 * model.plan.gpu_bytes


def test_model_that_cannot_fit_is_refused_with_numbers(checkpoint):
    _, folder = checkpoint
    with pytest.raises(MoerunError, match=r"does not fit: needs at least .* the budget is"):
        moerun.load(str(folder), bits=4, device="cpu", dtype="float32", vram="10KB")
    with pytest.raises(MoerunError, match="RAM"):
        moerun.load(str(folder), bits=4, device="cpu", dtype="float32", expert_slots=1, ram="1KB")


def test_bad_options_are_refused(checkpoint):
    _, folder = checkpoint
    for kwargs, message in (
        (dict(bits=3), "bits must be 4, 8 or 16"),
        (dict(expert_slots=99), "expert_slots must be between 1 and"),
        (dict(vram="twelve gigs"), "cannot read size"),
        (dict(bits=4, cold="disk"), "cold must be one of"),
    ):
        with pytest.raises(MoerunError, match=message):
            moerun.load(str(folder), device="cpu", dtype="float32", **kwargs)


# -- expert variants: biases, gpt-oss' clamped SwiGLU, Llama 4's weights on the input ---


@pytest.mark.parametrize("act", [SILU, ExpertActivation("swiglu_clamped", alpha=1.702, limit=0.5)])
@pytest.mark.parametrize("weights_on_input", [False, True])
def test_cached_expert_variants_equal_routed_experts(act, weights_on_input):
    g = torch.Generator().manual_seed(0)
    E, D, I, N, K = 5, 64, 48, 9, 2
    routed = RoutedExperts(E, D, I, bias=True, act=act, weights_on_input=weights_on_input)
    with torch.no_grad():
        for p in routed.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(N, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    weights = torch.rand(N, K, generator=g)
    expected = routed(x, ids, weights)
    for bits in (16, 8, 4):
        fmt = ExpertFormat(bits, D, I, torch.float32, bias=True)
        store = torch.stack([fmt.pack(routed.w13[e], routed.w2[e], routed.b13[e], routed.b2[e]) for e in range(E)])
        full = CachedExperts(
            fmt, store, E, torch.device("cpu"), torch.float32, act=act, weights_on_input=weights_on_input
        )
        one = CachedExperts(
            fmt, store.clone(), 1, torch.device("cpu"), torch.float32, act=act, weights_on_input=weights_on_input
        )
        got_full, got_one = full(x, ids, weights), one(x, ids, weights)
        assert rel_err(got_one, got_full) < 1e-6
        assert rel_err(got_full, expected) < {16: 1e-6, 8: 0.03, 4: 0.3}[bits]


@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_cache_through_triton_kernels_equals_torch_path(mode, bits):
    # The kernels run under TRITON_INTERPRET=1 here (tests/conftest.py); on a GPU they compile.
    pytest.importorskip("triton")
    from moerun import kernels

    if not kernels.available("cpu"):
        pytest.skip("triton interpreter not enabled")
    g = torch.Generator().manual_seed(1)
    E, D, I, K = 4, 64, 32, 2
    N = 3 if mode == "decode" else 9
    fmt = ExpertFormat(bits, D, I, torch.float32)
    store = torch.stack(
        [fmt.pack(torch.randn(2 * I, D, generator=g) * 0.2, torch.randn(D, I, generator=g) * 0.2) for _ in range(E)]
    )
    x = torch.randn(N, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    weights = torch.rand(N, K, generator=g)
    expected = CachedExperts(fmt, store, E, torch.device("cpu"), torch.float32, kernel_mode="torch")(x, ids, weights)
    for slots in (E, 2, 1):
        module = CachedExperts(fmt, store.clone(), slots, torch.device("cpu"), torch.float32, kernel_mode=mode)
        got = module(x, ids, weights)
        assert not torch.isnan(got).any()
        assert rel_err(got, expected) < 1e-5, slots
        if slots < E:
            assert module.residency.stats.misses > 0


@pytest.mark.parametrize("shape", [(512, 4096), (4096, 768)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bitsandbytes_cpu_dequantizer_equals_the_torch_path(shape, dtype):
    # Large matrices on the CPU are dequantized by bitsandbytes' C++ kernel: it must give
    # the very bytes the torch path gives.
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    packed, absmax = nf4.quantize(w)
    fast = nf4.dequantize_bitsandbytes(packed, absmax, shape, dtype)
    assert fast is not None
    reference = nf4.dequantize(packed, absmax, (1, *shape), dtype).view(shape)  # 3 dims: always the torch path
    assert torch.equal(fast, reference)
    assert (
        nf4.dequantize_bitsandbytes(packed[: 7 * 48 // 2], absmax[:6], (7, 48), dtype) is None
    )  # rows not whole blocks


def test_auto_calibrates_each_expert_format_and_decides_by_token_count(tmp_path):
    # Auto measures the copy and the CPU compute on this machine, per expert format; a
    # policy then computes on the CPU exactly up to the token count it reports.
    folder = make_checkpoint(tmp_path, "qwen3_moe", dtype=torch.float32, shards=1)
    model = moerun.load(str(folder), bits=4, device="cpu", dtype="float32", expert_slots=1, cold="auto")
    policies = model.offload_info["cold_policy"]
    assert len(policies) == 1  # every layer has the same expert shape: one calibration
    (measured,) = policies.values()
    assert measured["copy_seconds"] > 0 and measured["cpu_fixed_seconds"] + measured["cpu_token_seconds"] > 0
    policy = ColdPolicy("auto", measured["copy_seconds"], measured["cpu_fixed_seconds"], measured["cpu_token_seconds"])
    limit = measured["cpu_up_to_tokens"]
    assert limit == policy.cpu_up_to_tokens()
    if 0 < limit < 1 << 20:
        assert policy.on_cpu(limit) and not policy.on_cpu(limit + 1)
    elif limit == 0:
        assert not policy.on_cpu(1)
    # All resident: nothing is cold, nothing to calibrate.
    resident = moerun.load(str(folder), bits=4, device="cpu", dtype="float32", cold="auto")
    assert "cold_policy" not in resident.offload_info


def test_cold_policy_token_limit():
    policy = ColdPolicy("auto", copy_seconds=4e-3, cpu_fixed_seconds=1e-3, cpu_token_seconds=1e-3)
    assert policy.cpu_up_to_tokens() == 2 and policy.on_cpu(2) and not policy.on_cpu(3)
    assert ColdPolicy("auto", 1e-3, 2e-3, 1e-3).cpu_up_to_tokens() == 0


@pytest.mark.parametrize("bits", [16, 4])
def test_a_timing_decides_where_not_what(tmp_path, monkeypatch, bits):
    """`--cold auto` decides from a timing taken at load; whatever it measured, the
    numbers that come out are the resident model's within float rounding (the same
    kernels over the same bytes; only the order in which experts' outputs are summed
    may differ). A slow CPU (every miss copied) and a fast one (every miss computed
    where it lies), prompt and decode steps."""
    import moerun.moe.offload as offload

    folder = make_checkpoint(tmp_path / "m", "qwen3_moe", dtype=torch.float32, shards=1, num_experts_per_tok=3)
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(7))
    resident = moerun.load(str(folder), bits=bits, device="cpu", dtype="float32")
    expected = resident.logits(ids)
    expected_tokens = resident.generate("The quick brown fox", max_new_tokens=12, ignore_eos=True).token_ids

    def calibrated(copy_seconds, cpu_fixed_seconds, cpu_token_seconds):
        def fake(policy, module, repeats=3):
            policy.copy_seconds, policy.cpu_fixed_seconds = copy_seconds, cpu_fixed_seconds
            policy.cpu_token_seconds = cpu_token_seconds

        return fake

    for name, timing, on_cpu in (("slow cpu", (1e-3, 1.0, 1.0), False), ("fast cpu", (1.0, 1e-6, 1e-9), True)):
        monkeypatch.setattr(offload, "calibrate", calibrated(*timing))
        model = moerun.load(str(folder), bits=bits, device="cpu", dtype="float32", expert_slots=1, cold="auto")
        assert rel_err(model.logits(ids), expected) < 1e-6, name
        assert model.generate("The quick brown fox", max_new_tokens=12, ignore_eos=True).token_ids == expected_tokens
        total = model.stats["total"]
        assert total["misses"] > 0 and (total["cpu_experts"] > 0) == on_cpu, (name, total)
