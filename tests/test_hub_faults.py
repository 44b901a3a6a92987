"""`moerun pull` against a loopback Hub that misbehaves (tests/hub_server.py's fault
switches): wrong bytes, transient and lasting 5xx / 429, cut connections, ignored ranges,
hostile commit ids, file names, blob ids and revisions, a corrupt cache, and concurrent pulls
of one repo into one cache by real processes.

Each fault goes through the CLI's real entry point (moerun.cli.main: exit code, the one
`error:` line on stderr) in this process, to keep the suite fast; real `moerun` subprocesses
where the process boundary is the point (one fault end to end, and the concurrent pulls).
After every failure the cache holds no partial and nothing was written outside it."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moerun import hub
from tests.hub_server import File, HubServer, real_file, use_hub

ROOT = Path(__file__).resolve().parents[1]
REPO = "faults/tiny"
BIG = "model-00001-of-00002.safetensors"  # LFS: named by sha256
SMALL = "model-00002-of-00002.safetensors"
PLAIN = "config.json"  # a plain git file: named by its git blob id


def _files() -> dict[str, File]:
    rnd = random.Random(17)
    return {
        PLAIN: real_file(b'{"model_type": "mixtral"}', lfs=False),
        "tokenizer.json": real_file(b'{"version": "1.0"}' + b" " * 3000, lfs=False),
        BIG: real_file(rnd.randbytes(400_000)),
        SMALL: real_file(rnd.randbytes(150_000)),
        "README.md": real_file(b"not needed"),
    }


@pytest.fixture(scope="module")
def server():
    with HubServer() as s:
        s.add_repo(REPO, _files())
        yield s


@pytest.fixture
def env(server, tmp_path, monkeypatch):
    e = use_hub(monkeypatch, server.url, tmp_path, MOERUN_RETRY_BASE_S="0.001", MOERUN_DEBUG="")
    server.reset()
    server.requests.clear()
    return e


def cli(*args: str, capsys, monkeypatch) -> tuple[int, list[str]]:
    """moerun.cli.main() as the console script runs it: (exit code, non-empty stderr lines)."""
    from moerun import cli as moerun_cli

    monkeypatch.setattr(sys, "argv", ["moerun", *args])
    capsys.readouterr()
    try:
        moerun_cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, lines


def one_line(code: int, lines: list[str]) -> str:
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in lines[0] and "(set MOERUN_DEBUG=1" not in lines[0], lines  # not an unexpected error
    return lines[0]


def storage(env) -> Path:
    return Path(env["HF_HUB_CACHE"]) / "models--faults--tiny"


def assert_clean(tmp_path: Path, *caches: Path) -> None:
    """No partial or temp file in the caches, every pointer inside its cache, nothing
    written in tmp_path outside them."""
    caches = caches or (tmp_path / "hub",)
    for p in tmp_path.rglob("*"):
        cache = next((c for c in caches if p == c or c in p.parents), None)
        assert cache is not None, f"written outside the cache: {p}"
        assert not p.name.endswith((".incomplete", ".tmp")), f"left behind: {p}"
        if p.is_symlink():
            assert cache in Path(os.path.realpath(p)).parents, f"{p} points outside"


def assert_verified(env, names=None) -> None:
    """Every pulled file is in the snapshot and its blob holds the bytes its name promises."""
    snapshot = hub.resolve(REPO)
    repo_files = _files()
    for name in names or [n for n in repo_files if n != "README.md"]:
        data = (snapshot / name).read_bytes()
        f = repo_files[name]
        assert os.path.realpath(snapshot / name).endswith("/blobs/" + f.etag)
        assert hashlib.sha256(data).hexdigest() == f.sha256


# -- wrong bytes and a corrupt cache ----------------------------------------------------------


@pytest.mark.parametrize("name, kind", [(BIG, "sha256"), (PLAIN, "git blob id")])
def test_wrong_bytes_fail_in_one_line_and_keep_nothing(server, env, tmp_path, capsys, monkeypatch, name, kind):
    server.wrong_bytes = {name}
    line = one_line(*cli("pull", REPO, capsys=capsys, monkeypatch=monkeypatch))
    assert name in line and kind in line and "deleted" in line
    etag = _files()[name].etag
    assert not (storage(env) / "blobs" / etag).exists()
    assert_clean(tmp_path)
    server.reset()  # a good server: the next pull completes and everything verifies
    assert cli("pull", REPO, capsys=capsys, monkeypatch=monkeypatch)[0] == 0
    assert_verified(env)
    assert_clean(tmp_path)


def test_a_corrupt_cached_blob_is_fetched_again(server, env, tmp_path, capsys, monkeypatch):
    assert cli("pull", REPO, capsys=capsys, monkeypatch=monkeypatch)[0] == 0
    blob = storage(env) / "blobs" / _files()[BIG].sha256
    blob.write_bytes(bytes(blob.stat().st_size))  # the right size, the wrong bytes (an old racing pull)
    server.requests.clear()
    assert cli("pull", REPO, capsys=capsys, monkeypatch=monkeypatch)[0] == 0
    assert server.gets(BIG) == [None] and server.gets(SMALL) == []  # only the bad one again
    assert_verified(env)


def test_a_bad_partial_left_by_an_earlier_pull_is_restarted_from_zero(server, env, tmp_path, capsys, monkeypatch):
    partial = storage(env) / "blobs" / (_files()[BIG].sha256 + ".incomplete")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\xff" * 1000)  # resumable length, wrong content
    assert cli("pull", REPO, capsys=capsys, monkeypatch=monkeypatch)[0] == 0
    assert server.gets(BIG) == ["bytes=1000-", None]  # resumed, failed verification, then from 0
    assert_verified(env)
    assert_clean(tmp_path)


def test_more_bytes_than_the_listed_size_are_refused(server, env, tmp_path, capsys, monkeypatch):
    server.extra_bytes = 10
    line = one_line(*cli("pull", REPO, capsys=capsys, monkeypatch=monkeypatch))
    assert "more than the" in line and PLAIN in line
    assert_clean(tmp_path)


def test_a_malformed_model_info_is_one_line(server, env, tmp_path, capsys, monkeypatch):
    server.raw_info = b'{"id": "faults/tiny", "sha": "' + b"0" * 40 + b'", "siblings": [{"size": 3}]}'
    line = one_line(*cli("pull", REPO, capsys=capsys, monkeypatch=monkeypatch))
    assert "model info" in line and "malformed" in line
    assert not Path(env["HF_HUB_CACHE"]).exists()


def test_an_unreachable_hub_is_not_retried(env, tmp_path, capsys, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MOERUN_RETRY_BASE_S", "1")
    start = time.monotonic()
    line = one_line(*cli("pull", REPO, capsys=capsys, monkeypatch=monkeypatch))
    assert "cannot reach" in line and time.monotonic() - start < 1.0  # offline is answered at once
    assert_clean(tmp_path)


def _cli_within(seconds: float, *args: str, capsys, monkeypatch) -> tuple[int, list[str]]:
    """cli() in a thread, failing the test (not hanging the suite) if it has not returned."""
    import threading

    result = []
    worker = threading.Thread(target=lambda: result.append(cli(*args, capsys=capsys, monkeypatch=monkeypatch)))
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"moerun {' '.join(args)} still running after {seconds} s"
    return result[0]


@pytest.mark.parametrize(
    "verb, hang, words",
    [
        ("pull", "/api/models/", "model info"),
        ("fit", "/api/models/", "model info"),
        ("pull", "/resolve/", "stopped at 0 of"),
    ],
)
def test_a_hub_that_never_answers_times_out_in_one_line(server, env, tmp_path, capsys, monkeypatch, verb, hang, words):
    """A Hub that accepts the connection and never answers: every request gives up after
    MOERUN_HUB_TIMEOUT_S, is retried like a 5xx, then one line (it hung for ever before)."""
    monkeypatch.setenv("MOERUN_HUB_TIMEOUT_S", "0.1")
    server.hang_path = hang
    code, lines = _cli_within(60, verb, REPO, capsys=capsys, monkeypatch=monkeypatch)
    server.reset()  # release the stalled handlers
    line = one_line(code, lines)
    assert words in line and "no answer within 0.1 s" in line and "MOERUN_HUB_TIMEOUT_S" in line, line
    assert_clean(tmp_path)


def test_a_bad_hub_timeout_is_one_line(server, env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOERUN_HUB_TIMEOUT_S", "0")
    line = one_line(*cli("pull", REPO, capsys=capsys, monkeypatch=monkeypatch))
    assert "MOERUN_HUB_TIMEOUT_S='0'" in line


# -- retries ---------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["/api/models/", "/resolve/"])
@pytest.mark.parametrize("status", [500, 429])
def test_transient_errors_are_retried(server, env, tmp_path, capsys, monkeypatch, where, status):
    server.fail_status, server.fails_left, server.fail_path = status, 3, where
    assert cli("pull", REPO, capsys=capsys, monkeypatch=monkeypatch)[0] == 0
    assert server.fails_left == 0
    assert_verified(env)
    assert_clean(tmp_path)


def test_a_short_retry_after_is_honoured_a_long_one_gives_up(server, env, tmp_path, capsys, monkeypatch):
    server.fail_status, server.fails_left, server.fail_path, server.retry_after = 429, 1, "/resolve/", "1"
    start = time.monotonic()
    assert cli("pull", REPO, capsys=capsys, monkeypatch=monkeypatch)[0] == 0
    assert time.monotonic() - start >= 1.0  # the base delay is 1 ms: only Retry-After explains it
    server.fails_left, server.retry_after = 1, "3600"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub2"))
    line = one_line(*cli("pull", REPO, capsys=capsys, monkeypatch=monkeypatch))
    assert "429" in line and "3600 s" in line
    assert_clean(tmp_path, tmp_path / "hub", tmp_path / "hub2")


@pytest.mark.parametrize("where, words", [("/api/models/", "model info"), ("/resolve/", "stopped at 0 of")])
def test_lasting_errors_give_up_after_the_last_attempt(server, env, tmp_path, capsys, monkeypatch, where, words):
    server.fails_left, server.fail_path = 99, where
    line = one_line(*cli("pull", REPO, capsys=capsys, monkeypatch=monkeypatch))
    assert words in line and "500" in line and "5" in line
    assert 99 - server.fails_left == hub.DOWNLOAD_ATTEMPTS  # 5 tries, then stop
    assert_clean(tmp_path)


def test_a_cut_connection_on_a_server_that_ignores_range_restarts_from_zero(server, env, tmp_path, capsys, monkeypatch):
    size = _files()[BIG].size
    server.cut_after, server.cuts_left, server.cut_file, server.ignore_range = size // 3, 1, BIG, True
    assert cli("pull", REPO, capsys=capsys, monkeypatch=monkeypatch)[0] == 0
    assert server.gets(BIG) == [None, f"bytes={size // 3}-"]  # asked to resume, got the whole file
    assert_verified(env)
    assert_clean(tmp_path)


# -- hostile names ----------------------------------------------------------------------------


@pytest.mark.parametrize("sha", ["../../..", "0" * 39, "../" + "0" * 37, "A" * 40, ""])
def test_a_hostile_commit_id_is_refused(server, env, tmp_path, capsys, monkeypatch, sha):
    server.hostile_sha = sha
    line = one_line(*cli("pull", REPO, capsys=capsys, monkeypatch=monkeypatch))
    assert "commit" in line and "40-hex" in line
    assert not Path(env["HF_HUB_CACHE"]).exists()  # refused before anything was written
    assert_clean(tmp_path)


@pytest.mark.parametrize(
    "name",
    [
        "../../evil.safetensors",
        "/tmp/evil.safetensors",
        "a/../../x.json",
        "..\\..\\evil.safetensors",
        "ok/./x.json",
        "C:evil.safetensors",
        "config.json\n",
        "x\x00.safetensors",
        "a//b.json",
    ],
)
def test_a_hostile_file_name_is_refused(server, env, tmp_path, capsys, monkeypatch, name):
    server.add_repo("faults/names", {PLAIN: real_file(b"{}", lfs=False), name: real_file(b"x" * 100)})
    line = one_line(*cli("pull", "faults/names", capsys=capsys, monkeypatch=monkeypatch))
    assert "not a safe relative path" in line
    assert not Path(env["HF_HUB_CACHE"]).exists()
    assert_clean(tmp_path)


@pytest.mark.parametrize("sha256", [None, "../../../outside", "0" * 63, "g" * 64])
def test_missing_or_hostile_blob_ids_are_refused(server, env, tmp_path, capsys, monkeypatch, sha256):
    if sha256 is None:
        server.no_blob_ids, repo = True, REPO
    else:
        repo = "faults/etag"
        server.add_repo(repo, {PLAIN: real_file(b"{}", lfs=False), BIG: File(b"x" * 100, 100, sha256)})
    line = one_line(*cli("pull", repo, capsys=capsys, monkeypatch=monkeypatch))
    assert ("no blob id" in line) if sha256 is None else ("not a sha1 or sha256" in line)
    assert not Path(env["HF_HUB_CACHE"]).exists()  # in particular no blobs/None
    assert_clean(tmp_path)


@pytest.mark.parametrize(
    "revision",
    ["../../x", "/etc", "a/../b", "a..b", "x.lock", "a b", ".hidden", "a//b", "a\\b", "x~1", "@", "", "main/"],
)
def test_a_hostile_revision_is_refused_before_any_request(server, env, tmp_path, capsys, monkeypatch, revision):
    line = one_line(*cli("pull", REPO, "--revision", revision, capsys=capsys, monkeypatch=monkeypatch))
    assert "not a valid revision" in line
    assert server.requests == []
    assert_clean(tmp_path)


def test_valid_revisions_pass():
    for ok in ["main", "v1.0", "refs/pr/1", "release/2024-01", "a" * 40]:
        assert hub.check_revision(ok) == ok


# -- real processes ----------------------------------------------------------------------------


def _spawn(env: dict, *args: str) -> subprocess.Popen:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen(
        [sys.executable, "-m", "moerun", "pull", REPO, *args],
        cwd=ROOT,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_the_real_cli_fails_wrong_bytes_in_one_line(server, env, tmp_path):
    server.wrong_bytes = {SMALL}
    proc = _spawn(env)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and SMALL in lines[0], err
    assert_clean(tmp_path)


def test_concurrent_pulls_into_one_cache_wait_for_each_other(server, env, tmp_path, monkeypatch):
    """4 processes pull one repo into one fresh cache, 3 rounds. The transfers are slowed
    (~0.5 s for the repo) so that they overlap; with the per-blob lock each file is
    downloaded once per round, the others wait and use the verified blob."""
    server.chunk_delay_s = 0.05
    for round_ in range(3):
        e = {**env, "HF_HUB_CACHE": str(tmp_path / f"hub{round_}")}
        server.requests.clear()
        procs = [_spawn(e) for _ in range(4)]
        results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        assert all(rc == 0 for rc, _ in results), results
        for name in [BIG, SMALL, PLAIN]:
            assert server.gets(name) == [None], (round_, name, server.gets(name))  # once, by the lock holder
        monkeypatch.setenv("HF_HUB_CACHE", e["HF_HUB_CACHE"])
        assert_verified(e)
    assert_clean(tmp_path, *(tmp_path / f"hub{r}" for r in range(3)))
