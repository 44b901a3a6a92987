"""The one compiled part of moerun: the CPU expert kernels (moerun/kernels/cpu.c).

Plain C against the Python headers (no torch headers, so no torch at build time), with
OpenMP so that it shares the libgomp thread team torch loads. The build is optional: where
no C compiler is found moerun still installs and runs its CPU experts through torch
(dequantize, then multiply), and says so once at load.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Try with OpenMP, then without it; never fail the install over the kernels."""

    def build_extension(self, ext):
        attempts = [ext.extra_compile_args, [a for a in ext.extra_compile_args if "openmp" not in a]]
        links = [ext.extra_link_args, [a for a in ext.extra_link_args if "openmp" not in a]]
        for compile_args, link_args in zip(attempts, links):
            ext.extra_compile_args, ext.extra_link_args = compile_args, link_args
            try:
                return super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - a missing compiler or flag: try the next way
                print(f"moerun: building {ext.name} with {compile_args} failed: {e}", file=sys.stderr)
        print(
            "moerun: the CPU expert kernels were not built; CPU experts will use the slow torch path", file=sys.stderr
        )


if sys.platform == "win32":
    compile_args, link_args = ["/O2", "/openmp"], []
elif sys.platform == "darwin":
    compile_args, link_args = ["-O3", "-std=c11"], []  # Apple clang has no OpenMP by default
else:
    compile_args, link_args = ["-O3", "-std=gnu11", "-fopenmp", "-fno-math-errno"], ["-fopenmp"]

setup(
    ext_modules=[
        Extension(
            "moerun.kernels._cpu",
            sources=["moerun/kernels/cpu.c"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            optional=True,
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
