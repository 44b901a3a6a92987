"""moerun: run Mixture-of-Experts language models on one consumer GPU (or the CPU)."""

__version__ = "0.1.0"

from moerun.errors import MoerunError  # noqa: E402

__all__ = ["load", "Model", "MoerunError", "__version__"]


def __getattr__(name):
    # Import the API lazily so that `moerun --help` and `moerun models` start without torch.
    if name in ("load", "Model"):
        from moerun import api

        return getattr(api, name)
    raise AttributeError(name)
