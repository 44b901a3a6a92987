"""The C CPU kernels (moerun/kernels/cpu.c) against plain-torch references on fresh random
inputs: every instruction-set path this CPU can run, every format, fast-path and odd
shapes, one and several tokens per expert, float32 and bf16 activations."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from moerun.kernels import cpu_experts
from moerun.kernels.cpu_linear import CpuLinear, linear, project, use_cpu_linears
from moerun.kernels.reference import fused_experts_reference
from moerun.moe.experts import ExpertActivation, RoutedExperts
from moerun.quant.format import ExpertFormat
from tests.parity import rel_err


def test_the_extension_is_built_where_ci_runs():
    """CI (Linux x86-64 with gcc) must build it: the slow fallback would hide a broken build."""
    if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
        assert cpu_experts.available()
        assert cpu_experts.isa() in ("avx2", "avx512", "avx512bf16")
    else:
        pytest.skip("the build is only required on Linux x86-64")


def make_layer(bits, D, I, E, gen, wdtype=torch.bfloat16, bias=False):
    fmt = ExpertFormat(bits, D, I, wdtype, bias=bias)
    blobs = torch.stack(
        [
            fmt.pack(
                torch.randn(2 * I, D, generator=gen) * 0.05,
                torch.randn(D, I, generator=gen) * 0.05,
                torch.randn(2 * I, generator=gen) * 0.1 if bias else None,
                torch.randn(D, generator=gen) * 0.1 if bias else None,
            )
            for _ in range(E)
        ]
    )
    return fmt, blobs


def make_inputs(N, K, D, E, gen, dtype=torch.float32):
    x = torch.randn(N, D, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(N)])
    weights = torch.rand(N, K, generator=gen)
    return x, ids, weights


# (D, I): rows of whole 128-groups (every fast path), of whole 64-blocks only (AVX-512
# NF4 pairs, AVX2 words), and shapes whose NF4 blocks straddle rows (the scalar path).
SHAPES = [(256, 128), (192, 320), (64, 96), (70, 33)]


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("D,I", SHAPES)
@pytest.mark.parametrize("N", [1, 3, 11])
def test_moe_layer_equals_dequantize_then_matmul(isa, bits, D, I, N):
    gen = torch.Generator().manual_seed(hash((isa, bits, D, I, N)) % 2**31)
    E, K = 6, 2
    fmt, blobs = make_layer(bits, D, I, E, gen)
    x, ids, weights = make_inputs(N, K, D, E, gen)
    out, used = cpu_experts.moe_experts(x, ids, weights, cpu_experts.blob_table(blobs, fmt), fmt)
    expected = fused_experts_reference(x, ids, weights, blobs, fmt, torch.float32)
    assert rel_err(out, expected) < 1e-5
    assert used == ids.unique().numel()


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("D,I", [(256, 384), *SHAPES[1:]])
@pytest.mark.parametrize("N", [1, 5])
def test_bf16_activations_are_no_less_accurate_than_a_bf16_matmul(isa, bits, D, I, N):
    """bf16 models: the kernels take bf16 activations (the bf16 dot-product path where the
    CPU has one); measured against the float32 truth, they err no more than torch's own
    dequantize-to-bf16-then-matmul does."""
    gen = torch.Generator().manual_seed(7 + bits + N + D + I)
    E, K = 5, 2
    fmt, blobs = make_layer(bits, D, I, E, gen)
    x, ids, weights = make_inputs(N, K, D, E, gen, torch.bfloat16)
    out, _ = cpu_experts.moe_experts(x, ids, weights, cpu_experts.blob_table(blobs, fmt), fmt, out_dtype=torch.float32)
    truth = fused_experts_reference(x.float(), ids, weights, blobs, fmt, torch.float32)
    torch_bf16 = fused_experts_reference(x, ids, weights, blobs, fmt, torch.bfloat16).float()
    assert rel_err(out, truth) <= 1.5 * rel_err(torch_bf16, truth) + 1e-6


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("variant", ["bias+swiglu_clamped", "weights_on_input+bias"])
def test_biases_activations_and_input_weights(isa, bits, wdtype, variant):
    gen = torch.Generator().manual_seed(11 + bits)
    E, K, N, D, I = 4, 2, 7, 128, 256
    fmt, blobs = make_layer(bits, D, I, E, gen, wdtype, bias=True)
    act = ExpertActivation("swiglu_clamped", alpha=1.702, limit=0.05) if "swiglu" in variant else None
    on_input = "weights_on_input" in variant
    x, ids, weights = make_inputs(N, K, D, E, gen)
    table = cpu_experts.blob_table(blobs, fmt)
    out, _ = cpu_experts.moe_experts(x, ids, weights, table, fmt, act, on_input)
    expected = fused_experts_reference(x, ids, weights, blobs, fmt, torch.float32, act, on_input)
    assert rel_err(out, expected) < 1e-5


def test_experts_absent_from_the_table_are_skipped():
    gen = torch.Generator().manual_seed(3)
    E, K, N, D, I = 6, 2, 9, 128, 128
    fmt, blobs = make_layer(4, D, I, E, gen)
    x, ids, weights = make_inputs(N, K, D, E, gen)
    table = cpu_experts.blob_table(blobs, fmt)
    present = torch.tensor([True, False, True, True, False, True])
    table[~present] = 0
    out, used = cpu_experts.moe_experts(x, ids, weights, table, fmt)
    expected = fused_experts_reference(x, ids, weights * present[ids], blobs, fmt, torch.float32)
    assert rel_err(out, expected) < 1e-5
    assert used == sum(int(e) in {0, 2, 3, 5} for e in ids.unique())


def test_a_bad_expert_id_is_an_error_not_a_crash():
    gen = torch.Generator().manual_seed(4)
    fmt, blobs = make_layer(8, 64, 64, 3, gen)
    x, ids, weights = make_inputs(2, 2, 64, 3, gen)
    ids[1, 1] = 3
    with pytest.raises(ValueError, match="outside"):
        cpu_experts.moe_experts(x, ids, weights, cpu_experts.blob_table(blobs, fmt), fmt)


def test_a_store_whose_experts_share_one_blob():
    """bench's synthetic stores view one blob per layer (row stride 0)."""
    gen = torch.Generator().manual_seed(5)
    fmt, blobs = make_layer(4, 128, 128, 1, gen)
    store = blobs.expand(4, -1)
    x, ids, weights = make_inputs(3, 2, 128, 4, gen)
    out, _ = cpu_experts.moe_experts(x, ids, weights, cpu_experts.blob_table(store, fmt), fmt)
    assert rel_err(out, fused_experts_reference(x, ids, weights, store, fmt, torch.float32)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 2, 7])
def test_routed_experts_on_the_cpu_kernels_equal_the_loop(dtype, N):
    gen = torch.Generator().manual_seed(6 + N)
    E, K, D, I = 8, 2, 128, 256
    experts = RoutedExperts(E, D, I, bias=True)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    experts = experts.to(dtype)
    x, ids, weights = make_inputs(N, K, D, E, gen, dtype)
    with torch.inference_mode():
        assert experts._on_cpu_kernels(ids)
        got = experts(x, ids, weights).float()
        loop = experts._forward(x, ids, weights).float()
        truth = experts.float()._forward(x.float(), ids, weights)
    assert rel_err(got, truth) <= max(1.5 * rel_err(loop, truth), 1e-5)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 5])
@pytest.mark.parametrize("K", [256, 100])
def test_dense_linear_equals_f_linear(isa, wdtype, M, K):
    gen = torch.Generator().manual_seed(M * K)
    N = 96
    w = (torch.randn(N, K, generator=gen) * 0.05).to(wdtype)
    b = (torch.randn(N, generator=gen) * 0.1).to(wdtype)
    x = torch.randn(M, K, generator=gen).to(wdtype)
    truth = F.linear(x.float(), w.float(), b.float())
    got = linear(x, w, b).float()
    # float32 accumulation of the stored values: only the output's rounding to its dtype
    limit = 1e-5 if wdtype == torch.float32 else 4e-3
    assert rel_err(got, truth) < limit
    assert rel_err(linear(x, w).float(), F.linear(x.float(), w.float())) < limit


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_projections_of_one_input_in_one_call(isa, wdtype, xdtype, M, threads):
    """q/k/v-like matrices of different heights (odd ones too, so a thread's range starts
    and ends inside a matrix and mid-way through a group of 4 rows), with and without
    biases, in one C call: each output equals its own F.linear; float32 activations over
    16-bit weights too (the matrices at rest of a CPU without native bf16)."""
    gen = torch.Generator().manual_seed(M * 7 + threads)
    K = 160
    layers = [torch.nn.Linear(K, n, bias=bias) for n, bias in ((96, True), (37, False), (37, True), (5, False))]
    with torch.no_grad():
        for m in layers:
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.05)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    layers = [m.to(wdtype) for m in layers]
    x = torch.randn(1, M, K, generator=gen).to(xdtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            got = project(x, *layers)
    finally:
        torch.set_num_threads(before)
    limit = 1e-5 if xdtype == torch.float32 else 4e-3  # only the output's rounding to its dtype
    for m, out in zip(layers, got):
        bias = m.bias.float() if m.bias is not None else None
        assert out.shape == (1, M, m.weight.shape[0]) and out.dtype == xdtype
        assert rel_err(out.float(), F.linear(x.float(), m.weight.float(), bias)) < limit


def test_projections_fall_back_per_layer_when_one_cannot_run_in_c():
    gen = torch.Generator().manual_seed(3)
    layers = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(64, 16).to(torch.bfloat16))
    use_cpu_linears(layers)
    a, b = layers  # two weight dtypes: not one call, each its own CpuLinear
    for x in (torch.randn(2, 64, generator=gen), torch.randn(9, 64, generator=gen)):  # C kernel, then torch
        with torch.inference_mode():
            got = project(x, a, b)
        assert rel_err(got[0], F.linear(x, a.weight, a.bias)) < 1e-5
        assert rel_err(got[1], F.linear(x, b.weight.float(), b.bias.float())) < 1e-5


def test_cpu_linears_swap_in_place_and_keep_results():
    gen = torch.Generator().manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8, bias=False))
    x = torch.randn(3, 64, generator=gen)
    with torch.inference_mode():
        before = model(x)
        weight = model[0].weight
        assert use_cpu_linears(model) == 2
        assert isinstance(model[0], CpuLinear) and model[0].weight is weight
        assert rel_err(model(x), before) < 1e-5  # 3 tokens: the C kernel
        long = torch.randn(40, 64, generator=gen)
        assert (
            rel_err(
                model(long),
                torch.nn.functional.linear(
                    torch.relu(torch.nn.functional.linear(long, weight, model[0].bias)), model[2].weight
                ),
            )
            < 1e-6
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,Hk,T,S,Dh,Dv", [(32, 4, 1, 300, 128, 128), (16, 16, 2, 37, 192, 128), (8, 2, 3, 5, 64, 80)])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_equals_sdpa(isa, dtype, H, Hk, T, S, Dh, Dv, masked):
    """Strided inputs as the model passes them: q transposed from [B, T, H, Dh], k and v
    a prefix of a longer cache."""
    from moerun.kernels.cpu_attention import attention, usable

    gen = torch.Generator().manual_seed(H * S + T)
    q = torch.randn(1, T, H, Dh, generator=gen).to(dtype).transpose(1, 2)
    k = torch.randn(1, Hk, S + 7, Dh, generator=gen).to(dtype)[:, :, :S]
    v = torch.randn(1, Hk, S + 7, Dv, generator=gen).to(dtype)[:, :, :S]
    mask = torch.rand(T, S, generator=gen) > 0.3 if masked else None
    if mask is not None:
        mask[:, 0] = True  # every query sees a key
    assert usable(q, k, v)
    truth = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, scale=Dh**-0.5, enable_gqa=H != Hk
    )
    got = attention(q, k, v, mask, Dh**-0.5)
    assert got.dtype == dtype
    assert rel_err(got.float(), truth) < (1e-5 if dtype == torch.float32 else 4e-3)
