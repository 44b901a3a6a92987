"""Expert compute backends: given tokens, their routing, and which experts to compute from
which rows of a buffer of blobs (a layer's slots, or its host store), add those experts'
outputs. They never know whether an expert was a hit or a miss; residency
(`moerun.moe.residency`) decides that. Chosen once per layer when its cache is built
(`choose`), not per call:

- `CpuKernels`: the fused C kernels over an address table, one call for every expert
  asked (a buffer in host memory: a CPU model's slots, every layer's host store);
- `TritonSlots`: the Triton slot kernels (CUDA, or the CPU under TRITON_INTERPRET=1);
- `TorchExperts`: expert by expert in plain torch, for what the others cannot compute.

Shape legend: N tokens, K experts per token, E experts, D hidden.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import torch

from moerun.kernels import cpu_experts
from moerun.moe.experts import ExpertActivation, apply_expert, group_by_expert
from moerun.quant.format import ExpertFormat

# A fully resident layer's one call: (x, ids, weights) -> (out [N, D], experts computed or None).
ResidentCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, int | None]]


@dataclasses.dataclass
class Routed:
    """One forward's routing: ids [N, K] and weights [N, K], and for every expert in use
    its token rows and their weights (grouped once: one sort, one host sync)."""

    ids: torch.Tensor
    weights: torch.Tensor
    by_expert: dict[int, tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def group(cls, ids: torch.Tensor, weights: torch.Tensor, n_experts: int) -> "Routed":
        return cls(ids, weights, {e: (rows, w) for e, rows, w in group_by_expert(ids, weights, n_experts)})

    def tokens_per_expert(self) -> dict[int, int]:
        return {e: rows.numel() for e, (rows, _) in self.by_expert.items()}


class ExpertBackend(Protocol):
    """Computes routed experts whose blobs are rows of one buffer."""

    def parts(self, ready: list[int], fresh: list[int]) -> list[list[int]]:
        """The calls a round of slot experts takes: `ready` were resident, copies of `fresh`
        may still be in flight; each part is run once its own copies have landed."""
        ...

    def add(self, out: torch.Tensor, x: torch.Tensor, routed: Routed, experts: list[int], rows: list[int]) -> None:
        """out [N, D] += Σ weight · expert(x) over the pairs whose expert is in `experts`;
        expert experts[j] is row rows[j] of the buffer. In place, so that every backend sums
        into the output in the order it always has."""
        ...

    def resident_call(self, slot_table: torch.Tensor, in_graph: bool) -> ResidentCall | None:
        """One call for a fully resident layer (slot_table int32 [E]: expert -> row), eagerly
        or inside a CUDA graph (no host decision); None where this backend has none."""
        ...


@dataclasses.dataclass(frozen=True)
class ExpertMath:
    """What every backend computes: experts of `fmt` with `act`, activations in `dtype`,
    for ids in [0, n_experts)."""

    fmt: ExpertFormat
    act: ExpertActivation
    weights_on_input: bool
    dtype: torch.dtype
    n_experts: int


class CpuKernels:
    """The fused C kernels (`moerun.kernels.cpu_experts`) over a buffer in host memory:
    each weight byte read once, every expert asked in one call, on the CPU whatever the
    device of the output."""

    def __init__(self, blobs: torch.Tensor, math: ExpertMath):
        self.math = math
        self.addresses = cpu_experts.blob_table(blobs, math.fmt)  # int64 [rows, 6], built once

    def parts(self, ready: list[int], fresh: list[int]) -> list[list[int]]:
        return [ready + fresh]  # a copy into host memory is done when it returns: one call

    def add(self, out, x, routed, experts, rows) -> None:
        table = torch.zeros(self.math.n_experts, self.addresses.shape[1], dtype=self.addresses.dtype)
        table[experts] = self.addresses[rows]
        y, _ = self._call(x.to("cpu"), routed.ids.cpu(), routed.weights.cpu(), table, out.dtype)
        out += y.to(out.device)

    def resident_call(self, slot_table, in_graph) -> ResidentCall | None:
        if in_graph:
            return None  # host code: a CUDA graph cannot hold it
        table = self.addresses[slot_table.long()]  # rows in expert order, once

        def call(x, ids, weights):
            return self._call(x, ids, weights, table, self.math.dtype)

        return call

    def _call(self, x, ids, weights, table, out_dtype) -> tuple[torch.Tensor, int]:
        m = self.math
        return cpu_experts.moe_experts(x, ids, weights, table, m.fmt, m.act, m.weights_on_input, out_dtype)


class TritonSlots:
    """The Triton slot kernels (`moerun.kernels.fused_experts`) over a slot buffer on the
    compute device, in `mode` ("decode" | "prefill" | "auto")."""

    def __init__(self, slots: torch.Tensor, math: ExpertMath, mode: str):
        self.slots, self.math, self.mode = slots, math, mode

    def parts(self, ready: list[int], fresh: list[int]) -> list[list[int]]:
        # One launch for the experts already resident, one for those just copied in, so
        # the first runs while the copies are still in flight.
        return [part for part in (ready, fresh) if part]

    def add(self, out, x, routed, experts, rows) -> None:
        """Other pairs get weight 0; the kernel still reads a slot for them, a cost paid only
        in a step that also waits for a copy, which is far slower."""
        table = [-1] * self.math.n_experts
        for e, row in zip(experts, rows):
            table[e] = row
        slot_ids = torch.tensor(table, dtype=torch.int32, device=x.device)[routed.ids]
        absent = slot_ids < 0
        out += self._launch(x, slot_ids.clamp_min(0), routed.weights.masked_fill(absent, 0), self.mode)

    def resident_call(self, slot_table, in_graph) -> ResidentCall | None:
        if not in_graph:
            return None  # eagerly, `add` counts the experts (a host sync the graph cannot have)
        mode = "decode" if self.mode == "auto" else self.mode

        def call(x, ids, weights):
            return self._launch(x, slot_table[ids], weights, mode), None

        return call

    def _launch(self, x, slot_ids, weights, mode: str) -> torch.Tensor:
        from moerun import kernels

        m = self.math
        return kernels.fused_experts(
            x, slot_ids, weights, self.slots, m.fmt, m.dtype, act=m.act, weights_on_input=m.weights_on_input, mode=mode
        )


class TorchExperts:
    """Expert by expert in plain torch: unpack each blob, multiply (`apply_expert`). Any
    format, any device. `on_host`: the buffer is the host store and experts run on the
    CPU, summed apart in x's dtype and added to the output once."""

    def __init__(self, blobs: torch.Tensor, math: ExpertMath, on_host: bool):
        self.blobs, self.math, self.on_host = blobs, math, on_host

    def parts(self, ready: list[int], fresh: list[int]) -> list[list[int]]:
        return [[e] for e in ready + fresh]  # each expert waits for its own copy only

    def add(self, out, x, routed, experts, rows) -> None:
        m = self.math
        if self.on_host:
            x = x.to("cpu")
            target = torch.zeros_like(x)
        else:
            target = out
        for e, row in zip(experts, rows):
            tokens, w = (t.to(x.device) for t in routed.by_expert[e])
            y = apply_expert(x[tokens], w, *m.fmt.unpack(self.blobs[row], m.dtype), m.act, m.weights_on_input)
            target.index_add_(0, tokens, y.to(target.dtype))
        if target is not out:
            out += target.to(out.device)

    def resident_call(self, slot_table, in_graph) -> ResidentCall | None:
        return None


class Timed:
    """A backend whose every `add` is timed as `timer(section)` (one profiled pass of
    `moerun bench`)."""

    def __init__(self, inner: ExpertBackend, timer, section: str):
        self.inner, self.timer, self.section = inner, timer, section

    def parts(self, ready: list[int], fresh: list[int]) -> list[list[int]]:
        return self.inner.parts(ready, fresh)

    def add(self, out, x, routed, experts, rows) -> None:
        with self.timer(self.section):
            self.inner.add(out, x, routed, experts, rows)

    def resident_call(self, slot_table, in_graph) -> ResidentCall | None:
        return self.inner.resident_call(slot_table, in_graph)


def triton_mode(kernel_mode: str | None, math: ExpertMath, device: torch.device) -> str | None:
    """The Triton mode slot experts run in, or None where the kernels do not serve them.
    kernel_mode None: on CUDA by default ("auto"); "decode" | "prefill" | "auto" name a
    mode (the CPU runs them under TRITON_INTERPRET=1, which tests use); "torch": never."""
    if kernel_mode == "torch":
        return None
    if math.weights_on_input and math.fmt.bias:
        return None  # a zero-weight pair would still add expert(0) = its biases
    if not math.fmt.gated:
        return None  # the Triton kernels compute gated experts only
    from moerun import kernels

    if kernel_mode is not None:
        return kernel_mode if kernels.available(device) else None
    return "auto" if device.type == "cuda" and kernels.available(device) else None


def choose(
    slots: torch.Tensor, store: torch.Tensor, math: ExpertMath, device: torch.device, kernel_mode: str | None
) -> tuple[ExpertBackend, ExpertBackend]:
    """(the backend for experts in `slots`, the one for cold experts computed from the host
    `store`): Triton where `triton_mode` says so, else the C kernels where they read the
    format and the buffer is in host memory, else plain torch."""
    on_cpu_kernels = cpu_experts.supports(math.fmt, math.dtype) and store.device.type == "cpu"
    cold: ExpertBackend = CpuKernels(store, math) if on_cpu_kernels else TorchExperts(store, math, on_host=True)
    mode = triton_mode(kernel_mode, math, device)
    if mode is not None:
        return TritonSlots(slots, math, mode), cold
    if on_cpu_kernels and slots.device.type == "cpu":
        return CpuKernels(slots, math), cold
    return TorchExperts(slots, math, on_host=False), cold
