"""The expert cache: a drop-in for RoutedExperts whose experts live in a host store, a
few of them resident in device slots. It joins two parts: the layer's residency
(`moerun.moe.residency`: which expert is in which slot, LRU, copies, prefetch, counters)
and its compute backends (`moerun.moe.backends`), chosen once when it is built.

A miss is either copied into a slot (on a side stream on CUDA, while resident experts
already run) or computed where it lives, on the CPU ("cold" experts: at batch 1 reading
an expert once from RAM beats copying it over PCIe).

Shape legend: N tokens, K experts per token, E experts, D hidden.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from moerun import graphs
from moerun.moe import backends
from moerun.moe.backends import ExpertMath, Routed, Timed
from moerun.moe.experts import SILU, ExpertActivation
from moerun.moe.residency import ColdPolicy, ExpertResidency
from moerun.quant.format import ExpertFormat


class CachedExperts(nn.Module):
    """Drop-in for RoutedExperts: forward(x [N, D], ids [N, K], weights [N, K]) -> [N, D],
    with the experts in a host store and `n_slots` of them resident on `device`."""

    def __init__(
        self,
        fmt: ExpertFormat,
        store: torch.Tensor,
        n_slots: int,
        device: torch.device,
        compute_dtype: torch.dtype,
        cold: ColdPolicy | None = None,
        copy_stream=None,
        act: ExpertActivation = SILU,
        weights_on_input: bool = False,
        kernel_mode: str | None = None,
    ):
        super().__init__()
        assert store.dtype == torch.uint8 and store.shape[1] == fmt.blob_bytes
        self.fmt, self.n_experts = fmt, store.shape[0]
        self.act, self.weights_on_input = act, weights_on_input
        self.device, self.compute_dtype = torch.device(device), compute_dtype
        self.residency = ExpertResidency(store, n_slots, self.device, cold, copy_stream)
        self.math = ExpertMath(fmt, act, weights_on_input, compute_dtype, self.n_experts)
        self.kernel_mode = kernel_mode  # chooses the backends

    @property
    def kernel_mode(self) -> str | None:
        """None: the Triton kernels on CUDA, else the C kernels or plain torch;
        "decode" | "prefill" | "auto": the Triton kernels in that mode (on the CPU under
        TRITON_INTERPRET=1, which tests use); "torch": never Triton."""
        return self._kernel_mode

    @kernel_mode.setter
    def kernel_mode(self, mode: str | None) -> None:
        self._kernel_mode = mode
        res = self.residency
        self.slot_backend, self.cold_backend = backends.choose(res.slots, res.store, self.math, self.device, mode)
        self._resident_call = self._graph_call = None
        if res.fully_resident:
            self._resident_call = self.slot_backend.resident_call(res.slot_table, in_graph=False)
            self._graph_call = self.slot_backend.resident_call(res.slot_table, in_graph=True)

    @contextlib.contextmanager
    def profiled(self, timer):
        """For one profiled pass of `moerun bench`: copies into slots are timed as
        `timer("copies")`, cold experts computed on the CPU as `timer("cpu_experts")`."""
        cold = self.cold_backend
        self.cold_backend = Timed(cold, timer, "cpu_experts")
        try:
            with self.residency.timed_copies(timer):
                yield
        finally:
            self.cold_backend = cold

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if graphs.capturing():
            if self._graph_call is not None:
                # Inside the CUDA graph: slots from a device table, no host decision at all.
                # (The counters are not updated here: it would need a sync; a fully
                # resident layer has only hits anyway.)
                return self._graph_call(x, ids, weights)[0]
            # Misses are decided on the host: the graph is cut here and this layer runs
            # eagerly between two replayed pieces.
            return graphs.host_boundary(self._forward, x, ids, weights)
        return self._forward(x, ids, weights)

    def _forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        res = self.residency
        if self._resident_call is not None:
            # Fully resident and a backend with one call for it (the C kernels over host
            # memory): no per-expert Python.
            out, used = self._resident_call(x, ids, weights)
            res.stats.hits += used
            return out
        routed = Routed.group(ids, weights, self.n_experts)
        in_slots, cold = res.place(routed.tokens_per_expert())
        # Partial sums in float32 (a bf16 sum per round would round each round's experts).
        out = torch.zeros(x.shape, dtype=torch.float32 if x.device.type == "cpu" else x.dtype, device=x.device)
        for ready, fresh in res.rounds(in_slots, x):
            for part in self.slot_backend.parts(ready, fresh):
                res.wait(part)
                self.slot_backend.add(out, x, routed, part, res.slots_of(part))
        if cold:
            self.cold_backend.add(out, x, routed, cold, cold)  # the store's rows are the expert ids
        return out.to(x.dtype)

    @property
    def intermediate_size(self) -> int:
        return self.fmt.intermediate_size

    @property
    def n_params(self) -> int:
        D, I = self.fmt.hidden_size, self.fmt.intermediate_size
        R = self.fmt.rows13  # 2I gated, I not
        return self.n_experts * (D * (R + I) + (R + D if self.fmt.bias else 0))
