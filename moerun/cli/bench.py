"""`moerun bench`: prompt processing (ppN) and generation (tgN) tokens/sec, llama-bench style."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from typing import Optional

import typer

from moerun.cli.loading import pull_on_first_use
from moerun.cli.options import LOADING, checked, int_list, loading_options, spec_of
from moerun.cli.render import Display, Ticker
from moerun.spec import LoadSpec, check_cold


@loading_options(without=("bits", "vram", "cold", "prefetch"))
def bench(
    model: Optional[str] = typer.Argument(None, help="Alias, Hub repo id or local folder (or use --synthetic)."),
    prompt_tokens: str = typer.Option(
        "512", "-p", "--n-prompt", help="Prompt tokens for pp tests; a comma list sweeps; 0 skips."
    ),
    gen_tokens: str = typer.Option(
        "128", "-n", "--n-gen", help="Generated tokens for tg tests; a comma list sweeps; 0 skips."
    ),
    repetitions: int = typer.Option(
        3, "-r", "--repetitions", min=1, max=1000, help="Timed runs per test (after one warm-up), 1 to 1000."
    ),
    bits: str = typer.Option("4", "--bits", "-b", help="Expert bits: 4, 8, 16; a comma list sweeps."),
    vram: Optional[str] = typer.Option(None, "--vram", help="Device budget(s), e.g. 12GiB or 12GiB,24GiB."),
    cold: str = typer.Option("gpu", "--cold", help="gpu, cpu or auto; a comma list sweeps."),
    cuda_graphs: str = typer.Option(
        "on", "--cuda-graphs", help="on, off or on,off: replay tg decode steps from CUDA graphs (CUDA only)."
    ),
    synthetic: Optional[str] = typer.Option(
        None, "--synthetic", help="Benchmark ALIAS's real shapes with random weights, no download."
    ),
    layers: Optional[int] = typer.Option(
        None, "--layers", min=1, help="With --synthetic: keep only the first N layers."
    ),
    output: str = typer.Option("md", "-o", "--output", help="md or json."),
    spec: LoadSpec = LOADING,
) -> None:
    """Measure prompt processing (ppN) and generation (tgN) tokens/sec, llama-bench style."""
    if output not in ("md", "json"):
        raise typer.BadParameter("use md or json", param_hint="'-o'")
    bits_list = int_list(bits, "'--bits'")
    for b in bits_list:
        spec_of(bits=b)
    pp, tg = int_list(prompt_tokens, "'-p'"), int_list(gen_tokens, "'-n'")
    colds = cold.split(",")
    for c in colds:
        checked(check_cold)(c)
    from moerun import bench as benchmark

    vrams = vram.split(",") if vram else [None]
    graph_flags = cuda_graphs.split(",")
    if any(g not in ("on", "off") for g in graph_flags):
        raise typer.BadParameter("use on, off or on,off", param_hint="'--cuda-graphs'")
    graph_modes = [g == "on" for g in graph_flags]
    # pp runs once per combination, tg once per graph mode (an estimate on the CPU, where graphs are off).
    tests = sum(1 for v in pp if v) + sum(1 for v in tg if v) * len(set(graph_modes))
    runs = len(bits_list) * len(vrams) * len(colds) * tests * repetitions
    with Display() as display:
        if model is not None and synthetic is None:
            first = dataclasses.replace(spec, bits=bits_list[0], vram=vrams[0])
            pull_on_first_use(model, first, display)
        if sys.stderr.isatty():
            ticker, advance = contextlib.nullcontext(), display.counter("bench", runs)
        else:  # piped: a Rich bar would stay silent until the end, so plain lines every few seconds
            ticker = Ticker("bench", runs)
            advance = ticker.advance
        with ticker:
            report = benchmark.run_bench(
                model=model,
                synthetic=synthetic,
                prompt_tokens=pp,
                gen_tokens=tg,
                repetitions=repetitions,
                bits=bits_list,
                vram=vrams,
                cold=colds,
                cuda_graphs=graph_modes,
                layers=layers,
                spec=spec,
                progress=advance,
            )
    if output == "json":
        sys.stdout.write(json.dumps(report, default=str) + "\n")
    else:
        sys.stdout.write(benchmark.render_markdown(report) + "\n")
