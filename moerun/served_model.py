"""The loaded model as `moerun serve` and `moerun chat` use it, declared: moerun.api.Model has
it all, and the fakes tests drive the server and the REPL with declare the same, so that
neither front end guesses at a model's attributes. Torch-free: `moerun chat` starts without it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Generator, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from moerun.generate import GenerationResponse
    from moerun.plan import Plan
    from moerun.tokenizer import Tokenizer


@runtime_checkable  # for the test that the real Model and the fakes declare it all
class ServedModel(Protocol):
    """What the server's engine and routes and the chat REPL read and call on a model."""

    name: str  # the alias, repo id or folder it was loaded by
    config: dict  # its config.json
    tokenizer: Tokenizer
    folder: Path | None  # the checkpoint's folder; None for a model that has none
    max_context: int  # the longest context the model takes
    kv_caches: list | None  # the states, allocated for the planned context; None: made per generation
    cached_ids: list[int]  # the sequence the states hold, for the next request to reuse
    device: object  # a torch.device
    dtype: object  # a torch.dtype
    plan: Plan | None  # the placement it was loaded by

    @property
    def stats(self) -> dict:
        """Expert-cache counters, "total" and per layer; empty when the experts are plain weights."""
        ...

    @property
    def num_parameters(self) -> int: ...

    @property
    def is_chat_model(self) -> bool:
        """False for a span-corruption encoder-decoder without a chat template: it takes raw prompts only."""
        ...

    def describe(self) -> str:
        """One line naming the model, its family, size, device and dtype."""
        ...

    def encode_prompt(self, prompt: str | Sequence[int] | Sequence[dict], chat: bool) -> list[int]: ...

    def reusable_tokens(self, ids: Sequence[int]) -> int:
        """How many leading tokens of `ids` the next generation takes from the states."""
        ...

    def stream_generate(
        self, prompt: str | Sequence[int] | Sequence[dict], max_new_tokens: int = 64, **kwargs
    ) -> Generator[GenerationResponse, None, None]:
        """One response per token, the last with the stats; closing it early frees the states."""
        ...
