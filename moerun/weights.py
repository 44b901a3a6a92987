"""Read a Hugging Face checkpoint folder (one or many safetensors files) by memory map.

Every file's header is parsed and checked before anything is opened, so a truncated or
corrupt download fails at once with a one-line message naming the file, instead of as a
crash halfway through loading 90 GB. Tensor data is never read until `get` asks for it,
and pickle (``.bin`` / ``.pt``) is never touched.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType

import torch
from safetensors import safe_open

from moerun.errors import MoerunError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors caps headers at 100 MB; a larger length prefix means garbage, not a header.
_MAX_HEADER_BYTES = 100_000_000

# safetensors dtype names -> torch dtypes; float8 types exist only on newer torch builds.
_DTYPES: dict[str, torch.dtype] = {
    name: dtype
    for name, dtype in (
        (name, getattr(torch, attr, None))
        for name, attr in {
            "F64": "float64",
            "F32": "float32",
            "F16": "float16",
            "BF16": "bfloat16",
            "I64": "int64",
            "I32": "int32",
            "I16": "int16",
            "I8": "int8",
            "U8": "uint8",
            "U16": "uint16",
            "U32": "uint32",
            "U64": "uint64",
            "BOOL": "bool",
            "F8_E4M3": "float8_e4m3fn",
            "F8_E5M2": "float8_e5m2",
            "F8_E8M0": "float8_e8m0fnu",
        }.items()
    )
    if dtype is not None
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives, taken from its file's header."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def read_header(path: Path, raw_out: list | None = None) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header without reading tensor data
    (the raw header bytes are appended to `raw_out` when given).

    Raises MoerunError naming the file if it is truncated, has trailing bytes, or its
    header is not valid safetensors JSON.
    """
    name = path.name
    corrupt = f"{name} is not a valid safetensors file ({{}}); re-download it"
    size = path.stat().st_size
    if size < 8:
        raise MoerunError(f"{name} is truncated ({size} bytes, too short for a header); re-download it")
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > _MAX_HEADER_BYTES:
            raise MoerunError(corrupt.format(f"header length {header_len} is implausible"))
        if 8 + header_len > size:
            raise MoerunError(
                f"{name} is truncated (header needs {8 + header_len} bytes, found {size}); re-download it"
            )
        raw = f.read(header_len)
    if raw_out is not None:
        raw_out.append(raw)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MoerunError(corrupt.format("header is not JSON")) from None
    if not isinstance(header, dict):
        raise MoerunError(corrupt.format("header is not a JSON object"))

    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype_name, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = all(isinstance(v, int) and v >= 0 for v in (*shape, start, end))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise MoerunError(corrupt.format(f"bad header entry for {key}"))
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise MoerunError(f"{name}: tensor {key} has unsupported dtype {dtype_name}")
        numel = 1
        for d in shape:
            numel *= d
        if end - start != numel * dtype.itemsize:
            raise MoerunError(
                corrupt.format(f"{key} has offsets [{start}, {end}] that do not fit shape {_fmt_shape(shape)}")
            )
        tensors[key] = TensorInfo(path, dtype, shape)
        spans.append((start, end, key))

    # The data region is the tensors back to back, as safetensors writes and requires it:
    # a gap or an overlap means a damaged or hand-edited header.
    data_end = 0
    for start, end, key in sorted(spans):
        if start != data_end:
            what = (
                "overlaps the tensor before it"
                if start < data_end
                else f"leaves a gap of {start - data_end} bytes before it"
            )
            raise MoerunError(corrupt.format(f"tensor {key} at data offsets [{start}, {end}] {what}"))
        data_end = end

    expected = 8 + header_len + data_end
    if size < expected:
        raise MoerunError(f"{name} is truncated (expected {expected} bytes, found {size}); re-download it")
    if size > expected:
        raise MoerunError(corrupt.format(f"expected {expected} bytes, found {size}"))
    return tensors


def check_finite(name: str, tensor: torch.Tensor, sample: int | None = None) -> None:
    """Refuse a floating-point tensor holding NaN or Inf (a model that would answer with
    garbage, or nothing, and exit 0). `sample`: check only about that many evenly spaced
    elements (for tensors too big to scan at every load)."""
    if not tensor.is_floating_point():
        return  # packed or quantized checkpoint storage: no NaN to see
    flat = tensor.reshape(-1)
    if sample is not None and flat.numel() > sample:
        flat = flat[:: flat.numel() // sample]
    if flat.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        flat = flat.float()  # float8 storage: isfinite has no kernel for it
    if not bool(torch.isfinite(flat).all()):
        bad = int((~torch.isfinite(flat)).sum())
        raise MoerunError(
            f"tensor {name} holds NaN or Inf values ({bad} of {flat.numel()} checked); the checkpoint is damaged"
        )


def _index_entry(index: Path, key: str, file: object) -> str:
    """A weight_map value: a file name inside the model folder. Its own path is judged, not
    where a symlink leads (a Hub snapshot's files link into ../../blobs, as they should)."""
    if not isinstance(file, str) or not file.strip():
        shown = json.dumps(file) if isinstance(file, (str, int, float, bool, type(None))) else type(file).__name__
        raise MoerunError(f"{index}: weight_map gives {key} the file {shown}, expected a file name; re-download it")
    parts = PurePosixPath(file).parts
    if file.startswith("/") or "\\" in file or ":" in file or "\0" in file or any(p in ("..", ".") for p in parts):
        raise MoerunError(f"{index}: weight_map names {file!r} for {key}, a path outside the model folder; refused")
    return file


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files that make up the checkpoint, from the index if there is one."""
    single = folder / SINGLE_FILE
    if single.is_file():
        return [single]
    index = folder / INDEX_FILE
    if not index.is_file():
        raise MoerunError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        entries = list(weight_map.items())
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise MoerunError(f"{INDEX_FILE} in {folder} is not a valid index (no weight_map); re-download it") from None
    files = sorted({_index_entry(index, key, file) for key, file in entries})
    for file in files:
        if not (folder / file).is_file():
            raise MoerunError(f"{file} is listed in {INDEX_FILE} but missing from {folder}; download it")
    return [folder / file for file in files]


class CheckpointWeights:
    """Memory-mapped, read-only access to a checkpoint's tensors by their checkpoint names.

    Use `CheckpointWeights.open(folder)`, ideally as a context manager. Shapes and dtypes
    come from the headers; `get` maps the tensor's bytes from disk only when asked.
    """

    def __init__(self, folder: Path, tensors: dict[str, TensorInfo], fingerprint: str | None = None):
        self.folder = folder
        self._tensors = tensors
        # A hash of the files' names, sizes, times and headers (moerun.moe.store.source_fingerprint).
        self.fingerprint = fingerprint
        # One mmap'd handle per file, opened only after every header passed validation.
        self._handles = {}
        for file in sorted({info.file for info in tensors.values()}):
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as e:  # SafetensorError: what the header checks above did not foresee
                self.close()
                raise MoerunError(f"{file.name} is not a valid safetensors file ({e}); re-download it") from None

    @classmethod
    def open(cls, folder: str | Path) -> CheckpointWeights:
        """Validate every weight file in `folder` (headers and sizes only), then map them."""
        folder = Path(folder).expanduser()
        tensors: dict[str, TensorInfo] = {}
        h = hashlib.sha256()
        for file in sorted(weight_files(folder)):
            raw: list[bytes] = []
            for key, info in read_header(file, raw).items():
                if key in tensors:
                    raise MoerunError(f"tensor {key} appears in both {tensors[key].file.name} and {file.name}")
                tensors[key] = info
            stat = file.stat()
            h.update(f"{file.name}|{file.resolve().name}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
            h.update(raw[0])
        return cls(folder, tensors, h.hexdigest())

    def headers(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name -> (shape, dtype) of every tensor: what the planner reads."""
        return {name: (info.shape, info.dtype) for name, info in self._tensors.items()}

    def keys(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise MoerunError(f"tensor {name} is missing from the checkpoint in {self.folder}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape, from the header (no data read)."""
        return self._info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype, from the header (no data read)."""
        return self._info(name).dtype

    def get(self, name: str) -> torch.Tensor:
        """The tensor in its stored dtype, backed by the memory-mapped file."""
        info = self._info(name)
        if not self._handles:
            raise MoerunError(f"the checkpoint in {self.folder} was already closed")
        return self._handles[info.file].get_tensor(name)

    def get_as(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """`get`, after checking the stored shape is `shape`, cast to `dtype`."""
        found = self.shape(name)
        if found != tuple(shape):
            raise MoerunError(f"tensor {name} has shape {_fmt_shape(found)}, expected {_fmt_shape(tuple(shape))}")
        return self.get(name).to(dtype)

    def close(self) -> None:
        """Release the file maps; tensors already returned stay valid."""
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> CheckpointWeights:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointWeights({str(self.folder)!r}, {len(self)} tensors in {len(self._handles)} files)"
