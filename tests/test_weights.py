"""CheckpointWeights on real safetensors files: single, sharded, and broken in the usual ways."""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moerun.errors import MoerunError
from moerun.weights import CheckpointWeights, read_header


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g, dtype=torch.float32),
        "model.layers.0.mlp.gate.weight": torch.randn(4, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).to(torch.float16),
        "model.norm.weight": torch.ones(8, dtype=torch.bfloat16),
        "lm_head.weight": torch.randn(16, 8, generator=g, dtype=torch.float32),
    }


def _write_sharded(folder: Path, tensors: dict[str, torch.Tensor], n_shards: int = 3) -> list[str]:
    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    weight_map = {}
    for i, file in enumerate(files):
        part = {k: tensors[k] for k in names[i::n_shards]}
        save_file(part, folder / file)
        weight_map.update({k: file for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return files


def _assert_same(weights: CheckpointWeights, tensors: dict[str, torch.Tensor]) -> None:
    assert weights.keys() == sorted(tensors)
    for name, expected in tensors.items():
        assert name in weights
        assert weights.shape(name) == tuple(expected.shape)
        assert weights.dtype(name) == expected.dtype
        got = weights.get(name)
        assert got.dtype == expected.dtype
        assert torch.equal(got, expected)


def test_single_file_round_trip(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    with CheckpointWeights.open(tmp_path) as weights:
        _assert_same(weights, tensors)
        assert "nope" not in weights


def test_sharded_round_trip(tmp_path):
    tensors = _tensors()
    _write_sharded(tmp_path, tensors)
    with CheckpointWeights.open(str(tmp_path)) as weights:
        _assert_same(weights, tensors)


def test_tensor_outlives_close(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    weights = CheckpointWeights.open(tmp_path)
    t = weights.get("lm_head.weight")
    weights.close()
    assert torch.equal(t, tensors["lm_head.weight"])


def test_get_as_checks_shape_and_casts(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    with CheckpointWeights.open(tmp_path) as weights:
        got = weights.get_as("model.layers.0.mlp.gate.weight", (4, 8), torch.float32)
        assert got.dtype == torch.float32
        assert torch.equal(got, tensors["model.layers.0.mlp.gate.weight"].float())
        with pytest.raises(MoerunError, match=r"^tensor model.norm.weight has shape \[8\], expected \[8, 1\]$"):
            weights.get_as("model.norm.weight", (8, 1), torch.float32)


def test_missing_tensor(tmp_path):
    save_file(_tensors(), tmp_path / "model.safetensors")
    with CheckpointWeights.open(tmp_path) as weights:
        msg = f"tensor model.layers.9.mlp.gate.weight is missing from the checkpoint in {tmp_path}"
        for call in (weights.get, weights.shape, weights.dtype):
            with pytest.raises(MoerunError) as e:
                call("model.layers.9.mlp.gate.weight")
            assert str(e.value) == msg


def test_no_weights(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle is never read")
    with pytest.raises(MoerunError) as e:
        CheckpointWeights.open(tmp_path)
    assert str(e.value) == f"no model.safetensors or model.safetensors.index.json in {tmp_path}"


def test_truncated_shard_is_named(tmp_path):
    files = _write_sharded(tmp_path, _tensors())
    shard = tmp_path / files[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-5])
    with pytest.raises(MoerunError) as e:
        CheckpointWeights.open(tmp_path)
    assert str(e.value) == (
        f"model-00002-of-00003.safetensors is truncated (expected {len(data)} bytes, "
        f"found {len(data) - 5}); re-download it"
    )


def test_truncated_inside_header(tmp_path):
    save_file(_tensors(), tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(MoerunError, match=r"^model.safetensors is truncated .*re-download it$"):
        CheckpointWeights.open(tmp_path)


def test_trailing_bytes_rejected(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), path)
    path.write_bytes(path.read_bytes() + b"\0" * 4)
    with pytest.raises(MoerunError, match=r"^model.safetensors is not a valid safetensors file"):
        CheckpointWeights.open(tmp_path)


@pytest.mark.parametrize(
    "blob",
    [
        b"\xff" * 64,  # absurd header length
        struct.pack("<Q", 10) + b"not json!!" + b"\0" * 16,  # header is not JSON
        struct.pack("<Q", 2) + b"[]",  # JSON but not an object
        struct.pack("<Q", 60)
        + json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode().ljust(60)
        + b"\0" * 4,
    ],
    ids=["huge-length", "not-json", "not-object", "offsets-mismatch-shape"],
)
def test_garbage_header(tmp_path, blob):
    (tmp_path / "model.safetensors").write_bytes(blob)
    with pytest.raises(
        MoerunError, match=r"^model.safetensors is not a valid safetensors file \(.*\); re-download it$"
    ):
        CheckpointWeights.open(tmp_path)


def test_missing_shard_is_named(tmp_path):
    files = _write_sharded(tmp_path, _tensors())
    (tmp_path / files[2]).unlink()
    with pytest.raises(MoerunError, match=r"^model-00003-of-00003.safetensors is listed in .* but missing from "):
        CheckpointWeights.open(tmp_path)


def test_bad_index(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(MoerunError, match=r"^model.safetensors.index.json in .* is not a valid index"):
        CheckpointWeights.open(tmp_path)


def test_read_header_metadata_only(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(3, 5, dtype=torch.bfloat16)}, path, metadata={"format": "pt"})
    info = read_header(path)
    assert list(info) == ["a"]
    assert info["a"].shape == (3, 5) and info["a"].dtype == torch.bfloat16


@pytest.mark.parametrize("bits", [16, 4])
def test_a_load_reads_each_header_once(tmp_path, monkeypatch, bits):
    """The plan, the loader, the expert stores and the quantized cache's fingerprint all
    share the one open checkpoint: each shard's header is parsed once per load."""
    import moerun
    from moerun import weights
    from moerun.moe import store
    from tests.model_fixtures import make_checkpoint

    folder = make_checkpoint(tmp_path / "ckpt", "qwen3_moe", shards=3)
    monkeypatch.setenv("MOERUN_CACHE", str(tmp_path / "cache"))
    parsed = []
    real = weights.read_header
    monkeypatch.setattr(
        weights, "read_header", lambda path, raw_out=None: parsed.append(path.name) or real(path, raw_out)
    )
    monkeypatch.setattr(
        store, "source_fingerprint", lambda folder: pytest.fail("headers read again for the fingerprint")
    )
    moerun.load(str(folder), bits=bits, device="cpu", dtype="float32", expert_slots=2)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(parsed) == shards
