"""hub.resolve on a real Hugging Face cache layout built in tmp_path; no network."""

import json

import pytest

from moerun import hub, registry
from moerun.errors import MoerunError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An HF hub cache holding owner/name at COMMIT, with refs/main pointing at it."""
    cache = tmp_path / "hub"
    repo = cache / "models--owner--name"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_repo_id_found_in_cache(hf_cache):
    assert hub.resolve("owner/name") == hf_cache / "models--owner--name" / "snapshots" / COMMIT


def test_revision_as_commit_hash(hf_cache):
    assert hub.resolve("owner/name", revision=COMMIT).name == COMMIT


def test_unknown_revision(hf_cache):
    with pytest.raises(MoerunError, match="is not in the local Hugging Face cache"):
        hub.resolve("owner/name", revision="f" * 40)


def test_uncached_repo(hf_cache):
    with pytest.raises(MoerunError) as e:
        hub.resolve("owner/other")
    assert str(e.value) == (
        f"owner/other is not in the local Hugging Face cache ({hf_cache}); "
        "download it first with `moerun pull owner/other`"
    )


def test_hf_home_is_honoured(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.hub_cache_dir() == tmp_path / "home" / "hub"


def test_alias_resolves_to_repo_id(hf_cache):
    with pytest.raises(MoerunError) as e:
        hub.resolve("mixtral-8x7b")
    assert str(e.value).startswith("mistralai/Mixtral-8x7B-Instruct-v0.1 is not in the local Hugging Face cache")
    assert "`moerun pull mistralai/Mixtral-8x7B-Instruct-v0.1`" in str(e.value)


def test_demo_alias_uses_package_folder(tmp_path, monkeypatch):
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "config.json").write_text("{}")
    monkeypatch.setattr(hub, "DEMO_DIR", demo)
    assert hub.resolve("demo") == demo


def test_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert hub.resolve(str(tmp_path)) == tmp_path


def test_folder_without_config(tmp_path):
    with pytest.raises(MoerunError) as e:
        hub.resolve(str(tmp_path))
    assert str(e.value) == f"no config.json in {tmp_path}: not a model folder"


def test_nonexistent_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MoerunError) as e:
        hub.resolve("./nowhere")
    assert str(e.value) == "no such folder: ./nowhere"


def test_file_is_not_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(MoerunError, match="^no such folder: model.safetensors$"):
        hub.resolve("model.safetensors")


def test_unknown_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MoerunError) as e:
        hub.resolve("gpt-9")
    assert str(e.value) == "unknown model 'gpt-9': not a folder, an alias (see `moerun models`) or a Hub repo id"


def test_read_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_moe"}')
    assert hub.read_config(tmp_path) == {"model_type": "qwen3_moe"}
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(MoerunError, match="config.json is not valid JSON") as e:
        hub.read_config(tmp_path)
    assert "\n" not in str(e.value)


def test_alias_table():
    assert registry.lookup("Mixtral-8x7B").repo_id == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert registry.lookup("qwen3-30b-a3b").repo_id == "Qwen/Qwen3-30B-A3B"
    assert registry.lookup("demo").repo_id == "embedded"
    assert registry.lookup("nope") is None
    assert registry.DEMO_DIR.parts[-3:] == ("moerun", "data", "demo")
    assert all(name == alias.name for name, alias in registry.ALIASES.items())
