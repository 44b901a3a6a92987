"""The `moerun` command: a thin Typer shell over the library, rendered with Rich.

One module per verb (generate, chat, serve, bench, models, fit, pull, ls, rm, show), as
Ollama's cmd/: each parses its options, calls the library and prints. The loading options
are declared once (`options`); what a load reports arrives as typed progress events,
drawn by `render`. Errors are turned into one `error: <message>` line in `main()`, once
for all verbs. Torch is imported only inside the verbs that need a model, so `--help` and
`models` are quick.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from moerun import __version__
from moerun.cli import bench, chat, fit, generate, library, models, pull, serve
from moerun.errors import MoerunError


def _flag_type(display_type_rich):
    """Typer's help shows `<bool>` after flags, which take no value: show nothing there."""

    def display(self, ctx):
        return None if getattr(self, "is_flag", False) else display_type_rich(self, ctx)

    return display


if getattr(typer.core.TyperOption, "display_type_rich", None) is not None:  # Typer >= 0.24 prints option types
    typer.core.TyperOption.display_type_rich = _flag_type(typer.core.TyperOption.display_type_rich)

app = typer.Typer(
    name="moerun",
    help="Run Mixture-of-Experts language models on one consumer GPU (or the CPU).",
    no_args_is_help=True,
    add_completion=False,
    # Tracebacks are main()'s business (MOERUN_DEBUG=1); Typer must not pretty-print them.
    pretty_exceptions_enable=False,
)
# One module per verb; registered in the order `moerun --help` lists them.
app.command()(generate.generate)
app.command()(chat.chat)
app.command()(serve.serve)
app.command()(bench.bench)
app.command()(models.models)
app.command()(fit.fit)
app.command()(pull.pull)
app.command("ls")(library.ls_)
app.command("rm")(library.rm_)
app.command("show")(library.show_)

# Errors a user can cause with a bad path or option; anything else is a bug in moerun.
USER_ERRORS = (MoerunError, FileNotFoundError, ValueError)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"moerun {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Run Mixture-of-Experts language models on one consumer GPU (or the CPU)."""


def _one_line(exc: BaseException) -> str:
    # Exactly one line, whatever the message: scripts grep for `error:`.
    msg = " ".join(str(exc).split())
    return msg or type(exc).__name__


def main() -> None:
    """Console-script entry: run the app, turning every exception into one `error:` line
    (usage errors too: exit code 2, as click gives them, but one line, not a box). A verb's
    live displays (spinner, bars) are gone by then: each verb closes its own."""
    # Typer's own click (vendored in typer._click, or click itself), found without naming it.
    clicks = sys.modules[typer.BadParameter.__module__]

    debug = os.environ.get("MOERUN_DEBUG", "") not in ("", "0")
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(code) from a verb
            sys.exit(code)
    except clicks.NoArgsIsHelpError as exc:  # bare `moerun` or a bare group: the help
        exc.show()
        sys.exit(exc.exit_code)
    except clicks.ClickException as exc:
        sys.stderr.write(f"error: {_one_line(exc.format_message())}\n")
        sys.exit(exc.exit_code)
    except typer.Abort:  # Ctrl-C or EOF outside a verb's own handling
        sys.stderr.write("Aborted!\n")
        sys.exit(1)
    except USER_ERRORS as exc:
        if debug:
            raise
        sys.stderr.write(f"error: {_one_line(exc)}\n")
        sys.exit(1)
    except Exception as exc:  # a bug: still no traceback for users, but say how to get one
        if debug:
            raise
        sys.stderr.write(f"error: {type(exc).__name__}: {_one_line(exc)} (set MOERUN_DEBUG=1 for a traceback)\n")
        sys.exit(1)
