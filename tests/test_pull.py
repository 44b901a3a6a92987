"""`moerun pull` and first-use pulls against the loopback Hub (tests/hub_server.py): a
tiny fixture repo downloaded into the HF cache then run from it, resume after a cut
connection, and the gated / missing / offline one-liners."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moerun import hub
from moerun.errors import MoerunError
from tests.hub_server import HubServer, use_hub

ROOT = Path(__file__).resolve().parents[1]
REPO = "tiny/moe"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.model_fixtures import make_checkpoint

    folder = make_checkpoint(tmp_path_factory.mktemp("tiny"), "mixtral", shards=2)
    (folder / "README.md").write_text("not needed by moerun")
    with HubServer() as s:
        s.add_folder(REPO, folder)
        s.add_folder("tiny/gated", folder, gated=True)
        yield s


@pytest.fixture
def env(server, tmp_path, monkeypatch):
    e = use_hub(monkeypatch, server.url, tmp_path, MOERUN_RETRY_BASE_S="0.001")
    server.cut_after, server.cuts_left, server.cut_file = None, 0, None
    return e


def run_cli(*args, env):
    full = {**os.environ, "PYTHONPATH": str(ROOT), "MOERUN_DEBUG": "", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "moerun", *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=180
    )


def one_line_error(proc) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_pull_then_generate_from_the_cache(server, env):
    proc = run_cli("pull", REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    snapshot = hub.resolve(REPO)
    names = sorted(p.name for p in snapshot.iterdir())
    assert "README.md" not in names and "config.json" in names and "tokenizer.json" in names
    assert all((snapshot / n).is_symlink() for n in names)  # the standard HF cache layout
    out = run_cli("generate", REPO, "hi", "-n", "4", "--json", env={**env, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["token_ids"]) >= 1


def test_cut_connection_resumes_from_the_partial_size(server, env):
    repo = hub.remote_repo(REPO)
    big = max(repo.files, key=lambda f: repo.files[f][0])
    size = repo.files[big][0]
    server.cut_after, server.cuts_left, server.cut_file = size // 3, 1, big
    start = server.bytes_sent
    server.requests.clear()
    hub.pull(REPO)
    gets = [r for r in server.requests if r[0] == "GET" and r[1].endswith(big)]
    assert [r[2] for r in gets] == [None, f"bytes={size // 3}-"]
    assert server.bytes_sent - start < repo.size * 1.05  # not downloaded twice
    assert (hub.resolve(REPO) / big).stat().st_size == size


def test_interrupted_pull_keeps_the_partial_file_and_resumes(server, env, monkeypatch):
    monkeypatch.setattr(hub, "DOWNLOAD_ATTEMPTS", 1)
    repo = hub.remote_repo(REPO)
    big = max(repo.files, key=lambda f: repo.files[f][0])
    size, etag = repo.files[big]
    server.cut_after, server.cuts_left, server.cut_file = size // 2, 99, big
    with pytest.raises(MoerunError, match="partial file is kept"):
        hub.pull(REPO)
    partial = Path(env["HF_HUB_CACHE"]) / "models--tiny--moe" / "blobs" / f"{etag}.incomplete"
    assert partial.stat().st_size == size // 2
    server.cut_after, server.cuts_left = None, 0
    server.requests.clear()
    hub.pull(REPO)
    gets = [r for r in server.requests if r[0] == "GET" and r[1].endswith(big)]
    assert [r[2] for r in gets] == [f"bytes={size // 2}-"]
    assert not partial.exists()


def test_gated_missing_and_offline_are_one_line(server, env):
    line = one_line_error(run_cli("pull", "tiny/gated", env=env))
    assert "gated" in line and "accept" in line and "hf auth login" in line and "HF_TOKEN" in line
    proc = run_cli("pull", "tiny/gated", env={**env, "HF_TOKEN": server.token})
    assert proc.returncode == 0, proc.stderr
    line = one_line_error(run_cli("pull", "nobody/nothing", env=env))
    assert "was not found" in line
    line = one_line_error(run_cli("pull", REPO, env={**env, "HF_HUB_OFFLINE": "1"}))
    assert "offline" in line


def test_generate_pulls_on_first_use_and_refuses_what_will_not_fit(server, env):
    proc = run_cli("generate", REPO, "hi", "-n", "2", "--vram", "10KB", env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    info, line = proc.stderr.strip().splitlines()  # the size and fit verdict, then the refusal
    assert "to download" in info and "does not fit" in info
    assert line.startswith("error: ") and "will not fit" in line and "--force" in line
    assert not hub.is_cached(REPO)
    proc = run_cli("generate", REPO, "hi", "-n", "2", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "to download" in proc.stderr and hub.is_cached(REPO)
    import torch

    if not torch.cuda.is_available():  # the first-use check names the machine's one memory pool
        assert "everything in RAM" in proc.stderr and "GPU" not in proc.stderr, proc.stderr


def test_the_library_pulls_on_first_use_as_the_cli_does(server, env):
    import moerun

    with pytest.raises(MoerunError, match="will not fit.*nothing was downloaded"):
        moerun.load(REPO, device="cpu", vram="10KB")
    assert not hub.is_cached(REPO)
    with pytest.raises(MoerunError, match="not in the local Hugging Face cache"):
        moerun.load(REPO, device="cpu", pull=False)
    model = moerun.load(REPO, device="cpu", dtype="float32")
    assert hub.is_cached(REPO) and model.generate("hi", max_new_tokens=2).stats.generated_tokens >= 1


def test_disk_space_is_checked_first(server, env, monkeypatch):
    import shutil
    from collections import namedtuple

    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("U", "total used free")(10, 10, 0))
    with pytest.raises(MoerunError, match="not enough disk space"):
        hub.pull(REPO)
    assert not hub.is_cached(REPO)
