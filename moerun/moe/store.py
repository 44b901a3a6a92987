"""Host stores of expert blobs, and the on-disk cache of quantized experts.

Quantizing Mixtral's 45 B expert parameters takes minutes, so the first load writes the
blobs to a local cache (safetensors, one uint8 [E, blob_bytes] tensor per MoE layer, so one
contiguous blob per expert) with a manifest naming the source fingerprint, bits, format,
moerun version and a CRC-32 of every layer file; later loads memory-map it.

Writes are atomic: the cache is built in a temporary folder beside its final place and
renamed into place only once complete, manifest last, so a killed build leaves nothing a
later load would trust. One process builds a given (source, format) at a time: the build
runs under an exclusive file lock, and processes that arrive meanwhile wait for it, then
read what it wrote. Whoever holds the lock knows every temporary folder of that cache is a
dead builder's, and removes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import struct
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import moerun
from moerun.errors import MoerunError
from moerun.paths import cache_root
from moerun.quant.format import FORMAT_VERSION, ExpertFormat
from moerun.weights import CheckpointWeights, check_finite, read_header

# A layer file younger than this (seconds) at its check is verified again next load.
VERIFY_RACY_S = 2.0

MANIFEST = "manifest.json"
log = logging.getLogger("moerun")


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


def layer_expert_blobs(ckpt: CheckpointWeights, arch, args, layer: int, prefix: str, fmt: ExpertFormat) -> torch.Tensor:
    """Pack one MoE layer's experts from the checkpoint: uint8 [E, blob_bytes]. `arch` is
    the family (moerun.models.base.Family): its layer paths, names and layouts."""
    layer_prefix = f"{arch.layer_paths(args)[layer]}."
    in_layer = [n for n in ckpt.keys() if (arch.text_model_name(n) or "").startswith(layer_prefix)]
    names = sorted(arch.routed_checkpoint_names(args, in_layer))
    tensors = {n: ckpt.get(n) for n in names}
    for n, t in tensors.items():  # this pass reads every expert anyway: a full check is cheap
        check_finite(n, t)
    stacked = arch.sanitize(tensors, args)
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
        [
            fmt.pack(w13[e], w2[e], b13[e] if fmt.bias else None, b2[e] if fmt.bias else None)
            for e in range(w13.shape[0])
        ]
    )


class QuantizedCache:
    """The on-disk cache of one (checkpoint, format): `load_or_build()` opens it when
    valid, else builds it (one process at a time, under a file lock)."""

    def __init__(
        self,
        folder: Path,
        fmt_by_layer: dict[int, ExpertFormat],
        experts_per_layer: dict[int, int],
        bits: int,
        fingerprint: str | None = None,
    ):
        self.source = Path(folder)
        self.bits = bits
        self.fmt_by_layer = fmt_by_layer
        self.experts_per_layer = experts_per_layer
        # The open checkpoint's own (its headers were read once, at open), else read here.
        self.fingerprint = fingerprint or source_fingerprint(self.source)
        formats = sorted({f.name for f in fmt_by_layer.values()})
        self.path = cache_root() / "experts" / f"{self.fingerprint[:20]}-{'+'.join(formats)}"
        self.repaired: list[int] = []  # layers whose file failed its checksum and was rebuilt

    def layer_file(self, i: int) -> Path:
        return self.path / f"layer-{i:03d}.safetensors"

    def data_bytes(self) -> int:
        """Bytes of expert blobs the build writes (the files' headers add a few hundred)."""
        return sum(self.experts_per_layer[i] * f.blob_bytes for i, f in self.fmt_by_layer.items())

    def expected_manifest(self) -> dict:
        return {
            "source": str(self.source.resolve()),
            "source_fingerprint": self.fingerprint,
            "bits": self.bits,
            "format_version": FORMAT_VERSION,
            "layers": {
                str(i): {
                    "format": f.name,
                    "hidden_size": f.hidden_size,
                    "intermediate_size": f.intermediate_size,
                    "blob_bytes": f.blob_bytes,
                }
                for i, f in sorted(self.fmt_by_layer.items())
            },
        }

    def valid_manifest(self) -> dict | None:
        """The manifest when it matches this source and format, names a checksum for every
        layer, and the files' headers and sizes are intact (a truncated or foreign file
        makes the whole cache stale); else None. Reads no tensor data."""
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        expected = self.expected_manifest()
        if any(manifest.get(k) != v for k, v in expected.items() if k not in ("source", "layers")):
            return None
        layers = manifest.get("layers")
        if not isinstance(layers, dict) or set(layers) != set(expected["layers"]):
            return None
        for i, want in expected["layers"].items():
            got = layers[i]
            if not isinstance(got, dict) or any(got.get(k) != v for k, v in want.items()):
                return None
            if not isinstance(got.get("crc32"), int):
                return None  # a cache from before checksums: rebuilt once
        try:
            for i, fmt in self.fmt_by_layer.items():
                info = read_header(self.layer_file(i))["experts"]
                if tuple(info.shape) != (self.experts_per_layer[i], fmt.blob_bytes):
                    return None
        except (MoerunError, OSError, KeyError):
            return None
        return manifest

    def is_valid(self) -> bool:
        return self.valid_manifest() is not None

    def damaged_layers(self, manifest: dict) -> list[int]:
        """Layers whose file's CRC-32 differs from the manifest's, layers in parallel.

        A file is read whole only until it has been found intact once: that finding is
        kept (beside the cache, `.<name>.verified`) as the file's size, mtime, ctime and
        inode with its checksum, and a later load whose stat matches skips the read (a
        multi-GiB cache is not re-read on every start; any write to a file changes its
        times). As git does with its index, a file written within VERIFY_RACY_S of the
        check is not stamped: a write in the same timestamp tick could hide behind it."""
        stamps = self._verified_stamps()

        def stamp(i: int) -> list:
            st = self.layer_file(i).stat()
            return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, manifest["layers"][str(i)]["crc32"]]

        def bad(i: int) -> bool:
            try:
                if stamps.get(str(i)) == stamp(i):
                    return False
            except OSError:
                pass
            return _file_crc32(self.layer_file(i)) != manifest["layers"][str(i)]["crc32"]

        layers = sorted(self.fmt_by_layer)
        try:
            with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1, len(layers)))) as pool:
                verdicts = list(pool.map(bad, layers))
        except RuntimeError:  # "can't start new thread": a machine out of threads or memory; check in turn
            verdicts = [bad(i) for i in layers]
        damaged = [i for i, b in zip(layers, verdicts) if b]
        if not damaged:
            settled = time.time_ns() - int(VERIFY_RACY_S * 1e9)
            try:
                fresh = {str(i): stamp(i) for i in layers}
            except OSError:
                return damaged
            keep = {k: v for k, v in fresh.items() if max(v[1], v[2]) < settled}
            if keep != stamps:
                self._write_verified_stamps(keep)
        return damaged

    def _verified_path(self) -> Path:
        return self.path.parent / f".{self.path.name}.verified"

    def _verified_stamps(self) -> dict:
        try:
            stamps = json.loads(self._verified_path().read_text())
        except (OSError, ValueError):
            return {}
        return stamps if isinstance(stamps, dict) else {}

    def _write_verified_stamps(self, stamps: dict) -> None:
        """Best effort: a read-only cache just verifies again next time."""
        tmp = self.path.parent / f".{self.path.name}.verified-{os.getpid()}-{uuid.uuid4().hex[:8]}.part"
        try:
            tmp.write_text(json.dumps(stamps))
            os.replace(tmp, self._verified_path())
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def open(self) -> dict[int, torch.Tensor]:
        """Memory-map every layer's uint8 [E, blob_bytes] store."""
        try:  # the manifest's mtime says when the cache was last used (`moerun ls`)
            os.utime(self.path / MANIFEST)
        except OSError:
            pass  # a read-only cache still loads
        stores = {}
        for i in self.fmt_by_layer:
            with safe_open(str(self.layer_file(i)), framework="pt") as f:
                stores[i] = f.get_tensor("experts")
        return stores

    def load_or_build(self, build_layer, progress=None) -> tuple[dict, bool]:
        """The stores, from the cache when valid, else built by `build_layer(i)` and
        written atomically first. A layer file that fails its checksum is named and
        rebuilt alone. Returns (stores, built)."""
        manifest = self.valid_manifest()
        if manifest is not None and not self.damaged_layers(manifest):
            return self.open(), False  # the common case: no lock, so a read-only cache works
        if manifest is None:
            self._check_space()  # before writing anything (the lock file included); again under the lock
        with self._locked():
            # Under the lock: a builder that was here before us has finished (or died).
            self._remove_temporaries()
            manifest, built = self.valid_manifest(), False
            if manifest is None:
                self._writing(self._build, build_layer, progress)
                manifest, built = self.valid_manifest(), True
                if manifest is None:
                    raise MoerunError(
                        f"the quantized expert cache at {self.path} could not be verified after writing it"
                    )
            else:
                for i in self.damaged_layers(manifest):
                    log.warning(
                        "moerun: %s in the quantized expert cache %s fails its checksum (damaged on disk); rebuilding "
                        "that layer",
                        self.layer_file(i).name,
                        self.path,
                    )
                    self._writing(self._repair_layer, i, build_layer, manifest)
                    self.repaired.append(i)
            return self.open(), built

    def build(self, build_layer, progress=None) -> None:
        """Build (or rebuild) the cache now, under its lock."""
        with self._locked():
            self._remove_temporaries()
            self._writing(self._build, build_layer, progress)

    # -- under the lock -------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self):
        """The exclusive build lock of this cache (a file beside it), waited for when
        another process holds it. The kernel releases it when its holder dies."""
        lock_path = self.path.parent / f".{self.path.name}.lock"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _not_writable(e, self.path.parent) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("moerun: waiting for another moerun process to finish building %s", self.path)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _writing(self, fn, *args):
        """Run a writing step, turning a full disk or an unwritable cache into one line."""
        try:
            return fn(*args)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise MoerunError(
                    f"the disk filled while writing the quantized expert cache to {self.path.parent} "
                    f"({_gib(self.data_bytes())} needed in all); free space there or set MOERUN_CACHE to a "
                    "folder on a disk with room"
                ) from None
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
                raise _not_writable(e, self.path.parent) from None
            raise

    def _remove_temporaries(self) -> None:
        """Every temporary folder or file of this cache is a dead builder's (we hold the
        lock); those of other caches are removed when their own lock is free."""
        for p in self.path.parent.glob(f".{self.path.name}.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.path.parent.glob(f".{self.path.name}.stale-*"):
            shutil.rmtree(p, ignore_errors=True)
        if self.path.is_dir():
            for p in self.path.glob(".*.tmp-*"):
                p.unlink(missing_ok=True)
        _remove_abandoned(self.path.parent)

    def _check_space(self) -> None:
        need = self.data_bytes() + (1 << 20)  # headers, manifest, and a margin for the file system
        # A stale cache in our place is never read again: its space counts as free.
        freed = _tree_bytes(self.path) if self.path.is_dir() else 0
        free = free_bytes(self.path.parent) + freed
        if free < need:
            raise MoerunError(
                f"the quantized expert cache needs {_gib(need)} in {self.path.parent} but only {_gib(free)} is free; "
                "free space there or set MOERUN_CACHE to a folder on a disk with room"
            )

    def _build(self, build_layer, progress=None) -> None:
        self._check_space()
        if self.path.exists():
            # Move it aside first, so that the final rename below is atomic.
            trash = self.path.parent / f".{self.path.name}.stale-{uuid.uuid4().hex[:8]}"
            os.rename(self.path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            started = time.perf_counter()
            layers = sorted(self.fmt_by_layer)
            checksums = {}
            for done, i in enumerate(layers, 1):
                checksums[i] = _write_layer(tmp / f"layer-{i:03d}.safetensors", build_layer(i))
                if progress is not None:
                    progress(done, len(layers))
            manifest = self.expected_manifest()
            for i in layers:
                manifest["layers"][str(i)]["crc32"] = checksums[i]
            manifest.update(moerun_version=moerun.__version__, build_seconds=round(time.perf_counter() - started, 3))
            _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=2))
            os.rename(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _repair_layer(self, i: int, build_layer, manifest: dict) -> None:
        """Rewrite one damaged layer file in place (atomically: a temporary file renamed
        over it); the manifest is rewritten only if the new bytes differ (they should not:
        quantization is deterministic)."""
        tmp = self.path / f".layer-{i:03d}.safetensors.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            crc = _write_layer(tmp, build_layer(i))
            os.replace(tmp, self.layer_file(i))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if crc != manifest["layers"][str(i)]["crc32"]:
            manifest["layers"][str(i)]["crc32"] = crc
            tmp = self.path / f".{MANIFEST}.tmp-{os.getpid()}"
            _write_synced(tmp, json.dumps(manifest, indent=2))
            os.replace(tmp, self.path / MANIFEST)


def _write_layer(path: Path, blobs: torch.Tensor) -> int:
    """Write one layer's uint8 [E, blob_bytes] store, synced; return its file's CRC-32."""
    try:
        save_file({"experts": blobs.contiguous()}, str(path))
    except SafetensorError as e:  # its I/O errors carry the OS error in the text alone ("os error 28")
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
    _fsync(path)
    return _file_crc32(path)


def _file_crc32(path: Path) -> int:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return zlib.crc32(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return zlib.crc32(m)  # releases the GIL: layers are checked in parallel


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk `folder` is on, or will be on once created."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the disk it will be on
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 1 << 62  # e.g. a path under a file: the build's first write says why


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _not_writable(e: OSError, folder: Path) -> MoerunError:
    return MoerunError(
        f"the cache {cache_root()} is not writable ({e.strerror or e}: {e.filename or folder}); "
        "set MOERUN_CACHE to a writable folder"
    )


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _remove_abandoned(parent: Path) -> None:
    """Temporary or stale folders of other caches in `parent` whose build lock is free:
    their builder is dead (a live one holds the lock), so they are never finished."""
    for p in list(parent.glob(".*.tmp-*")) + list(parent.glob(".*.stale-*")):
        name = p.name[1:].rsplit(".tmp-", 1)[0].rsplit(".stale-", 1)[0]
        try:
            fd = os.open(parent / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # its builder is alive
        try:
            shutil.rmtree(p, ignore_errors=True)
        finally:
            os.close(fd)
