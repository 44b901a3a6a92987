"""Host stores of expert blobs, and the on-disk cache of quantized experts.

Quantizing Mixtral's 45 B expert parameters takes minutes, so the first load writes the
blobs to a local cache (safetensors, one uint8 [E, blob_bytes] tensor per MoE layer, so one
contiguous blob per expert) with a manifest naming the source fingerprint, bits, format
and moerun version; later loads memory-map it.

Writes are atomic: the cache is built in a temporary folder beside its final place and
renamed into place only once complete, manifest last, so a killed build leaves nothing a
later load would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import moerun
from moerun.errors import MoerunError
from moerun.quant.format import FORMAT_VERSION, ExpertFormat
from moerun.weights import CheckpointWeights, read_header

MANIFEST = "manifest.json"


def cache_root() -> Path:
    """MOERUN_CACHE, else $XDG_CACHE_HOME/moerun, else ~/.cache/moerun."""
    if os.environ.get("MOERUN_CACHE"):
        return Path(os.environ["MOERUN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moerun"


def source_fingerprint(folder: Path) -> str:
    """A hash of the checkpoint's safetensors files without reading tensor data: names,
    headers, sizes, modification times, and the file each name resolves to (in the
    Hugging Face cache a snapshot file links to a blob named by its content hash). A new
    revision with the same shapes still changes it; touching a file only costs a rebuild."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.safetensors")):
        stat = path.stat()
        h.update(f"{path.name}|{path.resolve().name}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            h.update(f.read(min(n, 100_000_000)))
    return h.hexdigest()


def layer_expert_blobs(
    ckpt: CheckpointWeights, arch, args, layer: int, prefix: str, fmt: ExpertFormat
) -> torch.Tensor:
    """Pack one MoE layer's experts from the checkpoint: uint8 [E, blob_bytes]."""
    from moerun.models import routed_checkpoint_names, text_model_name

    layer_prefix = f"model.layers.{layer}."
    in_layer = [n for n in ckpt.keys() if (text_model_name(arch, n) or "").startswith(layer_prefix)]
    names = sorted(routed_checkpoint_names(arch, args, in_layer))
    stacked = arch.sanitize({n: ckpt.get(n) for n in names}, args)
    w13, w2 = stacked.get(f"{prefix}.w13"), stacked.get(f"{prefix}.w2")
    if w13 is None or w2 is None:
        raise MoerunError(f"tensor {prefix}.0 weights are missing from the checkpoint")
    want13 = (fmt.rows13, fmt.hidden_size)
    want2 = (fmt.hidden_size, fmt.intermediate_size)
    if tuple(w13.shape[1:]) != want13 or tuple(w2.shape[1:]) != want2:
        raise MoerunError(
            f"tensors {prefix}.* have shapes {list(w13.shape[1:])} and {list(w2.shape[1:])}, "
            f"expected {list(want13)} and {list(want2)}"
        )
    b13, b2 = stacked.get(f"{prefix}.b13"), stacked.get(f"{prefix}.b2")
    if fmt.bias and (b13 is None or b2 is None):
        raise MoerunError(f"tensors {prefix}.* lack the expert biases the model expects")
    return torch.stack(
        [fmt.pack(w13[e], w2[e], b13[e] if fmt.bias else None, b2[e] if fmt.bias else None) for e in range(w13.shape[0])]
    )


class QuantizedCache:
    """The on-disk cache of one (checkpoint, format): `open()` if valid, else `build()`."""

    def __init__(self, folder: Path, fmt_by_layer: dict[int, ExpertFormat], experts_per_layer: dict[int, int], bits: int,
                 fingerprint: str | None = None):  # fmt: skip
        self.source = Path(folder)
        self.bits = bits
        self.fmt_by_layer = fmt_by_layer
        self.experts_per_layer = experts_per_layer
        # The open checkpoint's own (its headers were read once, at open), else read here.
        self.fingerprint = fingerprint or source_fingerprint(self.source)
        formats = sorted({f.name for f in fmt_by_layer.values()})
        self.path = cache_root() / "experts" / f"{self.fingerprint[:20]}-{'+'.join(formats)}"

    def expected_manifest(self) -> dict:
        return {
            "source": str(self.source.resolve()),
            "source_fingerprint": self.fingerprint,
            "bits": self.bits,
            "format_version": FORMAT_VERSION,
            "layers": {
                str(i): {"format": f.name, "hidden_size": f.hidden_size, "intermediate_size": f.intermediate_size,
                         "blob_bytes": f.blob_bytes}
                for i, f in sorted(self.fmt_by_layer.items())
            },
        }

    def is_valid(self) -> bool:
        """A manifest that matches this source and format, and files whose headers and
        sizes are intact (a truncated or foreign file makes the whole cache stale)."""
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return False
        expected = self.expected_manifest()
        if any(manifest.get(k) != v for k, v in expected.items() if k != "source"):
            return False
        try:
            for i, fmt in self.fmt_by_layer.items():
                info = read_header(self.path / f"layer-{i:03d}.safetensors")["experts"]
                if tuple(info.shape) != (self.experts_per_layer[i], fmt.blob_bytes):
                    return False
        except (MoerunError, OSError, KeyError):
            return False
        return True

    def open(self) -> dict[int, torch.Tensor]:
        """Memory-map every layer's uint8 [E, blob_bytes] store."""
        try:  # the manifest's mtime says when the cache was last used (`moerun ls`)
            os.utime(self.path / MANIFEST)
        except OSError:
            pass  # a read-only cache still loads
        stores = {}
        for i in self.fmt_by_layer:
            with safe_open(str(self.path / f"layer-{i:03d}.safetensors"), framework="pt") as f:
                stores[i] = f.get_tensor("experts")
        return stores

    def load_or_build(self, build_layer, progress=None) -> tuple[dict, bool]:
        """The stores, from the cache when valid, else built by `build_layer(i)` and
        written atomically first. Returns (stores, built)."""
        if self.is_valid():
            return self.open(), False
        self.build(build_layer, progress)
        if not self.is_valid():
            raise MoerunError(f"the quantized expert cache at {self.path} could not be verified after writing it")
        return self.open(), True

    def build(self, build_layer, progress=None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            started = time.perf_counter()
            layers = sorted(self.fmt_by_layer)
            for done, i in enumerate(layers, 1):
                blobs = build_layer(i)
                save_file({"experts": blobs.contiguous()}, str(tmp / f"layer-{i:03d}.safetensors"))
                if progress is not None:
                    progress(done, len(layers))
            manifest = {
                **self.expected_manifest(),
                "moerun_version": moerun.__version__,
                "build_seconds": round(time.perf_counter() - started, 3),
            }
            _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=2))
            for f in tmp.iterdir():
                _fsync(f)
            # Replace a stale cache: move it aside first so the rename below is atomic.
            if self.path.exists():
                trash = self.path.parent / f".{self.path.name}.stale-{uuid.uuid4().hex[:8]}"
                os.rename(self.path, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _remove_abandoned(self.path.parent)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _remove_abandoned(parent: Path, older_than_s: float = 3600) -> None:
    """Temporary folders of builds killed more than an hour ago are never trusted; tidy them."""
    now = time.time()
    for p in parent.glob(".*.tmp-*"):
        try:
            if now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass
