"""The checks every architecture passes against transformers, in one place: each family's
test file calls them on its own tiny checkpoints."""

from __future__ import annotations

import sys
import weakref

import torch
from torch.overrides import TorchFunctionMode

import moerun


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_logits(ours, ref, vocab: int = 256) -> None:
    """float32 logits within 1e-4 relative error of the reference's, [2, 17] random ids."""
    ids = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits.float()
    got = ours.logits(ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert rel_err(got, expected) < 1e-4


def check_correction_bias(ours, folder, layer: int, bf16_layer: int | None = None) -> None:
    """The router's correction bias at `layer` is loaded (not zero) and changes the logits
    when zeroed; in a bf16 load it stays float32 beside bf16 router weights (at
    `bf16_layer`, by default `layer`)."""
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    gate = ours.lm.model.layers[layer].mlp.gate
    bias = gate.e_score_correction_bias.clone()
    assert bias.abs().sum() > 0
    with torch.no_grad():
        gate.e_score_correction_bias.zero_()
        without = ours.logits(ids)
        gate.e_score_correction_bias.copy_(bias)
    assert rel_err(without, ours.logits(ids)) > 1e-3
    half = moerun.load(str(folder), device="cpu", dtype=torch.bfloat16)
    half_gate = half.lm.model.layers[layer if bf16_layer is None else bf16_layer].mlp.gate
    assert half_gate.e_score_correction_bias.dtype == torch.float32
    assert half_gate.weight.dtype == torch.bfloat16


def sanitize_args(module, arch: str, **config):
    """`module`'s ModelArgs for one layer as small as check_sanitize_stacks_experts' tensors
    (hidden size 4, two experts under either name, one picked), then `config`."""
    tiny = dict(vocab_size=8, hidden_size=4, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    experts = dict(num_experts_per_tok=1, num_local_experts=2, num_experts=2)
    return module.ModelArgs.from_dict({"model_type": arch, **tiny, **experts, **config})


def check_sanitize_stacks_experts(
    module, args, prefix: str, others: dict, inter: int = 3, names=("gate_proj", "up_proj", "down_proj")
) -> None:
    """The family's sanitize stacks two experts stored one tensor per expert and projection
    (`{prefix}.{e}.{name}.weight`, hidden size 4) into w13 [2, 2*inter, 4] and w2
    [2, 4, inter], keeps the `others` tensors, and leaves its own output as it is."""
    fake = dict(others)
    for e in range(2):
        fake[f"{prefix}.{e}.{names[0]}.weight"] = torch.full((inter, 4), 10.0 * e + 1)
        fake[f"{prefix}.{e}.{names[1]}.weight"] = torch.full((inter, 4), 10.0 * e + 3)
        fake[f"{prefix}.{e}.{names[2]}.weight"] = torch.full((4, inter), 10.0 * e + 2)
    out = module.sanitize(fake, args)
    assert set(out) == {f"{prefix}.w13", f"{prefix}.w2", *others}
    assert out[f"{prefix}.w13"].shape == (2, 2 * inter, 4) and out[f"{prefix}.w2"].shape == (2, 4, inter)
    # Gate rows first, then up rows: expert 1's gate is 11, its up 13.
    assert out[f"{prefix}.w13"][1, 0, 0] == 11 and out[f"{prefix}.w13"][1, -1, 0] == 13
    assert module.sanitize(out, args).keys() == out.keys()


_GREEDY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def reference_greedy(ref, prompt: list[int], n: int) -> list[int]:
    """The reference's n greedy tokens after `prompt` by full forwards (no cache anywhere).
    Kept per reference model: the family tests ask for the same continuation twice (in
    process and through the CLI), and on the slow references it is most of their time."""
    known = _GREEDY.setdefault(ref, {})
    key = tuple(prompt)
    if len(known.get(key, ())) < n:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(n):
                ids = torch.cat([ids, ref(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        known[key] = ids[0, len(prompt) :].tolist()
    return known[key][:n]


def check_greedy_32(ours, ref, with_hf_generate: bool = True) -> list[int]:
    """32 greedy tokens equal to greedy full forwards of the reference (no cache anywhere),
    and to transformers' own generate() up to where it stops at its eos ids."""
    prompt = ours.tokenizer.encode("The quick brown fox")
    out = ours.generate(prompt, max_new_tokens=32, ignore_eos=True)
    assert len(out.token_ids) == 32 and out.stats.finish_reason == "length"
    assert out.token_ids == reference_greedy(ref, prompt, 32)
    if with_hf_generate:
        with torch.no_grad():
            hf = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt) :].tolist()
        assert out.token_ids[: len(hf)] == hf
    return out.token_ids


def check_kv_cache_decode(ours, vocab: int = 256) -> None:
    """Prefill 8 tokens, decode 12 one at a time: equal to one full forward of all 20."""
    lm = ours.lm
    ids = torch.randint(0, vocab, (1, 20), generator=torch.Generator().manual_seed(1))
    full = ours.logits(ids)
    caches = lm.make_caches(1, 20)
    with torch.no_grad():
        stepwise = [lm(ids[:, :8], caches, 0)]
        for t in range(8, 20):
            stepwise.append(lm(ids[:, t : t + 1], caches, t))
    assert rel_err(torch.cat(stepwise, dim=1), full) < 1e-5


class NoHostSync(TorchFunctionMode):
    """Fails on any tensor operation that a CUDA-graph capture forbids: reading a value
    back to the host (item, bool, int, tolist, cpu, indexing by a 0-d tensor or a mask)
    or making a shape from the data (nonzero, bincount, unique, ...). On the CPU such calls
    are harmless, so this is how the CPU tests see them. Triton's interpreter (which
    copies tensors to numpy by design) is let through: on a GPU the kernels compile."""

    FORBIDDEN = {
        "item",
        "tolist",
        "numpy",
        "cpu",
        "__bool__",
        "__int__",
        "__float__",
        "__index__",
        "nonzero",
        "argwhere",
        "bincount",
        "unique",
        "unique_consecutive",
        "masked_select",
    }

    def __init__(self):
        super().__init__()
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if not self.paused and not caller.startswith("triton"):
            name = getattr(func, "__name__", "")
            if name in self.FORBIDDEN:
                raise AssertionError(f"host sync in a captured decode step: {name} (called from {caller})")
            if name == "repeat_interleave" and isinstance(
                kwargs.get("repeats", args[1] if len(args) > 1 else None), torch.Tensor
            ):
                raise AssertionError(f"host sync in a captured decode step: repeat_interleave by a tensor ({caller})")
            if name in ("__getitem__", "__setitem__") and _syncing_index(args[1]):
                raise AssertionError(f"host sync in a captured decode step: {name} by a 0-d or bool tensor ({caller})")
        return func(*args, **kwargs)


def _syncing_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(
        isinstance(i, torch.Tensor) and (i.dtype == torch.bool or (i.dim() == 0 and not i.is_floating_point()))
        for i in items
    )


class RunOnTheSpot:
    """Stands in for a capture session on the CPU: records where the graph would be cut
    and runs the host step at once (a real capture defers it to every replay), with the
    sync detector paused there: host steps may sync, the pieces between them may not."""

    def __init__(self, detector: NoHostSync | None = None):
        self.cuts, self.detector = [], detector

    def split(self, fn, inputs):
        self.cuts.append(fn.__self__)
        if self.detector is None:
            return fn(*inputs)
        self.detector.paused = True
        try:
            return fn(*inputs)
        finally:
            self.detector.paused = False


def static_steps(lm, caches, ids, start: int, as_if_capturing: bool) -> tuple[torch.Tensor, list]:
    """Decode ids[start:] one token at a time through DecodeGraphs (spans of 4, 8, 16, ...)
    -> (logits [1, T, V], where a capture would be cut). as_if_capturing: in-graph code
    paths, under NoHostSync."""
    from moerun import graphs

    steps = graphs.DecodeGraphs(lm, caches, capture_graphs=False, min_span=4)
    if not as_if_capturing:
        return torch.cat([steps.step(int(ids[0, t]), t) for t in range(start, ids.shape[1])], dim=1), []
    tokens = [int(ids[0, t]) for t in range(start, ids.shape[1])]
    detector = NoHostSync()
    session = RunOnTheSpot(detector)
    with graphs.recording(session), detector:
        out = [steps.step(token, t) for t, token in enumerate(tokens, start)]
    return torch.cat(out, dim=1), session.cuts


def caches_full_of_garbage(lm, max_len: int) -> list:
    """lm's states for one sequence of max_len, every float buffer noise: stale KV entries
    past the position must be masked out, and a recurrent state must start afresh at
    position 0 (a new sequence)."""
    caches = lm.make_caches(1, max_len)
    for cache in (c for c in caches if c is not None):
        for buffer in cache.buffers():
            if buffer.is_floating_point():
                buffer.normal_(0.0, 3.0, generator=torch.Generator().manual_seed(3))
    return caches


def check_static_decode(ours, vocab: int = 256) -> None:
    """The CUDA-graph decode step (position on the device, attention over a fixed span of
    the cache), run eagerly through DecodeGraphs as if being captured: equal to the
    ordinary decode, across a change of span bucket (16 -> 24, the cache's end), with
    garbage in the unused cache, and without a host sync outside the expert layers."""
    lm = ours.lm
    ids = torch.randint(0, vocab, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        caches = lm.make_caches(1, 24)
        lm(ids[:, :8], caches, 0)
        expected = torch.cat([lm(ids[:, t : t + 1], caches, t) for t in range(8, 20)], dim=1)

        caches = caches_full_of_garbage(lm, 24)
        lm(ids[:, :8], caches, 0)
        got, _ = static_steps(lm, caches, ids, 8, as_if_capturing=True)
    assert rel_err(got, expected) < 1e-5


def check_offloaded_4bit_equals_resident(folder) -> None:
    """4-bit experts with one slot per layer give the logits of 4-bit fully resident."""
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(5))
    expected = moerun.load(str(folder), bits=4, device="cpu", dtype="float32").logits(ids)
    offloaded = moerun.load(str(folder), bits=4, device="cpu", dtype="float32", expert_slots=1)
    assert rel_err(offloaded.logits(ids), expected) < 1e-6
    assert offloaded.stats["total"]["misses"] > 0


def run_main(*args: str) -> int:
    """`moerun ARGS` through moerun.cli.main in this process (sys.argv set for the call,
    as the console script would) -> its exit code."""
    from moerun.cli import main

    argv, sys.argv = sys.argv, ["moerun", *args]
    try:
        main()
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv


def check_cli_greedy(folder, ref, n: int = 32) -> None:
    """`moerun generate --json` (the CLI's own entry point, a fresh load: the state carried
    across its decode steps) gives the reference's greedy tokens: all n, or up to the eos
    it stopped at. In-process: a process per family cost ~3 s of imports each in CI."""
    import io
    import json
    from contextlib import redirect_stderr, redirect_stdout

    stdout, stderr = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            code = run_main(
                "generate",
                str(folder),
                "The quick brown fox",
                "--raw",
                "--json",
                "-n",
                str(n),
                "--device",
                "cpu",
                "--dtype",
                "float32",
            )
    finally:
        torch.set_num_threads(threads)
    assert code == 0, stderr.getvalue()
    out = json.loads(stdout.getvalue())
    prompt = out["stats"]["prompt_tokens"]
    from moerun.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(folder).encode("The quick brown fox")
    assert len(ids) == prompt
    assert out["token_ids"] == reference_greedy(ref, ids, n)[: len(out["token_ids"])]
    assert len(out["token_ids"]) == n or out["stats"]["finish_reason"] == "stop"


def check_second_generation_equals_a_fresh_one(ours, folder) -> None:
    """A reply after another equals a fresh model's reply: no state leaks across prompts."""
    ours.generate("first prompt, to leave state behind", max_new_tokens=6, ignore_eos=True)
    again = ours.generate("The quick brown fox", max_new_tokens=12, ignore_eos=True)
    fresh = moerun.load(str(folder), device="cpu", dtype="float32").generate(
        "The quick brown fox", max_new_tokens=12, ignore_eos=True
    )
    assert again.token_ids == fresh.token_ids
