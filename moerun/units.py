"""Byte and parameter counts for people, in one place; torch-free so that `moerun pull`,
`ls` and `rm` start without torch."""


def gib(n: int | float) -> str:
    """Bytes for people: GiB, MiB or KiB, whichever reads best (1024-based, named so)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def params(n: int | float) -> str:
    """A parameter count with a unit that keeps three digits: 46.70 B, 1.87 M, 950 K."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)}"


def params_short(n: int | float) -> str:
    """A parameter count as a model name says it (46.7B, 950.0M): tables and tags."""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
