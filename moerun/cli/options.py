"""The options verbs share, declared once: sampling, and the one group of loading options
that makes a LoadSpec (moerun.spec checks every value; a refusal here is a usage error
naming its flag). Adding a loading option: a LoadSpec field, one LoadOption below, and
the code that uses the field."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Optional

import typer

from moerun.spec import LoadSpec, OptionError, check_cold, check_threads


def checked(check):
    """An option callback from one of moerun.spec's checks: its refusal as a usage error."""

    def callback(value):
        try:
            return check(value)
        except OptionError as e:
            raise typer.BadParameter(e.usage) from None

    return callback


def spec_of(**fields) -> LoadSpec:
    """A LoadSpec from option values; a value it refuses is a usage error on its flag."""
    try:
        return LoadSpec(**fields)
    except OptionError as e:
        raise typer.BadParameter(e.usage, param_hint=f"'{e.flag}'") from None


def _top_p(value: float) -> float:
    if not 0 < value <= 1:
        raise typer.BadParameter(f"{value} is not in (0, 1]")
    return value


# Options shared by `generate` and `chat`, declared once so that the two verbs agree.
MaxNewTokens = typer.Option(128, "--max-new-tokens", "-n", min=1, help="Most tokens to generate per reply.")
Temperature = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 means greedy decoding.")
TopP = typer.Option(1.0, "--top-p", callback=_top_p, help="Nucleus sampling mass in (0, 1] (1.0: off).")
TopK = typer.Option(0, "--top-k", min=0, help="Sample among the k likeliest tokens (0: off).")
Seed = typer.Option(None, "--seed", min=0, max=(1 << 63) - 1, help="Random seed for sampling (0 to 2**63-1).")
Verbose = typer.Option(False, "--verbose", "-v", help="Also print the memory plan and timings to stderr.")


def sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: Optional[int]) -> dict:
    return dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)


@dataclasses.dataclass(frozen=True)
class LoadOption:
    """One loading option: the LoadSpec field it sets, the verb parameter's type and Typer
    option, and its name there when the flag says it the other way round (--no-prefetch)."""

    field: str
    annotation: object
    option: object
    param: str = ""  # the field's name unless given
    negated: bool = False

    @property
    def name(self) -> str:
        return self.param or self.field


# The loading options, declared once: each sets one LoadSpec field, which moerun.spec checks.
# A verb takes them with a `spec: LoadSpec = LOADING` parameter (see `loading_options`).
LOAD_OPTIONS = (
    LoadOption("bits", int, typer.Option(16, "--bits", "-b", help="Expert weight bits: 4, 8 or 16.")),
    LoadOption("device", str, typer.Option("auto", "--device", "-d", help="auto, cpu or cuda.")),
    LoadOption(
        "vram",
        Optional[str],
        typer.Option(None, "--vram", help="Device memory budget, e.g. 12GiB (default: free VRAM minus a reserve)."),
    ),
    LoadOption(
        "ram", Optional[str], typer.Option(None, "--ram", help="Host memory budget for the expert store, e.g. 32GiB.")
    ),
    LoadOption(
        "expert_slots",
        Optional[int],
        typer.Option(None, "--expert-slots", min=1, help="Expert slots per MoE layer (overrides the planner)."),
    ),
    LoadOption(
        "cold",
        str,
        typer.Option(
            "gpu",
            "--cold",
            callback=checked(check_cold),
            help="Where non-resident experts run: gpu (copied in), cpu, or auto.",
        ),
    ),
    LoadOption(
        "ctx",
        Optional[int],
        typer.Option(
            None, "--ctx", min=16, help="Context length to plan the KV cache for (default: min(model's, 4096))."
        ),
    ),
    LoadOption(
        "prefetch",
        bool,
        typer.Option(False, "--no-prefetch", help="Do not guess and copy the next layer's experts early."),
        param="no_prefetch",
        negated=True,
    ),
    LoadOption(
        "force",
        bool,
        typer.Option(False, "--force", help="Download and load even when the fit check says it will not fit."),
    ),
    LoadOption(
        "dtype",
        str,
        typer.Option(
            "auto",
            "--dtype",
            help="Non-expert weights and compute: auto (as stored; "
            "float32 on a CPU without native bf16/fp16), bfloat16, float16 or float32.",
        ),
    ),
    LoadOption(
        "threads",
        Optional[int],
        typer.Option(
            None,
            "--threads",
            callback=checked(check_threads),
            help="CPU threads for the CPU kernels and torch (default: the cores; at most 4 per core).",
        ),
    ),
    LoadOption(
        "revision",
        Optional[str],
        typer.Option(None, "--revision", help="A revision in the local cache: branch, tag or commit (never pulled)."),
    ),
)
LOADING = object()  # the default of a verb's `spec` parameter: where the loading options go


def loading_options(*, without: tuple[str, ...] = ()):
    """Give a verb the loading options (less the fields in `without`, which it declares its
    own way) in place of its `spec: LoadSpec = LOADING` parameter, and call it with the one
    LoadSpec they make."""
    options = [o for o in LOAD_OPTIONS if o.field not in without]

    def wrap(verb):
        hints = typing.get_type_hints(verb)
        params = []
        for p in inspect.signature(verb).parameters.values():
            if p.name != "spec":
                params.append(p.replace(kind=p.KEYWORD_ONLY, annotation=hints[p.name]))
                continue
            for o in options:
                params.append(inspect.Parameter(o.name, p.KEYWORD_ONLY, default=o.option, annotation=o.annotation))

        def run(**kwargs):
            fields = {o.field: kwargs.pop(o.name) for o in options}
            fields.update({o.field: not fields[o.field] for o in options if o.negated})
            return verb(spec=spec_of(**fields), **kwargs)

        run.__name__, run.__doc__, run.__module__ = verb.__name__, verb.__doc__, verb.__module__
        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return wrap


def int_list(text: str, hint: str) -> list[int]:
    """'512' or '128,256' -> whole numbers, none negative."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a whole number or a comma list of them, e.g. 512 or 128,256", param_hint=hint
        ) from None
    if any(v < 0 for v in values):
        raise typer.BadParameter(f"{text!r}: counts cannot be negative", param_hint=hint)
    return values
