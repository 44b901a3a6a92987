"""Expert residency: where each expert of one MoE layer lives. Every expert is in a host
store (one blob per expert); `n_slots` of them are resident in device slots, chosen by an
LRU policy. Given the experts a forward needs, the residency says which are hits, copies
misses into slots (on a side stream on CUDA) or leaves them where they lie to be computed
on the CPU ("cold"), prefetches, and counts. It hands back expert -> slot, never computes
an expert: that is a backend's work (`moerun.moe.backends`).

Shape legend: E experts, S slots.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import OrderedDict
from typing import Callable, Iterator

import torch
from torch import nn


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


class ExpertResidency:
    """The experts of one layer: `store` (uint8 [E, blob_bytes], host memory, pinned on
    CUDA, or the device itself) and `n_slots` slots on `device`, with the LRU policy,
    the copies and their CUDA events, prefetch and the counters."""

    def __init__(
        self, store: torch.Tensor, n_slots: int, device: torch.device, cold: ColdPolicy | None = None, copy_stream=None
    ):
        assert store.dtype == torch.uint8 and store.dim() == 2
        self.store, self.n_experts, self.n_slots = store, store.shape[0], n_slots
        self.blob_bytes = store.shape[1]
        self.device = torch.device(device)
        self.cold = cold or ColdPolicy()
        self.policy = LRUPolicy(self.n_experts, n_slots)
        self.stats = CacheStats()
        self.copy_stream = copy_stream
        self._ready: dict[int, object] = {}  # slot -> CUDA event marking its copy done
        self._prefetched: set[int] = set()  # resident because of a prefetch, not yet used
        # Called with a forward's input once its own copies are queued (next-layer prefetch).
        self.prefetch_next: Callable[[torch.Tensor], None] | None = None
        self._copy_timer = None  # a section timer while `moerun bench` profiles one pass
        self.slot_table: torch.Tensor | None = None  # int32 [E] expert -> slot on the device, when fully resident
        if self.fully_resident and store.device == self.device:
            # Everything fits where the store already is: the store is the slot buffer.
            self.slots = store
            for e in range(self.n_experts):
                self.policy.admit(e)
        else:
            self.slots = torch.empty((n_slots, self.blob_bytes), dtype=torch.uint8, device=self.device)
            if self.fully_resident:  # fill once now, no misses afterwards
                for e in range(self.n_experts):
                    self._copy_in(e, self.policy.admit(e)[0], count=False)
                self._sync_copies()
        if self.fully_resident:
            # Built now, not in a CUDA-graph capture, where a host->device copy is illegal.
            table = [self.policy.slot_of[e] for e in range(self.n_experts)]
            self.slot_table = torch.tensor(table, dtype=torch.int32, device=self.device)

    @property
    def fully_resident(self) -> bool:
        """Every expert holds a slot for good: no miss, no eviction can ever happen."""
        return self.n_slots == self.n_experts

    def resident_bytes(self) -> int:
        """Bytes held on the compute device (the slot buffer)."""
        return self.slots.numel() if self.slots.device == self.device else 0

    # -- a forward's experts -----------------------------------------------------------

    def place(self, tokens_per_expert: dict[int, int]) -> tuple[list[int], list[int]]:
        """Classify the experts a forward needs (expert -> tokens routed to it) and count
        them: returns (experts to run from slots, hits first then misses to copy in;
        misses to compute where they lie, from the host store)."""
        hits, to_copy, cold = [], [], []
        for e, n_tokens in tokens_per_expert.items():
            if self.policy.is_resident(e):
                hits.append(e)
                self.stats.hits += 1
                if e in self._prefetched:
                    self.stats.prefetch_hits += 1
                    self._prefetched.discard(e)
            else:
                self.stats.misses += 1
                (cold if self.cold.on_cpu(n_tokens) else to_copy).append(e)
        self.stats.cpu_experts += len(cold)
        return hits + to_copy, cold

    def rounds(self, in_slots: list[int], x: torch.Tensor) -> Iterator[tuple[list[int], list[int]]]:
        """Bring `in_slots` (from `place`) into slots, in rounds of at most n_slots experts,
        protected from eviction while their round runs (fewer slots than experts in use).
        Yields each round's (ready: resident already, fresh: copies just queued; `wait`
        for them before reading their slots). The next layer's prefetch from `x` is queued
        behind this layer's first copies, ahead of its compute."""
        if not in_slots and self.prefetch_next is not None:
            self.prefetch_next(x)
        for begin in range(0, len(in_slots), self.n_slots):
            group = in_slots[begin : begin + self.n_slots]
            protected, ready, fresh = set(group), [], []
            for e in group:
                if self.policy.is_resident(e):
                    self.policy.touch(e)
                    ready.append(e)
                else:
                    slot, evicted = self.policy.admit(e, protected)
                    self._prefetched.discard(evicted)
                    self._copy_in(e, slot)
                    fresh.append(e)
            if begin == 0 and self.prefetch_next is not None:
                self.prefetch_next(x)
            yield ready, fresh

    def slots_of(self, experts: list[int]) -> list[int]:
        return [self.policy.slot_of[e] for e in experts]

    def wait(self, experts: list[int]) -> None:
        """Make the compute stream wait for the copies of `experts` still in flight."""
        if self._ready:
            for e in experts:
                self._wait_slot(self.policy.slot_of[e])

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

    @contextlib.contextmanager
    def timed_copies(self, timer):
        """Time every copy into a slot as `timer("copies")` (one profiled pass of `moerun bench`)."""
        self._copy_timer = timer
        try:
            yield
        finally:
            self._copy_timer = None

    # -- copies ------------------------------------------------------------------------

    def _copy_in(self, expert: int, slot: int, count: bool = True) -> None:
        if self._copy_timer is not None:
            with self._copy_timer("copies"):
                self._copy(expert, slot)
        else:
            self._copy(expert, slot)
        if count:
            self.stats.bytes_copied += self.blob_bytes

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


def make_prefetch_hook(next_router: nn.Module, next_layer: ExpertResidency) -> Callable:
    """Guess the next layer's experts by applying its router (its own rule: softmax or
    sigmoid, biases, groups) to this layer's input (the speculative loading of Eliseev &
    Mazur): the residual stream changes little per layer."""

    def hook(x: torch.Tensor) -> None:
        ids, _ = next_router(x)
        guess = ids.unique().tolist()
        next_layer.prefetch(guess[: next_layer.n_slots])

    return hook
