"""Every kernel against its plain-torch reference on fresh random inputs.

On the CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py): tiny shapes,
including row lengths that are not multiples of the 64-value NF4 block (blocks then span
rows) and odd ones (rows start mid-byte). On a GPU the same tests compile for real, and
the `gpu` class adds Mixtral's and Qwen3-MoE's expert shapes. Outputs and intermediates
are poisoned with NaN before every launch; a NaN fails.

Shape legend: N tokens, K experts per token, S slots, D hidden, I expert intermediate.
"""

import dataclasses
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from moerun.kernels import fused_experts, fused_experts_reference, route  # noqa: E402
from moerun.kernels import layout as kernel_layout  # noqa: E402
from moerun.kernels.configs import get_config  # noqa: E402
from moerun.kernels.routing_ref import route_reference  # noqa: E402
from moerun.quant.format import ExpertFormat  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

SHAPES = [
    (96, 80),
    (64, 32),
    (33, 17),
    (64, 36),
]  # (D, I): blocks across rows; odd rows (mid-byte starts); w13 in words, w2 in pairs
HAS_BIAS_FORMAT = any(f.name == "bias" for f in dataclasses.fields(ExpertFormat))


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(kernel_layout, "POISON", True)


@dataclasses.dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss' activation, duck-typed as the kernels read it (.kind, .alpha, .limit)."""

    kind: str = "swiglu_clamped"
    alpha: float = 1.702
    limit: float = 7.0

    def __call__(self, gate, up):
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return gate * torch.sigmoid(gate * self.alpha) * (up + 1)


def make_slots(fmt: ExpertFormat, n_slots: int, gen: torch.Generator, device=DEVICE) -> torch.Tensor:
    """uint8 [S, blob_bytes]: S random experts packed in `fmt` (weights ~ 1/sqrt(fan-in))."""
    D, I = fmt.hidden_size, fmt.intermediate_size
    blobs = []
    for _ in range(n_slots):
        w13 = torch.randn(2 * I, D, generator=gen) / D**0.5
        w2 = torch.randn(D, I, generator=gen) / I**0.5
        if fmt.bias if HAS_BIAS_FORMAT else False:
            blobs.append(
                fmt.pack(w13, w2, torch.randn(2 * I, generator=gen) * 0.1, torch.randn(D, generator=gen) * 0.1)
            )
        else:
            blobs.append(fmt.pack(w13, w2))
    return torch.stack(blobs).to(device)


def make_inputs(N: int, K: int, D: int, S: int, gen: torch.Generator, dtype=torch.float32):
    x = torch.randn(N, D, generator=gen).to(DEVICE, dtype)
    ids = torch.stack([torch.randperm(S, generator=gen)[:K] for _ in range(N)]).to(DEVICE)
    weights = torch.softmax(torch.randn(N, K, generator=gen), -1).to(DEVICE)
    return x, ids, weights


def check(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    assert not torch.isnan(out).any(), "NaN in the output (an element was never written)"
    scale = ref.float().abs().max().clamp_min(1e-6)
    err = (out.float() - ref.float()).abs().max() / scale
    assert err <= rtol, f"max error {err:.3g} of the output scale > {rtol}"


@pytest.mark.parametrize("D,I", SHAPES)
@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("mode,N", [("decode", 1), ("decode", 2), ("decode", 5), ("prefill", 7), ("prefill", 33)])
def test_fused_experts_matches_reference(D, I, bits, mode, N):
    gen = torch.Generator().manual_seed(hash((D, I, bits, mode, N)) % 2**31)
    fmt = ExpertFormat(bits, D, I, torch.float32)
    S, K = 5, 2
    slots = make_slots(fmt, S, gen)
    x, ids, weights = make_inputs(N, K, D, S, gen)
    out = fused_experts(x, ids, weights, slots, fmt, mode=mode)
    assert out.shape == (N, D) and out.dtype == x.dtype
    check(out, fused_experts_reference(x, ids, weights, slots, fmt), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode,N", [("decode", 3), ("prefill", 33)])
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_fused_experts_half_precision(bits, mode, N, dtype):
    # 16-bit activations and storage: kernels accumulate in float32, the reference rounds
    # every intermediate to 16 bits, so compare with the float32 reference.
    gen = torch.Generator().manual_seed(bits * 100 + N)
    D, I, S, K = 64, 48, 4, 2
    fmt = ExpertFormat(bits, D, I, dtype)
    slots = make_slots(fmt, S, gen)
    x, ids, weights = make_inputs(N, K, D, S, gen, dtype)
    out = fused_experts(x, ids, weights, slots, fmt, dtype, mode=mode)
    assert out.dtype == dtype
    check(out, fused_experts_reference(x.float(), ids, weights, slots, fmt, torch.float32), 2e-2)


@pytest.mark.skipif(not HAS_BIAS_FORMAT, reason="ExpertFormat has no bias sections")
@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("bits", [4, 8])
def test_bias_clamped_swiglu_weights_on_input(bits, mode):
    gen = torch.Generator().manual_seed(7 + bits)
    D, I, S, K, N = 64, 40, 4, 2, 5
    fmt = ExpertFormat(bits, D, I, torch.float32, bias=True)
    slots = make_slots(fmt, S, gen)
    x, ids, weights = make_inputs(N, K, D, S, gen)
    x = x * 4  # reach the clamp
    for act, on_input in ((ClampedSwiGLU(), False), (None, True)):
        out = fused_experts(x, ids, weights, slots, fmt, act=act, weights_on_input=on_input, mode=mode)
        ref = fused_experts_reference(x, ids, weights, slots, fmt, act=act, weights_on_input=on_input)
        check(out, ref, 1e-5)


def test_slot_ids_index_slots_not_experts():
    # A slot buffer holding experts in a scrambled order: the kernels follow slot ids only.
    gen = torch.Generator().manual_seed(3)
    fmt = ExpertFormat(4, 64, 32, torch.float32)
    slots = make_slots(fmt, 6, gen)
    x, ids, weights = make_inputs(4, 2, 64, 6, gen)
    perm = torch.randperm(6, generator=gen).to(DEVICE)
    moved = torch.empty_like(slots)
    moved[perm] = slots
    ref = fused_experts_reference(x, ids, weights, slots, fmt)
    for mode in ("decode", "prefill"):
        check(fused_experts(x, perm[ids], weights, moved, fmt, mode=mode), ref, 1e-5)


@pytest.mark.parametrize("N,K,S,block_m", [(1, 2, 8, 16), (33, 2, 5, 16), (20, 8, 16, 32)])
def test_align_block_size(N, K, S, block_m):
    from moerun.kernels.moe_prefill import align_block_size

    gen = torch.Generator().manual_seed(N)
    slot_ids = torch.stack([torch.randperm(S, generator=gen)[:K] for _ in range(N)]).to(DEVICE)
    sorted_pairs, block_slot = align_block_size(slot_ids, S, block_m)
    P = N * K
    flat = slot_ids.reshape(-1).cpu()
    pairs, blocks = sorted_pairs.cpu(), block_slot.cpu()
    assert pairs.numel() == blocks.numel() * block_m
    real = pairs[pairs < P]
    assert sorted(real.tolist()) == list(range(P)), "every pair exactly once"
    assert ((pairs == P) | (pairs < P)).all()
    for b, slot in enumerate(blocks.tolist()):
        rows = pairs[b * block_m : (b + 1) * block_m]
        rows = rows[rows < P]
        if slot < 0:
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and (flat[rows] == slot).all()
            assert torch.equal(rows, rows.sort().values), "pairs of a slot stay in order"


ROUTING_RULES = {
    "mixtral": dict(renormalize=True),  # top-k of the logits, softmax over the k
    "qwen2-moe": dict(renormalize=False),  # softmax over all, no renormalisation
    "deepseek-v3": dict(scoring="sigmoid", n_group=8, topk_group=4, scaling=2.5, renormalize=True),
    "sigmoid-nogroup": dict(scoring="sigmoid", renormalize=False),
}


@pytest.mark.parametrize("rule", list(ROUTING_RULES))
@pytest.mark.parametrize(
    "E,k,N,logits_dtype",
    [(8, 2, 1, torch.float32), (64, 8, 5, torch.bfloat16), (64, 6, 3, torch.float32), (60, 4, 2, torch.float32)],
)
def test_routing_matches_reference(rule, E, k, N, logits_dtype):
    kwargs = dict(ROUTING_RULES[rule])
    g = kwargs.get("n_group", 1)
    if g > 1 and (E % g or E // g < 2 or k > kwargs["topk_group"] * (E // g)):
        pytest.skip("this E cannot be split into DeepSeek-style groups")
    gen = torch.Generator().manual_seed(E * 1000 + k * 10 + N)
    # Distinct values exact in bf16: ties would make the order of equal experts arbitrary.
    logits = torch.stack([torch.randperm(E, generator=gen) for _ in range(N)]).float().sub(E / 2).div(8)
    logits = logits.to(DEVICE, logits_dtype)
    if kwargs.get("scoring") == "sigmoid":
        kwargs["bias"] = (torch.randn(E, generator=gen) * 0.1).to(DEVICE)
    table = torch.randperm(E, generator=gen).to(DEVICE, torch.int32)
    ids, weights, slots = route(logits, k, kernel=True, expert_to_slot=table, **kwargs)
    ref_ids, ref_w, ref_slots = route_reference(logits, k, expert_to_slot=table, **kwargs)
    assert not torch.isnan(weights).any() and (ids >= 0).all() and (slots >= 0).all()
    assert torch.equal(ids, ref_ids)
    assert torch.equal(slots, ref_slots)
    torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)


def test_routing_mixtral_rule_equals_topk_then_softmax():
    logits = torch.randn(5, 8).to(DEVICE)
    ids, weights, slots = route(logits, 2, kernel=True)
    top = logits.topk(2, dim=-1)
    assert slots is None
    assert torch.equal(ids.long(), top.indices)
    torch.testing.assert_close(weights, torch.softmax(top.values, -1))


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("weights_dtype", [None, torch.bfloat16])
def test_softmax_topk_through_the_kernel_equals_torch(renormalize, weights_dtype):
    """The models' router call (moe/routing.softmax_topk) with the kernel forced, as on CUDA."""
    from moerun.moe.routing import softmax_topk

    gen = torch.Generator().manual_seed(11)
    logits = torch.stack([torch.randperm(12, generator=gen) for _ in range(5)]).float().div(4).to(DEVICE)
    ref_ids, ref_w = softmax_topk(logits, 3, renormalize, weights_dtype, kernel=False)
    ids, w = softmax_topk(logits, 3, renormalize, weights_dtype, kernel=True)
    assert ids.dtype == ref_ids.dtype == torch.int64 and w.dtype == ref_w.dtype
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)


def test_config_nearest_batch_and_logged_fallback(caplog):
    with caplog.at_level("INFO", logger="moerun.kernels"):
        small = get_config("prefill", "D=1,I=1,bits=4", 1, "cpu")
        large = get_config("prefill", "D=1,I=1,bits=4", 5000, "cpu")
    assert small["BLOCK_M"] <= large["BLOCK_M"]
    assert "using defaults" in caplog.text


def test_auto_mode_off_cuda_is_the_reference():
    gen = torch.Generator().manual_seed(0)
    fmt = ExpertFormat(8, 32, 16, torch.float32)
    slots = make_slots(fmt, 3, gen, "cpu")
    x, ids, weights = (t.cpu() for t in make_inputs(2, 2, 32, 3, gen))
    torch.testing.assert_close(
        fused_experts(x, ids, weights, slots, fmt), fused_experts_reference(x, ids, weights, slots, fmt)
    )


@pytest.mark.gpu
class TestRealShapesOnGPU:
    """Mixtral-8x7B (D 4096, I 14336) and Qwen3-30B-A3B (D 2048, I 768) experts, bf16."""

    @pytest.fixture(scope="class", params=[(4096, 14336), (2048, 768)], ids=["mixtral", "qwen3"])
    def shape(self, request):
        return request.param

    @pytest.mark.parametrize("bits", [4, 8])
    @pytest.mark.parametrize("mode,N", [("decode", 1), ("decode", 4), ("prefill", 64), ("prefill", 512), ("auto", 8)])
    def test_matches_reference(self, shape, bits, mode, N):
        D, I = shape
        gen = torch.Generator().manual_seed(D + bits)
        fmt = ExpertFormat(bits, D, I, torch.bfloat16)
        S, K = 4, 2
        slots = make_slots(fmt, S, gen)
        x, ids, weights = make_inputs(N, K, D, S, gen, torch.bfloat16)
        out = fused_experts(x, ids, weights, slots, fmt, torch.bfloat16, mode=mode)
        check(out, fused_experts_reference(x.float(), ids, weights, slots, fmt, torch.float32), 2e-2)
