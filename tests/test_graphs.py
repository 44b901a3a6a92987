"""Decode steps for CUDA graphs (moerun/graphs.py).

On the CPU: the static-shape step equals the ordinary decode with an expert cache too;
where a capture would be cut (host_boundary) is checked with a stand-in capture that runs
each host step on the spot; the in-graph expert path (slot table + Triton decode kernel,
under the interpreter) equals the cache's eager path. On CUDA (marked `gpu`): real
captures replay the eager logits, and whole models on the GPU match the CPU reference.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import moerun
from moerun import graphs
from moerun.cli import app
from moerun.errors import MoerunError
from moerun.graphs import DecodeGraphs, host_boundary, span_for
from moerun.moe.cache import CachedExperts
from moerun.moe.experts import RoutedExperts
from moerun.moe.offload import routed_expert_modules
from tests.model_fixtures import make_checkpoint
from tests.parity import rel_err, static_steps

N_MOE_LAYERS = 3  # mixtral fixture: every layer is sparse


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("mixtral"), "mixtral", dtype=torch.bfloat16, shards=1)


pytestmark = pytest.mark.usefixtures("private_cache")


def test_span_buckets():
    assert [span_for(p, 4096) for p in (0, 255, 256, 511, 512, 1000)] == [256, 256, 512, 512, 1024, 1024]
    assert span_for(3000, 2048) == 2048  # capped at the cache
    assert span_for(5, 24, min_span=4) == 8


def test_host_boundary_outside_a_capture_is_a_plain_call():
    x = torch.randn(3, 4)
    assert torch.equal(host_boundary(lambda a, b: a * b, x, x), x * x)
    assert not graphs.capturing()


def eager_decode(model, ids, n_prompt: int):
    lm = model.lm
    caches = lm.make_caches(1, ids.shape[1] + 4)
    lm(ids[:, :n_prompt], caches, 0)
    return torch.cat([lm(ids[:, t : t + 1], caches, t) for t in range(n_prompt, ids.shape[1])], dim=1)


@torch.inference_mode()
def static_decode(model, ids, n_prompt: int, as_if_capturing: bool = False) -> tuple[torch.Tensor, list]:
    """Prefill, then DecodeGraphs steps (tests/parity.py's static_steps): eagerly, or on the
    in-graph code paths under NoHostSync -> (logits, where a capture would be cut)."""
    lm = model.lm
    caches = lm.make_caches(1, ids.shape[1] + 4)
    lm(ids[:, :n_prompt], caches, 0)
    return static_steps(lm, caches, ids, n_prompt, as_if_capturing)


@torch.inference_mode()
def test_static_step_with_an_offloaded_expert_cache_equals_eager(mixtral):
    ids = torch.randint(0, 256, (1, 18), generator=torch.Generator().manual_seed(0))
    model = moerun.load(str(mixtral), bits=4, device="cpu", dtype="float32", expert_slots=1)
    expected = eager_decode(model, ids, 6)
    model.reset_stats()
    got, _ = static_decode(model, ids, 6)
    assert rel_err(got, expected) < 1e-5
    assert model.stats["total"]["misses"] > 0  # the cache really swapped experts in between


# The in-graph 4-bit case runs the Triton decode kernel under the interpreter for every step
# (~40 s): the slow tier's; the fast tier holds that kernel in test_kernels.py.
@pytest.mark.parametrize(
    "case", ["offloaded", "plain 16-bit", pytest.param("resident 4-bit kernels", marks=pytest.mark.slow)]
)
def test_where_a_capture_is_cut(mixtral, case):
    """Host decisions (cache misses, the plain expert loop) cut the graph once per MoE
    layer; fully resident quantized experts stay inside it (slot table + decode kernel),
    and nothing between the cuts syncs with the host."""
    # 3 decode steps: each Triton launch under the interpreter costs seconds.
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    if case == "offloaded":
        model = moerun.load(str(mixtral), bits=4, device="cpu", dtype="float32", expert_slots=1)
        kind = CachedExperts
    elif case == "plain 16-bit":
        model = moerun.load(str(mixtral), bits=16, device="cpu", dtype="float32")
        kind = RoutedExperts
    else:
        model = moerun.load(str(mixtral), bits=4, device="cpu", dtype="float32")
        for _, _, m in routed_expert_modules(model.lm):
            assert m.residency.fully_resident
            m.kernel_mode = "decode"  # the Triton kernel, under TRITON_INTERPRET=1
        kind = None
    with torch.inference_mode():
        expected = eager_decode(model, ids, 6)
    got, cuts = static_decode(model, ids, 6, as_if_capturing=True)
    assert rel_err(got, expected) < 1e-5
    steps = ids.shape[1] - 6
    if kind is None:
        assert cuts == []
    else:
        assert len(cuts) == steps * N_MOE_LAYERS and all(isinstance(c, kind) for c in cuts)


@torch.inference_mode()
def test_in_graph_expert_path_equals_the_cache_path():
    """A fully resident layer's in-graph call (device slot table, one decode launch) against
    its eager path, on fresh random inputs with slots permuted against expert ids."""
    from moerun.quant.format import ExpertFormat

    g = torch.Generator().manual_seed(4)
    E, D, I = 6, 64, 40
    fmt = ExpertFormat(4, D, I, torch.float32)
    w13, w2 = torch.randn(E, 2 * I, D, generator=g) * 0.1, torch.randn(E, D, I, generator=g) * 0.1
    store = torch.stack([fmt.pack(w13[e], w2[e]) for e in range(E)])
    module = CachedExperts(fmt, store, E, torch.device("cpu"), torch.float32, kernel_mode="decode")
    # Shuffle the residency so slot != expert id: the table must do the remap.
    residency = module.residency
    order = torch.randperm(E, generator=g).tolist()
    residency.policy.slot_of = {e: order[e] for e in range(E)}
    residency.slots.copy_(store[torch.argsort(torch.tensor(order))])
    residency.slot_table.copy_(torch.tensor(order, dtype=torch.int32))
    x = torch.randn(1, D, generator=g)
    ids = torch.tensor([[4, 1]])
    weights = torch.softmax(torch.randn(1, 2, generator=g), dim=-1)
    expected = module._forward(x, ids, weights)
    got, _ = module.slot_backend.resident_call(residency.slot_table, in_graph=True)(x, ids, weights)
    assert torch.isfinite(got).all()
    assert rel_err(got, expected) < 1e-5


# Each quantized width costs 13-25 s under the interpreter: 16 bits in the fast tier, 4 and 8 in
# the slow one (each kernel's own test covers every width fast).
@pytest.mark.parametrize("bits", [pytest.param(4, marks=pytest.mark.slow), pytest.param(8, marks=pytest.mark.slow), 16])
def test_whole_model_through_the_kernels_equals_the_torch_path(mixtral, bits, monkeypatch):
    """What a GPU runs, under the interpreter: routing kernel, prefill grouped GEMM for the
    prompt, decode kernels (in-graph path, through DecodeGraphs) for each new token."""
    from moerun.moe import routing

    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(8))  # 4 decode steps
    plain = moerun.load(str(mixtral), bits=bits, device="cpu", dtype="float32")
    model = moerun.load(str(mixtral), bits=bits, device="cpu", dtype="float32")
    if bits == 16:  # on CUDA load() does this itself; the CPU keeps plain weights
        from moerun.models import get_architecture
        from moerun.moe.offload import attach_expert_cache

        attach_expert_cache(model.lm, get_architecture("mixtral"), mixtral, 16, 4, torch.device("cpu"), torch.float32)
    monkeypatch.setattr(routing, "routing_kernel_for", lambda logits, kernel=None: kernel is not False)
    modules = [m for _, _, m in routed_expert_modules(model.lm)]
    assert all(isinstance(m, CachedExperts) and m.residency.fully_resident for m in modules)
    with torch.inference_mode():
        expected = plain.logits(ids)
        for m in modules:
            m.kernel_mode = "prefill"
        assert rel_err(model.logits(ids), expected) < 1e-5
        expected_steps = eager_decode(plain, ids, 6)
    for m in modules:
        m.kernel_mode = "decode"
    got_steps, cuts = static_decode(model, ids, 6, as_if_capturing=True)
    assert cuts == []  # every expert layer ran inside the (would-be) graph
    assert rel_err(got_steps, expected_steps) < 1e-5


def test_generation_through_decode_graphs_equals_eager(mixtral):
    prompt = list(range(5, 17))
    model = moerun.load(str(mixtral), bits=8, device="cpu", dtype="float32")
    assert model.decode_graphs is None  # never on the CPU by default
    expected = model.generate(prompt, max_new_tokens=20, ignore_eos=True).token_ids
    model.decode_graphs = DecodeGraphs(model.lm, model.kv_caches, capture_graphs=False, min_span=4)
    assert model.generate(prompt, max_new_tokens=20, ignore_eos=True).token_ids == expected


@torch.inference_mode()
def test_a_failed_capture_falls_back_to_eager_steps(mixtral, monkeypatch, caplog):
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    model = moerun.load(str(mixtral), bits=16, device="cpu", dtype="float32")
    expected = eager_decode(model, ids, 6)
    caches = model.lm.make_caches(1, 16)
    model.lm(ids[:, :6], caches, 0)
    steps = DecodeGraphs(model.lm, caches, capture_graphs=False, min_span=4)
    steps.capture_graphs = True  # as on CUDA, with a capture that fails:

    def broken_capture(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(graphs, "capture", broken_capture)
    got = torch.cat([steps.step(int(ids[0, t]), t) for t in range(6, 12)], dim=1)
    assert rel_err(got, expected) < 1e-5
    assert not steps.capture_graphs and not steps.steps
    assert "CUDA graph capture failed (operation not permitted when stream is capturing)" in caplog.text


def test_cuda_graphs_asked_for_on_the_cpu(mixtral):
    with pytest.raises(MoerunError, match="CUDA graphs need a CUDA device"):
        moerun.load(str(mixtral), device="cpu", dtype="float32", cuda_graphs=True)


def test_bench_rejects_a_bad_cuda_graphs_value():
    result = CliRunner().invoke(app, ["bench", "--synthetic", "demo", "--cuda-graphs", "maybe"])
    assert result.exit_code != 0
    assert "on, off or on,off" in result.output


# -- on a GPU -----------------------------------------------------------------------------


@pytest.mark.gpu
class TestOnGPU:
    @pytest.mark.parametrize("bits,slots", [(4, None), (8, None), (4, 1), (16, None)])
    def test_replayed_steps_equal_eager_decode(self, mixtral, bits, slots):
        ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(0))
        model = moerun.load(str(mixtral), bits=bits, device="cuda", dtype="float32", expert_slots=slots)
        lm = model.lm
        with torch.inference_mode():
            expected = eager_decode(model, ids.cuda(), 6)
            caches = lm.make_caches(1, ids.shape[1] + 4)
            lm(ids[:, :6].cuda(), caches, 0)
            steps = DecodeGraphs(lm, caches, capture_graphs=True)  # spans 256, then 304 (the cache's end)
            got = torch.cat([steps.step(int(ids[0, t]), t).clone() for t in range(6, ids.shape[1])], dim=1)
        assert sorted(steps.steps) == [256, 304]
        captured = steps.steps[256]
        if slots is not None:
            assert captured.n_host_steps == N_MOE_LAYERS
        else:  # 16-bit too: on CUDA resident experts sit in slot buffers the kernels read
            assert captured.n_host_steps == 0 and captured.n_graphs == 1
            assert all(isinstance(m, CachedExperts) for _, _, m in routed_expert_modules(lm))
        assert rel_err(got, expected) < 1e-4

    @pytest.mark.parametrize("bits", [4, 8, 16])
    def test_whole_model_logits_equal_the_cpu_reference(self, mixtral, bits):
        """float32 on both devices: the kernels (prefill and decode) against the CPU path
        on the same quantized experts, to 1e-4."""
        ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(6))
        cpu = moerun.load(str(mixtral), bits=bits, device="cpu", dtype="float32").logits(ids)
        gpu_model = moerun.load(str(mixtral), bits=bits, device="cuda", dtype="float32")
        assert rel_err(gpu_model.logits(ids).cpu(), cpu) < 1e-4
        # And token by token, through the decode kernels and the captured graphs.
        prompt = ids[0, :8].tolist()
        cpu_tokens = moerun.load(str(mixtral), bits=bits, device="cpu", dtype="float32").generate(
            prompt, 24, ignore_eos=True
        )
        assert gpu_model.decode_graphs is not None
        assert gpu_model.generate(prompt, 24, ignore_eos=True).token_ids == cpu_tokens.token_ids
