"""Byte counts for people; torch-free so that `moerun pull` starts without torch."""


def gib(n: int | float) -> str:
    """Bytes for people: GiB, MiB or KiB, whichever reads best."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"
