"""The expert cache: every expert of a layer lives in a host store (one blob per expert);
a few of them are resident in device slots, chosen by an LRU policy. Routing hands the
compute slot indices, so it does not care whether an expert was a hit.

A miss is either copied into a slot (on a side stream on CUDA, while resident experts
already run) or computed where it lives, on the CPU ("cold" experts: at batch 1 reading
an expert once from RAM beats copying it over PCIe). Next-layer prefetch guesses experts
from the current hidden state and starts their copies early.

Whatever runs on the CPU (every expert of a CPU-only model, cold experts of a GPU one)
goes through the fused CPU kernels (`moerun.kernels.cpu_experts`): one call per layer,
reading the stored bytes once, never a dequantized matrix.

Shape legend: N tokens, K experts per token, E experts, S slots, D hidden.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from moerun import graphs
from moerun.kernels import cpu_experts
from moerun.moe.experts import SILU, ExpertActivation, apply_expert, group_by_expert
from moerun.quant.format import ExpertFormat


class LRUPolicy:
    """expert -> slot map with least-recently-used eviction, for one layer. Pure Python,
    no tensors: the decisions are unit-tested on their own."""

    def __init__(self, n_experts: int, n_slots: int):
        if not 1 <= n_slots <= n_experts:
            raise ValueError(f"slots must be in [1, {n_experts}], got {n_slots}")
        self.n_slots = n_slots
        self.slot_of: dict[int, int] = {}  # resident expert -> slot
        self._order: OrderedDict[int, None] = OrderedDict()  # resident experts, least recent first
        self._free = list(range(n_slots - 1, -1, -1))

    def is_resident(self, expert: int) -> bool:
        return expert in self.slot_of

    def touch(self, expert: int) -> None:
        self._order.move_to_end(expert)

    def admit(self, expert: int, protected: set[int] = frozenset()) -> tuple[int, int | None]:
        """Give `expert` a slot: a free one, else the least recently used expert's that is
        not `protected` (in use by the current step). Returns (slot, evicted expert or None)."""
        assert expert not in self.slot_of
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            evicted = next((e for e in self._order if e not in protected), None)
            if evicted is None:
                raise RuntimeError("every slot holds an expert in use; cannot admit another")
            slot = self.slot_of.pop(evicted)
            del self._order[evicted]
        self.slot_of[expert] = slot
        self._order[expert] = None
        return slot, evicted

    def lru_order(self) -> list[int]:
        return list(self._order)


@dataclasses.dataclass
class CacheStats:
    """Per-layer counters. Every expert a forward needs is one use: a hit (resident,
    `prefetch_hits` of them because a prefetch brought it) or a miss (copied in, or
    computed on the CPU: `cpu_experts`)."""

    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0
    prefetches: int = 0
    cpu_experts: int = 0
    bytes_copied: int = 0  # host store -> device slots, misses and prefetches

    def add(self, other: "CacheStats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ColdPolicy:
    """Where to compute a non-resident expert: "gpu" copies it into a slot, "cpu" computes
    it from the host store, "auto" compares the two costs for the tokens routed to it, so
    a decode step (one token per expert) computes on the CPU and a long prompt copies.

    copy_seconds: one blob over the host->device link; cpu_fixed_seconds and
    cpu_token_seconds: reading one expert on the CPU, and applying it to each token.
    Calibrated per expert format (each layer's own) at load time (see `calibrate`)."""

    mode: str = "gpu"
    copy_seconds: float = 0.0
    cpu_fixed_seconds: float = 0.0
    cpu_token_seconds: float = 0.0

    def on_cpu(self, n_tokens: int) -> bool:
        if self.mode != "auto":
            return self.mode == "cpu"
        return self.cpu_fixed_seconds + n_tokens * self.cpu_token_seconds < self.copy_seconds

    def cpu_up_to_tokens(self) -> int:
        """Under "auto": the most tokens for which a cold expert is computed on the CPU
        (0: always copied), for the report; agrees with `on_cpu` at the boundary."""
        if self.cpu_fixed_seconds >= self.copy_seconds:
            return 0
        if self.cpu_token_seconds <= 0:
            return 1 << 30
        n = int((self.copy_seconds - self.cpu_fixed_seconds) / self.cpu_token_seconds)
        while n > 0 and not self.cpu_fixed_seconds + n * self.cpu_token_seconds < self.copy_seconds:
            n -= 1  # the division rounded up onto the boundary, where the copy wins
        return n


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
        self.act, self.weights_on_input = act, weights_on_input
        # Triton kernels read the slots directly: on CUDA by default; elsewhere only when a
        # mode is named ("decode" | "prefill" | "auto"; the CPU runs them under
        # TRITON_INTERPRET=1, which tests use). "torch" forces the plain path.
        self.kernel_mode = kernel_mode
        n_experts = store.shape[0]
        assert store.dtype == torch.uint8 and store.shape[1] == fmt.blob_bytes
        self.fmt, self.n_experts, self.n_slots = fmt, n_experts, n_slots
        self.store = store  # uint8 [E, blob_bytes], host (pinned on CUDA) or the device itself
        self.device, self.compute_dtype = torch.device(device), compute_dtype
        self.cold = cold or ColdPolicy()
        self.policy = LRUPolicy(n_experts, n_slots)
        self.stats = CacheStats()
        self.copy_stream = copy_stream
        self._ready: dict[int, object] = {}  # slot -> CUDA event marking its copy done
        self._prefetched: set[int] = set()  # resident because of a prefetch, not yet used
        self.prefetch_hook: Callable[[torch.Tensor], None] | None = None
        self.timer = None  # set by `moerun bench` for one profiled pass: times copies and CPU experts
        self._slot_table: torch.Tensor | None = None  # int32 [E] expert -> slot on the device, when fully resident
        if n_slots == n_experts and store.device == self.device:
            # Everything fits where the store already is: the store is the slot buffer.
            self.slots = store
            for e in range(n_experts):
                self.policy.admit(e)
        else:
            self.slots = torch.empty((n_slots, fmt.blob_bytes), dtype=torch.uint8, device=self.device)
            if n_slots == n_experts:  # all resident: fill once now, no misses afterwards
                for e in range(n_experts):
                    self._copy_in(e, self.policy.admit(e)[0], count=False)
                self._sync_copies()
        if self.fully_resident:
            # Built now, not in a CUDA-graph capture, where a host->device copy is illegal.
            table = [self.policy.slot_of[e] for e in range(n_experts)]
            self._slot_table = torch.tensor(table, dtype=torch.int32, device=self.device)
        # Address tables for the CPU kernels: every expert in the host store, and (on the
        # CPU) every slot; None where the kernels cannot serve this format.
        self._store_addresses = self._slot_addresses = None
        if cpu_experts.supports(fmt, compute_dtype) and self.store.device.type == "cpu":
            self._store_addresses = cpu_experts.blob_table(self.store, fmt)
            if self.slots.device.type == "cpu":
                self._slot_addresses = cpu_experts.blob_table(self.slots, fmt)

    # -- residency -------------------------------------------------------------------

    def _copy_in(self, expert: int, slot: int, count: bool = True) -> None:
        if self.timer is not None:
            with self.timer("copies"):
                self._copy(expert, slot)
        else:
            self._copy(expert, slot)
        if count:
            self.stats.bytes_copied += self.fmt.blob_bytes

    def _copy(self, expert: int, slot: int) -> None:
        src = self.store[expert]
        if self.copy_stream is not None:
            # The copy must not overwrite a slot that queued compute still reads.
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                self.slots[slot].copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            self._ready[slot] = event
        else:
            self.slots[slot].copy_(src)

    def _wait_slot(self, slot: int) -> None:
        event = self._ready.pop(slot, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def _sync_copies(self) -> None:
        for slot in list(self._ready):
            self._wait_slot(slot)

    def prefetch(self, experts: list[int]) -> None:
        """Start copying `experts` into slots ahead of their use (next-layer speculation)."""
        for e in experts:
            if self.policy.is_resident(e):
                continue
            slot, evicted = self.policy.admit(e)
            self._prefetched.discard(evicted)
            self._prefetched.add(e)
            self._copy_in(e, slot)
            self.stats.prefetches += 1

    # -- compute ---------------------------------------------------------------------

    @property
    def fully_resident(self) -> bool:
        """Every expert holds a slot for good: no miss, no eviction can ever happen."""
        return self.n_slots == self.n_experts

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if graphs.capturing():
            mode = self._kernel_mode()
            if self.fully_resident and mode is not None:
                # Inside the CUDA graph: slots from a device table, no host decision at all.
                # (The counters are not updated here: it would need a sync; a fully
                # resident layer has only hits anyway.)
                return self._resident_kernel_call(x, ids, weights, "decode" if mode == "auto" else mode)
            # Misses are decided on the host: the graph is cut here and this layer runs
            # eagerly between two replayed pieces.
            return graphs.host_boundary(self._forward, x, ids, weights)
        return self._forward(x, ids, weights)

    def _resident_kernel_call(self, x, ids, weights, mode: str) -> torch.Tensor:
        from moerun import kernels

        return kernels.fused_experts(
            x, self._slot_table[ids], weights, self.slots, self.fmt, self.compute_dtype,
            act=self.act, weights_on_input=self.weights_on_input, mode=mode,
        )  # fmt: skip

    def _cpu_call(self, x, ids, weights, addresses: torch.Tensor, out_dtype=None) -> tuple[torch.Tensor, int]:
        """The CPU kernels over the experts whose rows of `addresses` are set."""
        return cpu_experts.moe_experts(x, ids, weights, addresses, self.fmt, self.act, self.weights_on_input,
                                       out_dtype or self.compute_dtype)  # fmt: skip

    def _addresses(self, experts: list[int], source: torch.Tensor, by_slot: bool) -> torch.Tensor:
        """An address table holding only `experts` (their slots' rows, or their store rows)."""
        table = torch.zeros(self.n_experts, source.shape[1], dtype=source.dtype)
        rows = [self.policy.slot_of[e] for e in experts] if by_slot else experts
        table[experts] = source[rows]
        return table

    def _forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.fully_resident and self._slot_addresses is not None and self._kernel_mode() is None:
            # Every expert in host memory already: one kernel call, no per-expert Python.
            out, used = self._cpu_call(x, ids, weights, self._slot_addresses)
            self.stats.hits += used
            return out
        groups = {e: (rows, w) for e, rows, w in group_by_expert(ids, weights, self.n_experts)}

        # Classify every needed expert: resident (hit), computed on the CPU, or copied in.
        hits, to_copy, on_cpu = [], [], []
        for e, (rows, _) in groups.items():
            if self.policy.is_resident(e):
                hits.append(e)
                self.stats.hits += 1
                if e in self._prefetched:
                    self.stats.prefetch_hits += 1
                    self._prefetched.discard(e)
            else:
                self.stats.misses += 1
                (on_cpu if self.cold.on_cpu(rows.numel()) else to_copy).append(e)

        # Partial sums in float32 (a bf16 sum per round would round each round's experts).
        out = torch.zeros(x.shape, dtype=torch.float32 if x.device.type == "cpu" else x.dtype, device=x.device)

        def run(e: int, blob: torch.Tensor, xs: torch.Tensor, target: torch.Tensor) -> None:
            rows, w = (t.to(xs.device) for t in groups[e])
            y = apply_expert(xs[rows], w, *self.fmt.unpack(blob, self.compute_dtype), self.act, self.weights_on_input)
            target.index_add_(0, rows, y.to(target.dtype))

        # Resident experts first, then misses in rounds of at most n_slots experts: with
        # fewer slots than experts in use, a round's experts are protected from eviction.
        gpu_order = hits + to_copy
        kernel_mode = self._kernel_mode()
        for begin in range(0, len(gpu_order), self.n_slots):
            group = gpu_order[begin : begin + self.n_slots]
            protected, fresh = set(group), []
            for e in group:
                if self.policy.is_resident(e):
                    self.policy.touch(e)
                else:
                    slot, evicted = self.policy.admit(e, protected)
                    self._prefetched.discard(evicted)
                    self._copy_in(e, slot)
                    fresh.append(e)
            if begin == 0 and self.prefetch_hook is not None:
                # Queued behind this layer's own misses, ahead of its compute.
                self.prefetch_hook(x)
            if kernel_mode is None and self._slot_addresses is not None:
                # Slots in host memory (a CPU-only model with an expert budget): one call.
                table = self._addresses(group, self._slot_addresses, True)
                out += self._cpu_call(x, ids, weights, table, torch.float32)[0]
                continue
            if kernel_mode is not None:
                # One launch for the experts already resident, one for those just copied
                # in, so the first runs while the copies are still in flight.
                ready = [e for e in group if e not in fresh]
                for part in (ready, fresh):
                    if part:
                        for e in part:
                            self._wait_slot(self.policy.slot_of[e])
                        out += self._kernel_call(x, ids, weights, part, kernel_mode)
                continue
            for e in group:  # hits run first; a fresh or prefetched copy is awaited just before use
                slot = self.policy.slot_of[e]
                self._wait_slot(slot)
                run(e, self.slots[slot], x, out)
        if not gpu_order and self.prefetch_hook is not None:
            self.prefetch_hook(x)

        if on_cpu:
            with self.timer("cpu_experts") if self.timer is not None else contextlib.nullcontext():
                x_cpu = x.to("cpu")
                if self._store_addresses is not None:
                    table = self._addresses(on_cpu, self._store_addresses, False)
                    acc = self._cpu_call(x_cpu, ids.cpu(), weights.cpu(), table, out.dtype)[0]
                else:  # a format the CPU kernels do not read: dequantize and multiply
                    acc = torch.zeros_like(x_cpu)
                    for e in on_cpu:
                        run(e, self.store[e], x_cpu, acc)
                self.stats.cpu_experts += len(on_cpu)
                out += acc.to(out.device)
        return out.to(x.dtype)

    def _kernel_mode(self) -> str | None:
        """The Triton mode to use for this forward, or None for the plain torch path."""
        if self.kernel_mode == "torch":
            return None
        if self.weights_on_input and self.fmt.bias:
            return None  # a zero-weight pair would still add expert(0) = its biases
        if not self.fmt.gated:
            return None  # the Triton kernels compute gated experts only
        from moerun import kernels

        if self.kernel_mode is not None:
            return self.kernel_mode if kernels.available(self.device) else None
        return "auto" if self.device.type == "cuda" and kernels.available(self.device) else None

    def _kernel_call(self, x, ids, weights, experts: list[int], mode: str) -> torch.Tensor:
        """Σ over the pairs whose expert is in `experts` (all resident), in one launch.
        Other pairs get weight 0; the kernel still reads a slot for them, a cost paid only
        in a step that also waits for a copy, which is far slower."""
        from moerun import kernels

        table = [-1] * self.n_experts
        for e in experts:
            table[e] = self.policy.slot_of[e]
        slot_ids = torch.tensor(table, dtype=torch.int32, device=x.device)[ids]
        absent = slot_ids < 0
        return kernels.fused_experts(
            x, slot_ids.clamp_min(0), weights.masked_fill(absent, 0), self.slots, self.fmt, self.compute_dtype,
            act=self.act, weights_on_input=self.weights_on_input, mode=mode,
        )  # fmt: skip

    @property
    def intermediate_size(self) -> int:
        return self.fmt.intermediate_size

    @property
    def n_params(self) -> int:
        D, I = self.fmt.hidden_size, self.fmt.intermediate_size
        R = self.fmt.rows13  # 2I gated, I not
        return self.n_experts * (D * (R + I) + (R + D if self.fmt.bias else 0))

    def resident_bytes(self) -> int:
        """Bytes this layer holds on the compute device (the slot buffer)."""
        return self.slots.numel() if self.slots.device == self.device else 0


def make_prefetch_hook(next_router: nn.Module, next_experts: CachedExperts) -> Callable:
    """Guess the next layer's experts by applying its router (its own rule: softmax or
    sigmoid, biases, groups) to this layer's input (the speculative loading of Eliseev &
    Mazur): the residual stream changes little per layer."""

    def hook(x: torch.Tensor) -> None:
        ids, _ = next_router(x)
        guess = ids.unique().tolist()
        next_experts.prefetch(guess[: next_experts.n_slots])

    return hook
