"""CPU experts with many tokens in a call (prompts): dequantized tiles multiplied by torch's
GEMM (moerun/kernels/cpu_experts.py, `dequant_rows` in cpu.c) against plain-torch
references on fresh random inputs: every format and instruction-set path this CPU can run,
odd shapes and tile sizes, biases, both activations, weights on the input or the output,
and calls that mix experts above and below the tiling threshold."""

from __future__ import annotations

import pytest
import torch

from moerun.kernels import cpu_experts
from moerun.kernels.reference import fused_experts_reference
from moerun.moe.experts import ExpertActivation
from tests.parity import rel_err
from tests.test_cpu_kernels import make_layer

pytestmark = pytest.mark.skipif(not cpu_experts.available(), reason="the C extension is not built")

G = cpu_experts.TILED_MIN_TOKENS
FORMATS = [(4, torch.bfloat16), (8, torch.bfloat16), (16, torch.bfloat16), (16, torch.float16), (16, torch.float32)]


@pytest.fixture
def tiled_calls(monkeypatch):
    """Counts the experts computed by tiles, so a test knows the path it meant was taken."""
    calls = []
    real = cpu_experts._expert_by_tiles

    def spy(xe, *args):
        calls.append(xe.shape[0])
        return real(xe, *args)

    monkeypatch.setattr(cpu_experts, "_expert_by_tiles", spy)
    return calls


def routed(N, K, E, crowded, gen):
    """ids [N, K], weights [N, K]: every token picks the `crowded` experts (so each has N
    tokens, above the threshold) and K - len(crowded) of the rest at random (few each)."""
    rest = torch.tensor([e for e in range(E) if e not in crowded])
    picks = [rest[torch.randperm(rest.numel(), generator=gen)[: K - len(crowded)]] for _ in range(N)]
    ids = torch.stack([torch.cat([torch.tensor(crowded), p]) for p in picks])
    ids = torch.stack([row[torch.randperm(K, generator=gen)] for row in ids])  # any column order
    return ids, torch.rand(N, K, generator=gen)


@pytest.mark.parametrize("bits,wdtype", FORMATS)
@pytest.mark.parametrize("D,I", [(256, 128), (192, 320), (70, 33)])
def test_dequant_rows_equals_the_formats_unpack(isa, bits, wdtype, D, I):
    """Exactly the float32 values `ExpertFormat.unpack` gives, for row ranges that start and
    end anywhere (NF4 blocks straddling rows and tiles, rows not whole vectors)."""
    gen = torch.Generator().manual_seed(hash((isa, bits, str(wdtype), D, I)) % 2**31)
    fmt, blobs = make_layer(bits, D, I, 1, gen, wdtype, bias=True)
    w13, w2, b13, b2 = fmt.unpack(blobs[0], torch.float32)
    row = cpu_experts.blob_table(blobs, fmt)[0].tolist()
    lib, code = cpu_experts._lib(), cpu_experts._DTYPE_CODES[wdtype]
    for w, addr, scale in ((w13, row[0], row[1]), (w2, row[2], row[3])):
        rows, cols = w.shape
        for r0, r1 in ((0, rows), (1, rows - 2), (rows // 3, rows // 3 + 1), (5, 7 + rows // 2)):
            got = torch.full((r1 - r0, cols), float("nan"))
            lib.dequant_rows(addr, scale, bits, code, cols, r0, r1, got.data_ptr(), 2)
            assert torch.equal(got, w[r0:r1])
    for b, addr in ((b13, row[4]), (b2, row[5])):
        got = torch.empty(b.numel())
        lib.dequant_rows(addr, 0, 16, code, b.numel(), 0, 1, got.data_ptr(), 1)
        assert torch.equal(got, b)


@pytest.mark.parametrize("bits,wdtype", FORMATS)
@pytest.mark.parametrize("variant", ["plain", "bias+swiglu_clamped", "weights_on_input+bias"])
@pytest.mark.parametrize("D,I,tile_rows", [(256, 128, 48), (192, 320, 100), (70, 33, 7)])
def test_tiled_experts_equal_dequantize_then_matmul(
    isa, monkeypatch, tiled_calls, bits, wdtype, variant, D, I, tile_rows
):
    """Two experts above the threshold (tiled), the others below it (the C kernel) in one
    call; tiles of a few rows, so that neither 2I nor D is a whole number of tiles."""
    monkeypatch.setattr(cpu_experts, "TILE_VALUES", tile_rows * max(D, I))
    gen = torch.Generator().manual_seed(hash((isa, bits, str(wdtype), variant, D, I)) % 2**31)
    E, K, N = 7, 3, G + 5
    bias = "bias" in variant
    fmt, blobs = make_layer(bits, D, I, E, gen, wdtype, bias=bias)
    act = ExpertActivation("swiglu_clamped", alpha=1.702, limit=0.05) if "swiglu" in variant else None
    on_input = "weights_on_input" in variant
    x = torch.randn(N, D, generator=gen)
    ids, weights = routed(N, K, E, [2, 5], gen)
    out, used = cpu_experts.moe_experts(x, ids, weights, cpu_experts.blob_table(blobs, fmt), fmt, act, on_input)
    expected = fused_experts_reference(x, ids, weights, blobs, fmt, torch.float32, act, on_input)
    assert rel_err(out, expected) < 1e-5
    assert used == ids.unique().numel()
    assert tiled_calls == [N, N]  # experts 2 and 5, the others by the C kernel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_activations_are_computed_in_float32(tiled_calls, dtype):
    gen = torch.Generator().manual_seed(3)
    E, K, N, D, I = 4, 2, 2 * G, 128, 96
    fmt, blobs = make_layer(4, D, I, E, gen)
    x = torch.randn(N, D, generator=gen).to(dtype)
    ids, weights = routed(N, K, E, [1], gen)
    out, _ = cpu_experts.moe_experts(x, ids, weights, cpu_experts.blob_table(blobs, fmt), fmt, out_dtype=torch.float32)
    expected = fused_experts_reference(x.float(), ids, weights, blobs, fmt, torch.float32)
    assert rel_err(out, expected) < 1e-5
    assert tiled_calls == [N]


def test_crowded_experts_absent_from_the_table_are_skipped(tiled_calls):
    gen = torch.Generator().manual_seed(4)
    E, K, N, D, I = 5, 2, G + 1, 64, 96
    fmt, blobs = make_layer(8, D, I, E, gen)
    ids, weights = routed(N, K, E, [0], gen)
    x = torch.randn(N, D, generator=gen)
    table = cpu_experts.blob_table(blobs, fmt)
    table[0] = 0  # the crowded expert is elsewhere (on the GPU)
    out, used = cpu_experts.moe_experts(x, ids, weights, table, fmt)
    expected = fused_experts_reference(x, ids, weights * (ids != 0), blobs, fmt, torch.float32)
    assert rel_err(out, expected) < 1e-5
    assert used == ids[ids != 0].unique().numel()
    assert tiled_calls == []


def test_a_bad_expert_id_in_a_long_prompt_is_an_error():
    gen = torch.Generator().manual_seed(5)
    fmt, blobs = make_layer(4, 64, 64, 3, gen)
    ids = torch.zeros(G, 2, dtype=torch.int64)
    ids[3, 1] = 3
    with pytest.raises(ValueError, match="expert id"):
        cpu_experts.moe_experts(torch.randn(G, 64), ids, torch.rand(G, 2), cpu_experts.blob_table(blobs, fmt), fmt)
