"""The kernels of the recurrent layers (moerun/kernels/recurrent.py) against their
plain-torch references on fresh random inputs: the gated delta rule against
`recurrent_gated_delta_step` and `chunk_gated_delta_rule`, Mamba-2's selective-state update
against `selective_state_step`, Mamba's step and scan against `selective_scan_step` and
MambaMixer's chunked scan. On the CPU they run under TRITON_INTERPRET=1 (set by conftest.py
before triton is imported): tiny shapes, non-power-of-two dims, grouped heads, several
steps carried through the state. The `gpu` tests run whole layers' decode on CUDA (the
kernels) against the CPU (the torch path).
"""

import functools

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from moerun.kernels import available  # noqa: E402
from moerun.kernels.recurrent import (  # noqa: E402
    gated_delta_chunked,
    gated_delta_sequence,
    gated_delta_step,
    mamba2_scan,
    mamba2_step,
    mamba_scan,
    mamba_step,
)
from moerun.layers import StaticPosition  # noqa: E402
from moerun.recurrent import gated_deltanet as gdn  # noqa: E402
from moerun.recurrent.mamba import MambaMixer, selective_scan_step  # noqa: E402
from moerun.recurrent.mamba2 import Mamba2Mixer, selective_state_step  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not available(DEVICE), reason="the Triton kernels cannot run here")

STEPS = 3  # consecutive tokens, each step reading the state the previous one wrote


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# bf16 inputs, float32 state: the kernel reads the same bf16 values but keeps every
# product in float32, where the reference rounds some (Mamba-2: dt*B*x and C.h in bf16,
# relative error ~2**-8 each); 2e-2 allows a few such roundings and still fails on any
# wrong index, sign or missing term (those give errors of order 1).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "B, Hk, H, Dk, Dv, block",
    [(1, 2, 2, 8, 16, None), (2, 1, 3, 5, 7, None), (2, 2, 6, 12, 33, 16)],
    ids=["plain", "odd-dims-gqa3", "gqa3-two-v-blocks"],
)
def test_gated_delta_step_matches_the_reference(B, Hk, H, Dk, Dv, block, dtype):
    gen = torch.Generator().manual_seed(B * 100 + H * 10 + Dv)
    S_ref = torch.randn(B, H, Dk, Dv, generator=gen) * 0.3
    S = S_ref.clone().to(DEVICE)
    for _ in range(STEPS):
        q = gdn.l2norm(torch.randn(B, Hk, Dk, generator=gen)).to(dtype)
        k = gdn.l2norm(torch.randn(B, Hk, Dk, generator=gen)).to(dtype)
        v = torch.randn(B, H, Dv, generator=gen).to(dtype)
        g = -torch.rand(B, H, generator=gen).to(dtype)  # log decay <= 0
        beta = torch.rand(B, H, generator=gen).to(dtype)
        r = H // Hk  # the reference takes each value head's own copy of its key head
        o_ref, S_ref = gdn.recurrent_gated_delta_step(
            q.float().repeat_interleave(r, 1),
            k.float().repeat_interleave(r, 1),
            v.float(),
            g.float(),
            beta.float(),
            S_ref,
        )
        o, S_out = gated_delta_step(*(t.to(DEVICE) for t in (q, k, v, g, beta)), S, block_v=block)
        assert S_out is S and o.dtype == torch.float32 and S.dtype == torch.float32
        assert rel_err(o, o_ref) < TOLERANCE[dtype]
        assert rel_err(S, S_ref) < TOLERANCE[dtype]


def test_gated_delta_step_rejects_a_mismatched_state():
    q = torch.zeros(1, 2, 4, device=DEVICE)
    with pytest.raises(ValueError):
        gated_delta_step(
            q,
            q,
            torch.zeros(1, 3, 5, device=DEVICE),
            torch.zeros(1, 3, device=DEVICE),
            torch.zeros(1, 3, device=DEVICE),
            torch.zeros(1, 3, 4, 5, device=DEVICE),
        )


def check_steps(draw, reference, kernel, h_ref: torch.Tensor, keep, dtype) -> None:
    """STEPS tokens through `kernel` on DEVICE, which updates its state in place, against
    `reference` on the CPU: each step's inputs from draw(), then the state and the keep
    flag (None: no flag)."""
    h = h_ref.clone().to(DEVICE)
    keep_t = None if keep is None else torch.tensor(keep)
    for _ in range(STEPS):
        inputs = draw()
        y_ref, h_ref = reference(*inputs, h_ref, keep_t)
        y, h_out = kernel(*(t.to(DEVICE) for t in inputs), h, None if keep_t is None else keep_t.to(DEVICE))
        assert h_out is h and y.dtype == dtype
        assert rel_err(y, y_ref) < TOLERANCE[dtype]
        assert rel_err(h, h_ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "B, G, H, P, N, keep, block",
    [(1, 1, 2, 8, 16, None, None), (2, 2, 6, 5, 7, 1.0, None), (2, 1, 3, 33, 6, 0.0, 16)],
    ids=["plain", "odd-dims-groups", "two-p-blocks-dropped-state"],
)
def test_mamba2_step_matches_the_reference(B, G, H, P, N, keep, block, dtype):
    gen = torch.Generator().manual_seed(B * 100 + H * 10 + P)
    A = -torch.rand(H, generator=gen) * 2 - 0.1
    D = torch.randn(H, generator=gen)
    h_ref = torch.randn(B, H, P, N, generator=gen) * 0.3

    def draw():
        xs = torch.randn(B, H, P, generator=gen).to(dtype)
        dt = (torch.rand(B, H, generator=gen) * 0.5 + 0.01).to(dtype)
        b = torch.randn(B, G, N, generator=gen).to(dtype)
        c = torch.randn(B, G, N, generator=gen).to(dtype)
        return xs, dt, A, b, c, D

    check_steps(draw, selective_state_step, functools.partial(mamba2_step, block_p=block), h_ref, keep, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "B, I, N, keep, block",
    [(1, 16, 8, None, None), (2, 37, 6, 1.0, None), (2, 45, 5, 0.0, 16)],
    ids=["plain", "odd-dims", "three-i-blocks-dropped-state"],
)
def test_mamba_step_matches_the_reference(B, I, N, keep, block, dtype):
    gen = torch.Generator().manual_seed(B * 100 + I * 10 + N)
    A = -torch.rand(I, N, generator=gen) * 2 - 0.1
    D = torch.randn(I, generator=gen)
    h_ref = torch.randn(B, I, N, generator=gen) * 0.3

    def draw():
        x = torch.randn(B, I, generator=gen).to(dtype)
        dt = (torch.rand(B, I, generator=gen) * 0.5 + 0.01).to(dtype)
        b = torch.randn(B, N, generator=gen).to(dtype)
        c = torch.randn(B, N, generator=gen).to(dtype)
        return x, dt, A, b, c, D.to(dtype)

    check_steps(draw, selective_scan_step, functools.partial(mamba_step, block_i=block), h_ref, keep, dtype)


@pytest.mark.parametrize("fresh", [True, False], ids=["zero-state", "continued"])
@pytest.mark.parametrize(
    "B, I, N, T, block", [(1, 16, 8, 9, None), (2, 37, 5, 6, 16)], ids=["plain", "odd-dims-three-i-blocks"]
)
def test_mamba_scan_matches_the_chunked_scan(B, I, N, T, block, fresh):
    gen = torch.Generator().manual_seed(B * 100 + I * 10 + T)
    mixer = MambaMixer(8, I, N, conv_kernel=4, dt_rank=2)
    mixer.chunk_size = 4  # the reference scan over several chunks, one of them padded
    state = mixer.make_state(B, 16, torch.float32, "cpu")
    A = -torch.rand(I, N, generator=gen) * 2 - 0.1
    with torch.no_grad():
        mixer.D.copy_(torch.randn(I, generator=gen))
    u = torch.randn(B, I, T, generator=gen)
    dt = torch.rand(B, I, T, generator=gen) * 0.5 + 0.01
    b = torch.randn(B, T, N, generator=gen)
    c = torch.randn(B, T, N, generator=gen)
    gate = torch.randn(B, I, T, generator=gen)
    h0 = torch.zeros(B, I, N) if fresh else torch.randn(B, I, N, generator=gen) * 0.3
    with torch.no_grad():
        y_ref = mixer._scan(u, dt, A, b, c, gate, h0.clone(), state)
        h = h0.to(DEVICE)
        y, _ = mamba_scan(*(t.to(DEVICE) for t in (u, dt, A, b, c, mixer.D.detach())), h, block_i=block)
    assert rel_err(y.cpu() * torch.nn.functional.silu(gate), y_ref) < 1e-5
    assert rel_err(h, state.ssm) < 1e-5


@pytest.mark.parametrize("fresh", [True, False], ids=["zero-state", "continued"])
@pytest.mark.parametrize(
    "B, G, H, P, N, T, block",
    [(1, 1, 2, 8, 16, 9, None), (2, 2, 6, 33, 5, 6, 16)],
    ids=["plain", "odd-dims-groups-three-p-blocks"],
)
def test_mamba2_scan_matches_the_chunked_ssd(B, G, H, P, N, T, block, fresh):
    gen = torch.Generator().manual_seed(B * 100 + H * 10 + T)
    mixer = Mamba2Mixer(8, n_heads=H, head_dim=P, n_groups=G, state_size=N, conv_kernel=4, chunk_size=4, eps=1e-6)
    with torch.no_grad():
        mixer.A_log.copy_(torch.rand(H, generator=gen).add(0.1).log())
        mixer.D.copy_(torch.randn(H, generator=gen))
    xs = torch.randn(B, T, H, P, generator=gen)
    dt = torch.rand(B, T, H, generator=gen) * 0.5 + 0.01
    b = torch.randn(B, T, G, N, generator=gen)
    c = torch.randn(B, T, G, N, generator=gen)
    h0 = torch.zeros(B, H, P, N) if fresh else torch.randn(B, H, P, N, generator=gen) * 0.3
    with torch.no_grad():
        y_ref, h_ref = mixer.ssd(xs, dt, b, c, None if fresh else h0.clone())
        A = -torch.exp(mixer.A_log.float())
        h = h0.to(DEVICE)
        y, _ = mamba2_scan(*(t.to(DEVICE) for t in (xs, dt, A, b, c, mixer.D.detach())), h, block_p=block)
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(h, h_ref) < 1e-5


# -- whole layers on CUDA (the kernels) against the CPU (plain torch) ------------------


def random_params(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "A_log":
                p.copy_(torch.empty(p.shape).uniform_(0.05, 1.5, generator=g).log())
            else:
                p.copy_(
                    torch.randn(p.shape, generator=g) * (0.15 if p.dim() > 1 else 0.5) + (name.endswith("norm.weight"))
                )
    return module.eval()


def decode_on(mixer, x: torch.Tensor, device: str, static: bool):
    mixer = mixer.to(device)
    state = mixer.make_state(x.shape[0], 32, torch.float32, device)
    x = x.to(device)
    with torch.no_grad():
        outs = [mixer(x[:, :5], state, 0)]  # prefill, then decode steps
        for t in range(5, x.shape[1]):
            start = StaticPosition(torch.tensor([t], device=device), 32) if static else t
            outs.append(mixer(x[:, t : t + 1], state, start))
    return torch.cat(outs, dim=1).cpu(), state


# Each recurrent layer kind: (a tiny random layer, its hidden size, the name of its
# recurrent state).
LAYERS = {
    "qwen3_next": (
        lambda: gdn.GatedDeltaNet(64, 2, 4, 16, 24, conv_kernel=4, eps=1e-6, grouped_projections=True),
        64,
        "recurrent",
    ),
    "qwen3_5": (
        lambda: gdn.GatedDeltaNet(64, 2, 4, 16, 24, conv_kernel=4, eps=1e-6, grouped_projections=False),
        64,
        "recurrent",
    ),
    "gqa3": (
        lambda: gdn.GatedDeltaNet(32, 1, 3, 8, 12, conv_kernel=4, eps=1e-6, grouped_projections=True),
        32,
        "recurrent",
    ),
    "mamba2-1-group": (
        lambda: Mamba2Mixer(32, n_heads=4, head_dim=8, n_groups=1, state_size=6, conv_kernel=4, chunk_size=4, eps=1e-6),
        32,
        "ssm",
    ),
    "mamba2-2-groups": (
        lambda: Mamba2Mixer(32, n_heads=4, head_dim=8, n_groups=2, state_size=6, conv_kernel=4, chunk_size=4, eps=1e-6),
        32,
        "ssm",
    ),
    "jamba": (lambda: MambaMixer(32, 48, 6, conv_kernel=4, dt_rank=4, bcdt_norm_eps=1e-6), 32, "ssm"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("layer", ["qwen3_next", "qwen3_5", "mamba2-1-group", "mamba2-2-groups", "jamba"])
def test_recurrent_decode_on_cuda_matches_the_cpu(layer, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the conv in true float32, as the CPU
    make, hidden, state_name = LAYERS[layer]
    mixer = random_params(make(), 1)
    x = torch.randn(2, 9, hidden, generator=torch.Generator().manual_seed(2))
    cpu, cpu_state = decode_on(mixer, x, "cpu", static=False)
    cuda, cuda_state = decode_on(mixer, x, "cuda", static=True)
    assert rel_err(cuda, cpu) < 1e-4
    assert rel_err(getattr(cuda_state, state_name), getattr(cpu_state, state_name)) < 1e-4


@pytest.mark.parametrize(
    "kernel",
    [gated_delta_sequence, functools.partial(gated_delta_chunked, chunk=4)],
    ids=["token-by-token", "chunks-of-4"],
)
@pytest.mark.parametrize("fresh", [True, False], ids=["zero-state", "continued"])
@pytest.mark.parametrize(
    "B, Hk, H, T, Dk, Dv, block",
    [(1, 1, 2, 9, 8, 16, None), (2, 1, 3, 6, 5, 33, 16)],
    ids=["plain", "odd-dims-gqa3-two-v-blocks"],
)
def test_gated_delta_prompt_kernels_match_the_chunked_rule(B, Hk, H, T, Dk, Dv, block, fresh, kernel):
    gen = torch.Generator().manual_seed(T * 10 + Dv)
    q = gdn.l2norm(torch.randn(B, Hk, T, Dk, generator=gen))
    k = gdn.l2norm(torch.randn(B, Hk, T, Dk, generator=gen))
    v = torch.randn(B, H, T, Dv, generator=gen)
    g = -torch.rand(B, H, T, generator=gen)
    beta = torch.rand(B, H, T, generator=gen)
    S0 = torch.zeros(B, H, Dk, Dv) if fresh else torch.randn(B, H, Dk, Dv, generator=gen) * 0.3
    r = H // Hk
    o_ref, S_ref = gdn.chunk_gated_delta_rule(
        q.repeat_interleave(r, 1), k.repeat_interleave(r, 1), v, g, beta, None if fresh else S0.clone(), chunk=4
    )
    S = S0.to(DEVICE)
    o, _ = kernel(*(t.to(DEVICE) for t in (q, k, v, g, beta)), S, block_v=block)
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(S, S_ref) < 1e-5


# -- the layers' kernel path, run on the CPU under the interpreter ---------------------


@pytest.mark.parametrize("layer", ["gqa3", "mamba2-2-groups", "jamba"])
def test_decode_through_the_kernel_equals_the_torch_path(layer):
    make, hidden, state_name = LAYERS[layer]
    mixer = random_params(make(), 1)
    x = torch.randn(2, 8, hidden, generator=torch.Generator().manual_seed(2))
    torch_out, torch_state = decode_on(mixer, x, "cpu", static=True)
    mixer.step_kernel = True
    kernel_out, kernel_state = decode_on(mixer, x, "cpu", static=True)
    assert rel_err(kernel_out, torch_out) < 1e-5
    assert rel_err(getattr(kernel_state, state_name), getattr(torch_state, state_name)) < 1e-5
