"""moerun: run Mixture-of-Experts language models on one consumer GPU (or the CPU)."""

__version__ = "0.1.0"

import os  # noqa: E402

# OpenMP threads (torch's and the C kernels', one libgomp team) that finish early wait for
# the others; by default libgomp has them spin, which on a machine where another process
# holds a core turns every small parallel region into a wait for a descheduled thread.
# Passive waiting was measured faster there and no slower on a quiet machine
# (docs/BENCHMARKS.md, section 14). libgomp reads this once, when torch loads it: this
# import comes first in the CLI; a library user who imported torch before moerun keeps
# libgomp's default. An explicit OMP_WAIT_POLICY is left alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from moerun.errors import MoerunError  # noqa: E402

__all__ = ["load", "Model", "MoerunError", "__version__"]


def __getattr__(name):
    # Import the API lazily so that `moerun --help` and `moerun models` start without torch.
    if name in ("load", "Model"):
        from moerun import api

        return getattr(api, name)
    raise AttributeError(name)
