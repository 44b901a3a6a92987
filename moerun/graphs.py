"""Decode without Python overhead: one-token steps replayed from CUDA graphs.

At batch 1 a decode step of a 32-layer MoE model is ~1,000 small kernel launches; issued
one by one from Python they cost milliseconds, as much as the weights' reading itself
on a fast card. A captured step replays them all with one call.

What makes a step capturable: fixed shapes and no host synchronisation.
- The position lives on the device (`StaticPosition`): K/V are written with index_copy_
  and attention spans a fixed bucket of the cache, the keys past the position masked.
  One graph set is captured per span bucket (256, 512, 1024, ... up to the cache).
- Expert layers whose experts are all resident run the Triton kernels through a device
  slot table, inside the graph.
- Expert layers that must decide on the host (an expert cache with misses to copy or to
  compute on the CPU, the plain-torch expert loop) call `host_boundary`: the capture is
  cut there into pieces, and on replay their ordinary eager code runs between the
  pieces, reading the piece before's outputs and writing into a buffer the piece after
  reads. The cache's copies, its LRU policy and the CPU-cold path thus stay exactly as
  without graphs.

Off CUDA (and with graphs off) `DecodeGraphs.step` runs the same static-shape step
eagerly: that is what the CPU tests hold against the ordinary decode.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Iterator

import torch

from moerun.layers import StaticPosition, context_of

log = logging.getLogger("moerun")

MIN_SPAN = 256

_capture: "_Capture | None" = None  # the capture in progress, if any: set only by `recording`


def capturing() -> bool:
    """Is a decode step being captured right now (no host syncs allowed)?"""
    return _capture is not None


def host_boundary(fn: Callable[..., torch.Tensor], x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
    """fn(x, *args) -> a tensor shaped and typed like x. Outside a capture it is just
    called. Inside one, the current graph piece ends here, fn is recorded to run eagerly
    at replay on these very tensors, and a buffer that will hold its result is returned
    for the next piece to read."""
    if _capture is None:
        return fn(x, *args)
    return _capture.split(fn, (x, *args))


@contextlib.contextmanager
def recording(session) -> Iterator[None]:
    """While the block runs, host_boundary cuts into `session` (its `split(fn, inputs)`
    ends the current piece and returns the buffer the next one reads): a capture's
    pieces, or a stand-in that runs the cut at once (the CPU tests')."""
    global _capture
    _capture = session
    try:
        yield
    finally:
        _capture = None


def graphs_enabled(device: torch.device) -> bool:
    """CUDA graphs for decode: on CUDA unless MOERUN_CUDA_GRAPHS=0."""
    return device.type == "cuda" and os.environ.get("MOERUN_CUDA_GRAPHS", "1") not in ("0", "")


class _HostStep:
    def __init__(self, fn, inputs: tuple[torch.Tensor, ...], out: torch.Tensor):
        self.fn, self.inputs, self.out = fn, inputs, out

    def run(self) -> None:
        self.out.copy_(self.fn(*self.inputs))


class _Capture:
    """Pieces of one captured step: CUDA graphs sharing one memory pool (so they must be
    replayed in capture order, which they are) and host steps between them."""

    def __init__(self, pool):
        self.pool = pool
        self.pieces: list = []
        self.graph: torch.cuda.CUDAGraph | None = None

    def begin(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.graph.capture_begin(pool=self.pool)

    def end(self) -> None:
        self.graph.capture_end()
        self.pieces.append(self.graph)
        self.graph = None

    def split(self, fn, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        self.end()
        # Outside any capture: a plain allocation that lives as long as the pieces do.
        out = torch.empty_like(inputs[0])
        self.pieces.append(_HostStep(fn, inputs, out))
        self.begin()
        return out


class CapturedStep:
    """A captured decode step: `replay()` runs its pieces and returns the logits buffer
    (overwritten by the next replay)."""

    def __init__(self, pieces: list, logits: torch.Tensor):
        self.pieces, self.logits = pieces, logits

    @property
    def n_graphs(self) -> int:
        return sum(isinstance(p, torch.cuda.CUDAGraph) for p in self.pieces)

    @property
    def n_host_steps(self) -> int:
        return sum(isinstance(p, _HostStep) for p in self.pieces)

    def replay(self) -> torch.Tensor:
        for piece in self.pieces:
            if isinstance(piece, _HostStep):
                piece.run()
            else:
                piece.replay()
        return self.logits


def capture(fn: Callable[[], torch.Tensor], device: torch.device) -> CapturedStep:
    """Capture fn() (which must already have run once eagerly with the same shapes, so
    that kernels are compiled and lazy state is set up) on a side stream."""
    torch.cuda.synchronize(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    session = _Capture(torch.cuda.graph_pool_handle())
    with torch.cuda.stream(stream), recording(session):
        try:
            session.begin()
            logits = fn()
            session.end()
        finally:
            if session.graph is not None:  # fn raised mid-capture: close it so the stream is usable
                try:
                    session.graph.capture_end()
                except RuntimeError:
                    pass
    torch.cuda.current_stream(device).wait_stream(stream)
    return CapturedStep(session.pieces, logits)


def span_for(position: int, max_len: int, min_span: int = MIN_SPAN) -> int:
    """The attention span bucket for a token at `position`: the smallest power of two
    above it (at least min_span), capped at the cache length."""
    return min(max(min_span, 1 << position.bit_length()), max_len)


class DecodeGraphs:
    """One-token decode steps of `lm` over `caches` (a fixed set of KV caches: graphs
    hold their addresses). step(token, position) -> logits [1, 1, V].

    On CUDA with capture on, the first step of each span bucket runs eagerly (it also
    warms up every kernel) and is then captured; later steps of that bucket replay it.
    Elsewhere every step runs eagerly with the same static shapes."""

    def __init__(self, lm, caches: list, capture_graphs: bool | None = None, min_span: int = MIN_SPAN):
        self.lm, self.caches, self.min_span = lm, caches, min_span
        self.device = lm.lm_head.weight.device
        self.capture_graphs = graphs_enabled(self.device) if capture_graphs is None else capture_graphs
        if self.capture_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.max_len = context_of(caches)
        self.tokens = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self.index = torch.zeros((1,), dtype=torch.long, device=self.device)
        self.steps: dict[int, CapturedStep] = {}

    def _eager(self, span: int) -> torch.Tensor:
        return self.lm(self.tokens, self.caches, StaticPosition(self.index, span))

    def step(self, token: int, position: int) -> torch.Tensor:
        if not 0 <= position < self.max_len:
            from moerun.layers import context_full

            raise context_full(position + 1, self.max_len)
        # fill_ with a Python number is a kernel launch, not a host->device copy.
        self.tokens.fill_(token)
        self.index.fill_(position)
        span = span_for(position, self.max_len, self.min_span)
        captured = self.steps.get(span)
        if captured is not None:
            return captured.replay()
        logits = self._eager(span)
        if self.capture_graphs:
            try:
                self.steps[span] = capture(lambda: self._eager(span), self.device)
            except RuntimeError as e:
                # An op that cannot be captured on this torch/driver: decode stays correct,
                # just eager. Said once, as a warning, not an error.
                self.capture_graphs = False
                self.steps.clear()
                log.warning("CUDA graph capture failed (%s); decoding without graphs", str(e).splitlines()[0])
        return logits
