"""`moerun serve`: a model over HTTP (OpenAI's /v1 and Ollama's /api)."""

from __future__ import annotations

from typing import Optional

import typer

from moerun.cli.loading import load
from moerun.cli.options import LOADING, Seed, TopK, TopP, loading_options
from moerun.cli.render import Display
from moerun.errors import MoerunError
from moerun.spec import LoadSpec


@loading_options()
def serve(
    model: str = typer.Argument(..., help="Alias (see `moerun models`), Hub repo id or local folder."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535, help="TCP port (0: any free one, printed)."),
    api_key: Optional[str] = typer.Option(
        None,
        "--api-key",
        envvar="MOERUN_API_KEY",
        show_envvar=True,
        help="Require Authorization: Bearer KEY on every route but /health.",
    ),
    origins: Optional[str] = typer.Option(
        None,
        "--origins",
        envvar="MOERUN_ORIGINS",
        show_envvar=True,
        help="Browser origins allowed beside loopback pages, comma list "
        "(https://app.example.com, https://*.example.com, *).",
    ),
    max_body: str = typer.Option("16MiB", "--max-body", help="Largest request body read; larger ones get 413."),
    max_new_tokens: Optional[int] = typer.Option(
        None,
        "--max-new-tokens",
        "-n",
        min=1,
        help="Default reply limit when a request sets none (default: the context).",
    ),
    temperature: float = typer.Option(
        0.0, "--temperature", "-t", min=0.0, help="Default when a request sets none (0: greedy)."
    ),
    top_p: float = TopP,
    top_k: int = TopK,
    seed: Optional[int] = Seed,
    spec: LoadSpec = LOADING,
) -> None:
    """Serve MODEL over HTTP: OpenAI's /v1 (chat/completions, completions, models) and
    Ollama's /api (chat, generate, show, tags, ps); one generation at a time, Ctrl-C or SIGTERM stops."""
    try:
        from moerun import serve as server
    except ImportError as e:  # an install without the server's dependencies
        raise MoerunError(f"moerun serve needs {e.name} (pip install 'starlette' 'uvicorn')") from e
    from moerun.server_protocol import Defaults
    from moerun.spec import parse_size

    if api_key and not api_key.strip():
        raise typer.BadParameter("the key is blank: every client would be refused", param_hint="'--api-key'")
    api_key = api_key.strip() if api_key else None  # as the server strips the token a client sends
    try:
        allowed_origins = server.parse_origins(origins)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="'--origins'") from None
    try:
        body_limit = parse_size(max_body)
    except MoerunError as e:
        raise typer.BadParameter(str(e), param_hint="'--max-body'") from None
    if body_limit < 1024:
        raise typer.BadParameter(f"{max_body} is too small for a request (at least 1KiB)", param_hint="'--max-body'")
    sock = server.bind(host, port)
    try:
        with Display() as display:
            m = load(model, spec, display)
    except BaseException:
        sock.close()
        raise
    defaults = Defaults(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_new_tokens, seed=seed)
    server.serve(
        m,
        host=host,
        port=port,
        api_key=api_key,
        name=server.model_name(model),
        defaults=defaults,
        sock=sock,
        origins=allowed_origins,
        max_body=body_limit,
    )
