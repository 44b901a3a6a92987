"""Faults of the on-disk quantized expert cache, as a user meets them: concurrent first
loads, a killed builder (tests/test_offload.py), a full or unwritable cache folder, a
damaged layer file, and NaN weights. Errors go through the real `moerun` entry point
(main(), in-process but for one real subprocess): exit code 1, one `error:` line, nothing
left behind."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moerun
from moerun.errors import MoerunError
from tests.model_fixtures import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[5, 17, 3, 99, 42, 8]])
EXPERT = "model.layers.1.block_sparse_moe.experts.2.w1.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """One tiny single-shard Mixtral (3 MoE layers of 4 experts), never modified."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "m", "mixtral", dtype=torch.bfloat16, shards=1)


def poisoned(src: Path, dst: Path, name: str, value: float) -> Path:
    """A copy of checkpoint `src` whose tensor `name` holds `value` in a few places."""
    import shutil

    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    tensors = load_file(path)
    tensors[name].view(-1)[3:7] = value
    save_file(tensors, path, metadata={"format": "pt"})
    return dst


def cli(monkeypatch, capsys, *args: str, env: dict) -> tuple[int, str]:
    """Run the `moerun` entry point in this process: (exit code, stderr)."""
    from moerun.cli import main

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MOERUN_DEBUG", "")
    monkeypatch.setattr(sys, "argv", ["moerun", *args])
    capsys.readouterr()
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def one_error_line(code: int, err: str) -> str:
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def generate_error(monkeypatch, capsys, folder: Path, bits: int, cache: Path) -> str:
    """The one error line of `moerun generate` of one token from `folder` at `bits` on the
    CPU, MOERUN_CACHE at `cache`."""
    args = ("generate", str(folder), "hi", "--bits", str(bits), "--device", "cpu", "--max-new-tokens", "1")
    return one_error_line(*cli(monkeypatch, capsys, *args, env={"MOERUN_CACHE": str(cache)}))


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# -- concurrent first loads ---------------------------------------------------------------

# One interpreter imports moerun once, then forks N real processes per round that all load
# the model at 4 bits into one fresh cache at the same instant (imports cost seconds each;
# forks cost nothing, and the processes are as separate as spawned ones: own fds, own locks;
# OMP_NUM_THREADS=1, so no thread pool is forked).
RACE = r"""
import json, os, sys, time
import torch, moerun
folder, root, rounds, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
# A first load pays ~3 s of lazy imports: paid once here, in a cache of its own, not per child.
os.environ["MOERUN_CACHE"] = os.path.join(root, "warm-up")
moerun.load(folder, bits=4, device="cpu", dtype="float32").logits(torch.tensor([[1]]))
for r in range(rounds):
    os.environ["MOERUN_CACHE"] = os.path.join(root, f"cache{r}")
    go, pids = time.time() + 0.5, []
    for k in range(n):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                while time.time() < go:
                    time.sleep(0.002)
                m = moerun.load(folder, bits=4, device="cpu", dtype="float32")
                out = {"built": m.offload_info["cache_built"],
                       "logits": float(m.logits(torch.tensor([[5, 17, 3, 99]])).double().sum())}
                code = 0
            except BaseException as e:
                out = {"error": f"{type(e).__name__}: {e}"}
            finally:
                with open(os.path.join(root, f"r{r}-{k}.json"), "w") as f:
                    json.dump(out, f)
                os._exit(code)
        pids.append(pid)
    print(json.dumps([os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]), flush=True)
"""


def test_six_concurrent_first_loads_build_the_cache_once(tiny, tmp_path):
    rounds, n = 3, 6
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MOERUN_DEBUG": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", RACE, str(tiny), str(tmp_path), str(rounds), str(n)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    codes = [json.loads(line) for line in proc.stdout.splitlines()]
    for r in range(rounds):
        results = [json.loads((tmp_path / f"r{r}-{k}.json").read_text()) for k in range(n)]
        assert codes[r] == [0] * n, results
        assert sum(x["built"] for x in results) == 1, results  # one builder; the others waited and read
        assert len({x["logits"] for x in results}) == 1, results
        experts = tmp_path / f"cache{r}" / "experts"
        # The finished cache and its (empty) lock file; no temporary or stale folder.
        names = sorted(p.name for p in experts.iterdir())
        assert len(names) == 2 and names[0].startswith(".") and names[0].endswith(".lock"), names
        assert (experts / names[1] / "manifest.json").exists()


# -- a damaged layer file -----------------------------------------------------------------


def test_zeroed_layer_region_is_named_and_that_layer_rebuilt(tiny, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MOERUN_CACHE", str(tmp_path / "cache"))
    first = moerun.load(str(tiny), bits=4, device="cpu", dtype="float32")
    expected = first.logits(IDS)
    cache = Path(first.offload_info["quantized_cache"])
    layer = cache / "layer-001.safetensors"
    intact = layer.read_bytes()
    with open(layer, "r+b") as f:  # zero 1 KiB of expert data: headers and sizes stay intact
        f.seek(len(intact) // 2)
        f.write(bytes(1024))
    other = (cache / "layer-002.safetensors").stat().st_mtime_ns
    del first

    with caplog.at_level(logging.WARNING, logger="moerun"):
        again = moerun.load(str(tiny), bits=4, device="cpu", dtype="float32")
    lines = [r.getMessage() for r in caplog.records if "checksum" in r.getMessage()]
    assert len(lines) == 1 and "layer-001.safetensors" in lines[0] and str(cache) in lines[0], lines
    assert again.offload_info["cache_built"] is False and again.offload_info["cache_repaired"] == [1]
    assert layer.read_bytes() == intact  # rebuilt alone, byte for byte
    assert (cache / "layer-002.safetensors").stat().st_mtime_ns == other
    assert torch.equal(again.logits(IDS), expected)
    assert sorted(p.name for p in cache.iterdir()) == [
        "layer-000.safetensors",
        "layer-001.safetensors",
        "layer-002.safetensors",
        "manifest.json",
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moerun"):
        third = moerun.load(str(tiny), bits=4, device="cpu", dtype="float32")
    assert third.offload_info["cache_repaired"] == [] and not caplog.records


def test_an_intact_cache_is_read_whole_once_then_trusted_until_a_file_changes(tiny, tmp_path, monkeypatch, caplog):
    from moerun.moe import store

    monkeypatch.setenv("MOERUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(store, "VERIFY_RACY_S", 0.0)  # the files here are seconds old, not minutes
    reads = []
    crc32 = store._file_crc32
    monkeypatch.setattr(store, "_file_crc32", lambda path: reads.append(path.name) or crc32(path))
    cache = Path(moerun.load(str(tiny), bits=4, device="cpu", dtype="float32").offload_info["quantized_cache"])
    reads.clear()  # the build's own checksums
    moerun.load(str(tiny), bits=4, device="cpu", dtype="float32")  # verified whole, stamped
    assert sorted(reads) == ["layer-000.safetensors", "layer-001.safetensors", "layer-002.safetensors"]
    reads.clear()
    moerun.load(str(tiny), bits=4, device="cpu", dtype="float32")
    assert reads == []  # nothing changed: nothing read
    layer = cache / "layer-002.safetensors"
    with open(layer, "r+b") as f:
        f.seek(layer.stat().st_size // 2)
        f.write(bytes(512))
    with caplog.at_level(logging.WARNING, logger="moerun"):
        again = moerun.load(str(tiny), bits=4, device="cpu", dtype="float32")
    assert again.offload_info["cache_repaired"] == [2] and "layer-002.safetensors" in reads
    assert not any(r.startswith(("layer-000", "layer-001")) for r in reads)  # the unchanged files stay trusted


def test_a_machine_out_of_threads_still_checks_the_cache(tiny, tmp_path, monkeypatch):
    """The layer files are checked by a few threads; when the machine can start none (out
    of threads or memory: "can't start new thread", seen with a busy box), the check runs
    in turn and still finds the damaged layer, instead of failing the load."""
    import threading

    monkeypatch.setenv("MOERUN_CACHE", str(tmp_path / "cache"))
    cache = Path(moerun.load(str(tiny), bits=4, device="cpu", dtype="float32").offload_info["quantized_cache"])
    layer = cache / "layer-001.safetensors"
    with open(layer, "r+b") as f:
        f.seek(layer.stat().st_size // 2)
        f.write(bytes(512))

    def no_thread(*args, **kwargs):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading, "_start_new_thread", no_thread)
    again = moerun.load(str(tiny), bits=4, device="cpu", dtype="float32")
    assert again.offload_info["cache_built"] is False and again.offload_info["cache_repaired"] == [1]


def test_manifest_checksums_are_the_layer_files_crc32_and_required(tiny, tmp_path, monkeypatch):
    import zlib

    monkeypatch.setenv("MOERUN_CACHE", str(tmp_path / "cache"))
    cache = Path(moerun.load(str(tiny), bits=8, device="cpu", dtype="float32").offload_info["quantized_cache"])
    manifest = json.loads((cache / "manifest.json").read_text())
    for i, entry in manifest["layers"].items():
        assert entry["crc32"] == zlib.crc32((cache / f"layer-{int(i):03d}.safetensors").read_bytes())
    # A cache written before checksums existed is stale: rebuilt once, then trusted.
    for entry in manifest["layers"].values():
        del entry["crc32"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    assert moerun.load(str(tiny), bits=8, device="cpu", dtype="float32").offload_info["cache_built"] is True
    assert "crc32" in json.loads((cache / "manifest.json").read_text())["layers"]["0"]


# -- a full disk, an unwritable cache -----------------------------------------------------


def test_too_little_free_space_is_refused_before_building(tiny, tmp_path, monkeypatch, capsys, free_disk_bytes):
    # No test can fill a real disk: the fixture stands in for shutil.disk_usage's answer, in
    # one place (moerun.moe.store.free_bytes); the comparison and message are real.
    cache = tmp_path / "cache"
    free_disk_bytes(4096)
    line = generate_error(monkeypatch, capsys, tiny, 4, cache)
    assert "needs" in line and "only 0.0 MiB is free" in line and "MOERUN_CACHE" in line and str(cache) in line, line
    assert listing(cache) == []  # refused before anything was written, the lock file included


def test_unwritable_cache_is_one_line_naming_moerun_cache(tiny, tmp_path, monkeypatch, capsys):
    # As root chmod stops nothing: a cache path under a regular file (ENOTDIR) is unwritable
    # for everyone. Others also get a read-only folder.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    places = [blocker / "cache"]
    if os.geteuid() != 0:
        ro = tmp_path / "read-only"
        ro.mkdir(mode=0o555)
        places.append(ro / "cache")
    for cache in places:
        line = generate_error(monkeypatch, capsys, tiny, 8, cache)
        assert f"the cache {cache} is not writable" in line and "set MOERUN_CACHE to a writable folder" in line, line
    assert blocker.read_text() == "not a folder"


def test_a_valid_cache_in_a_read_only_folder_still_loads(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MOERUN_CACHE", str(tmp_path / "cache"))
    moerun.load(str(tiny), bits=8, device="cpu", dtype="float32")
    # Reading a valid cache takes no lock and writes nothing (as root the chmod is moot, but
    # the listing proves nothing was written).
    before = listing(tmp_path / "cache")
    for p in [tmp_path / "cache", *(tmp_path / "cache").rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        assert moerun.load(str(tiny), bits=8, device="cpu", dtype="float32").offload_info["cache_built"] is False
    finally:
        for p in [tmp_path / "cache", *(tmp_path / "cache").rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert listing(tmp_path / "cache") == before


# -- NaN / Inf weights --------------------------------------------------------------------


def test_nan_expert_weights_are_refused_by_the_real_cli(tiny, tmp_path):
    # Before: an empty reply and exit 0. The quantization pass reads every expert anyway.
    folder = poisoned(tiny, tmp_path / "nan", EXPERT, float("nan"))
    cache = tmp_path / "cache"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MOERUN_CACHE": str(cache),
        "MOERUN_DEBUG": "",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moerun",
            "generate",
            str(folder),
            "hello",
            "--bits",
            "4",
            "--device",
            "cpu",
            "--max-new-tokens",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = one_error_line(proc.returncode, proc.stderr)
    assert f"tensor {EXPERT} holds NaN or Inf values" in line, line
    # No cache, no temporary folder: only the folder of caches and the (empty) build lock.
    assert [p for p in listing(cache) if not p.endswith(".lock")] == ["experts"]


@pytest.mark.parametrize(
    "name,bits,named",
    [
        ("model.norm.weight", 4, "model.norm.weight"),
        ("model.layers.0.self_attn.q_proj.weight", 16, "model.layers.0.self_attn.q_proj.weight"),
        # Resident 16-bit experts are checked (sampled past 65536 values) once stacked: the layer's w13.
        (EXPERT, 16, "model.layers.1.block_sparse_moe.experts.w13"),
    ],
    ids=["non-expert", "attention-16bit", "resident-experts"],
)
def test_inf_weights_are_named_at_load(tiny, tmp_path, monkeypatch, name, bits, named):
    monkeypatch.setenv("MOERUN_CACHE", str(tmp_path / "cache"))
    folder = poisoned(tiny, tmp_path / "inf", name, float("inf"))
    with pytest.raises(MoerunError, match=f"tensor {named} holds NaN or Inf"):
        moerun.load(str(folder), bits=bits, device="cpu", dtype="float32")


def test_a_cast_that_overflows_is_refused(tiny, tmp_path, monkeypatch):
    # 1e5 is a fine bfloat16 but no float16: the cast makes it Inf.
    monkeypatch.setenv("MOERUN_CACHE", str(tmp_path / "cache"))
    folder = poisoned(tiny, tmp_path / "big", "model.norm.weight", 1e5)
    with pytest.raises(MoerunError, match="tensor model.norm.weight holds NaN or Inf"):
        moerun.load(str(folder), device="cpu", dtype="float16")
