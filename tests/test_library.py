"""`moerun ls`, `rm` and `show` against a real Hub cache filled by `pull` from the loopback
Hub (tests/hub_server.py): two revisions of one repo sharing their weight blobs, a
quantized cache built by a real load, removal of one revision then of the whole repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moerun import hub, library
from moerun.cli import app
from tests.hub_server import HubServer, use_hub
from tests.test_pull import ROOT, one_line_error

REPO = "tiny/lib"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tests.model_fixtures import make_checkpoint

    first = make_checkpoint(tmp_path_factory.mktemp("lib") / "a", "mixtral", shards=2)
    # A second revision: same weights (shared blobs), a changed config.
    second = Path(shutil.copytree(first, first.parent / "b"))
    config = json.loads((second / "config.json").read_text())
    (second / "config.json").write_text(json.dumps({**config, "note": "revision two"}))
    return first, second


@pytest.fixture
def env(folders, tmp_path, monkeypatch):
    with HubServer() as server:
        e = use_hub(monkeypatch, server.url, tmp_path)
        server.add_folder(REPO, folders[0])
        first = hub.pull(REPO)
        server.add_folder(REPO, folders[1])
        second = hub.pull(REPO)
        yield e, first, second


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "80"})
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def assert_fits_80(text: str) -> None:
    wide = [line for line in text.splitlines() if len(line) > 80]
    assert not wide, wide


def test_ls_then_rm_one_revision_then_the_repo(env):
    import moerun

    e, first, second = env
    assert first != second and first.parent == second.parent
    moerun.load(REPO, revision=first.name, bits=4, device="cpu")  # builds and stamps a 4-bit cache
    revs = {r.commit: r for r in library.pulled()}
    assert set(revs) == {first.name, second.name}
    a, b = revs[first.name], revs[second.name]
    assert b.refs == ["main"] and a.refs == []
    assert [c.bits for c in a.caches] == [4] and b.caches == []
    assert a.last_used is not None and b.last_used is None
    shard = sorted(first.glob("*.safetensors"))[0].name
    weights = sum(f.stat().st_size for f in first.glob("*.safetensors"))
    assert a.size > weights and b.size > weights

    out = cli("ls")
    assert_fits_80(out)
    assert "tiny/lib" in out and first.name[:12] in out and second.name[:12] in out
    assert "4-bit experts" in out and "never" in out and "just now" in out
    listed = json.loads(cli("ls", "--json"))
    assert {m["revision"] for m in listed["models"]} == {first.name, second.name}

    # Without -y and without a terminal: one line, nothing deleted.
    proc = subprocess.run(
        [sys.executable, "-m", "moerun", "rm", REPO],
        cwd=ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT), **e},
    )
    line = one_line_error(proc)
    assert "-y" in line and "not a terminal" in line
    assert first.is_dir() and a.caches[0].path.is_dir()

    if sys.platform != "win32":  # on a terminal it asks; anything but y keeps everything
        from tests.test_chat_pty import Terminal

        term = Terminal(["rm", REPO], {**os.environ, "PYTHONPATH": str(ROOT), **e})
        try:
            term.expect(r"remove tiny/lib .*\? \[y/N\]")
            term.sendline("n")
            term.expect("nothing removed")
            assert term.wait() == 0
        finally:
            term.close()
        assert first.is_dir() and second.is_dir()

    blobs = Path(e["HF_HUB_CACHE"]) / "models--tiny--lib" / "blobs"
    old_config = (first / "config.json").resolve()
    shared = (first / shard).resolve()
    cli("rm", REPO, "--revision", first.name[:8], "-y")
    assert not first.exists() and second.is_dir() and not a.caches[0].path.exists()
    assert not old_config.exists() and shared.exists()  # only the blobs no other revision uses
    assert hub.resolve(REPO) == second and (second / shard).is_file()
    assert [r.commit for r in library.pulled()] == [second.name]

    cli("rm", REPO, "-y")
    assert not blobs.parent.exists() and library.pulled() == []


def test_show_a_pulled_model_and_the_demo(env):
    out = cli("show", REPO)
    assert_fits_80(out)
    for word in ("mixtral", "parameters", "active per token", "context", "chat template", "fits here"):
        assert word in out, out
    info = json.loads(cli("show", REPO, "--json"))
    assert info["source"] == "cache" and info["chat_template"] and info["total_params"] > info["active_params"] > 0
    # A tiny model fits this machine: on the CPU (CI) everything in RAM, on a GPU on it.
    assert info["fit"]["verdict"] == ("gpu" if info["fit"]["device"] == "cuda" else "ram")
    demo = json.loads(cli("show", "demo", "--json"))
    assert demo["license"] == "apache-2.0" and demo["context"] == 256
    assert demo["chat_template_head"] and demo["total_params"] > 1_000_000


def test_rm_and_show_of_what_is_not_here_are_one_line(env):
    for args in (["rm", "nobody/nothing", "-y"], ["rm", "demo", "-y"], ["show", "nobody/nothing"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code != 0 and isinstance(result.exception, library.MoerunError), result.output
        assert "\n" not in str(result.exception)


def test_rm_removes_the_quantized_caches_of_a_folder_even_when_it_is_gone(tmp_path, monkeypatch):
    """`ls` lists a cache built from a local folder since deleted ("source gone"); `rm`
    with the path `ls` prints (or the cache's own path) deletes the cache, never a folder
    of the user's, and says so in one line when there is nothing to delete."""
    import moerun
    from tests.model_fixtures import make_checkpoint

    monkeypatch.setenv("MOERUN_CACHE", str(tmp_path / "moerun"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    kept, gone = (make_checkpoint(tmp_path / name, "mixtral", shards=1) for name in ("kept", "gone"))
    caches = {
        f: Path(moerun.load(str(f), bits=bits, device="cpu").offload_info["quantized_cache"])
        for f, bits in ((kept, 8), (gone, 4))
    }
    shutil.rmtree(gone)
    out = cli("ls")
    assert "(source gone)" in out and str(gone) in out and "moerun rm FOLDER" in out
    assert_fits_80(out)

    out = CliRunner().invoke(app, ["rm", str(gone), "-y"], env={"COLUMNS": "80"})
    assert out.exit_code == 0, out.output
    assert "removed 1 quantized cache of" in out.stderr
    assert not caches[gone].exists() and caches[kept].is_dir() and kept.is_dir()
    assert [c.path for c in library.quantized_caches()] == [caches[kept]]

    # By the cache's own path: the cache goes, the folder it was built from stays.
    cli("rm", str(caches[kept]), "-y")
    assert not caches[kept].exists() and (kept / "config.json").is_file()
    for args in (["rm", str(gone), "-y"], ["rm", str(kept), "--revision", "main", "-y"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code != 0 and isinstance(result.exception, library.MoerunError), result.output
        assert "\n" not in str(result.exception)
    # The embedded demo: nothing to remove but the caches built from it.
    demo_cache = Path(moerun.load("demo", bits=4, device="cpu").offload_info["quantized_cache"])
    assert "1 quantized cache of demo" in CliRunner().invoke(app, ["rm", "demo", "-y"]).stderr
    assert not demo_cache.exists()


def test_one_reader_takes_the_language_model_out_of_a_multimodal_config():
    from moerun.config_checks import text_config

    wrapper = {
        "model_type": "llama4",
        "tie_word_embeddings": False,
        "text_config": {"num_local_experts": 16, "tie_word_embeddings": True},
    }
    assert text_config(wrapper) == {**wrapper, "num_local_experts": 16, "tie_word_embeddings": True}
    plain = {"model_type": "mixtral", "num_local_experts": 8}
    assert text_config(plain) is plain and text_config({"text_config": None}) == {"text_config": None}
