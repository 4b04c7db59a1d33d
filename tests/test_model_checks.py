"""Model folder checks: every bad input gets a message naming the path and the fix."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from backends.models.checks import (
    ModelFolderError,
    check_gguf_file,
    check_hf_folder,
    check_safetensors_file,
    inspect_model_folder,
    require_cuda,
    require_gguf,
    verify_sha256,
)
from backends.types import BackendError


# -- small fake checkpoints (no torch needed) -------------------------------------------------------

def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    header: dict[str, dict] = {}
    blobs: list[bytes] = []
    offset = 0
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    return path


def make_hf_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (root / "tokenizer.json").write_text("{}")
    (root / "tokenizer_config.json").write_text(json.dumps({"chat_template": "x"}))
    write_safetensors(root / "model.safetensors", {"a": np.ones((4, 8)), "b": np.zeros(3)})
    return root


def write_gguf(path: Path, arch: str = "qwen2") -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((8, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -- folders ---------------------------------------------------------------------------------------

def test_valid_hf_folder(tmp_path):
    folder = inspect_model_folder(make_hf_folder(tmp_path / "m"))
    assert folder.kind == "hf" and folder.model_type == "qwen2"
    assert [p.name for p in folder.safetensors] == ["model.safetensors"]
    assert folder.gguf is None and folder.has_hf_weights
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(folder.tokenizer_files)
    check_hf_folder(folder)


def test_missing_folder_says_what_to_put_there(tmp_path):
    with pytest.raises(ModelFolderError) as err:
        inspect_model_folder(tmp_path / "absent")
    text = str(err.value)
    assert str(tmp_path / "absent") in text and "does not exist" in text
    assert "config.json" in text and ".safetensors" in text and ".gguf" in text and "model.path" in text


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="is empty.*config.json"):
        inspect_model_folder(tmp_path / "empty")


def test_folder_with_unrelated_files(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hello")
    with pytest.raises(ModelFolderError, match="neither config.json nor a .gguf.*notes.txt"):
        inspect_model_folder(tmp_path / "x")


def test_path_to_a_plain_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelFolderError, match="is a file, not a folder"):
        inspect_model_folder(f)


def test_invalid_config_json(tmp_path):
    folder = make_hf_folder(tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="config.json is not valid JSON"):
        inspect_model_folder(folder)


def test_missing_tokenizer_files(tmp_path):
    folder = make_hf_folder(tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFolderError, match="has no tokenizer: copy tokenizer.json"):
        check_hf_folder(inspect_model_folder(folder))
    (folder / "vocab.json").write_text("{}")
    (folder / "merges.txt").write_text("")
    check_hf_folder(inspect_model_folder(folder))  # the slow-tokenizer pair is enough
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(ModelFolderError, match="no tokenizer_config.json"):
        check_hf_folder(inspect_model_folder(folder))


def test_config_without_weights(tmp_path):
    folder = make_hf_folder(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="no weights: copy the \\*.safetensors"):
        check_hf_folder(inspect_model_folder(folder))


def test_gguf_given_to_transformers_names_the_llamacpp_backend(tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    write_gguf(folder / "vibe.gguf")
    info = inspect_model_folder(folder)
    assert info.kind == "gguf" and info.gguf == folder / "vibe.gguf"
    with pytest.raises(ModelFolderError) as err:
        check_hf_folder(info)
    assert "vibe.gguf" in str(err.value) and "--backend llamacpp" in str(err.value)


def test_hf_folder_given_to_llamacpp_names_the_transformers_backend(tmp_path):
    info = inspect_model_folder(make_hf_folder(tmp_path / "m"))
    with pytest.raises(ModelFolderError) as err:
        require_gguf(info)
    assert "no .gguf" in str(err.value) and "--backend transformers" in str(err.value)


# -- safetensors -----------------------------------------------------------------------------------

def test_truncated_safetensors(tmp_path):
    folder = make_hf_folder(tmp_path / "m")
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ModelFolderError, match="missing 10 bytes.*truncated or corrupt"):
        check_hf_folder(inspect_model_folder(folder))


def test_safetensors_with_extra_bytes(tmp_path):
    f = write_safetensors(tmp_path / "x.safetensors", {"a": np.ones(4)})
    f.write_bytes(f.read_bytes() + b"junk")
    with pytest.raises(ModelFolderError, match="extra 4 bytes"):
        check_safetensors_file(f)


def test_safetensors_header_length_beyond_the_file(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(ModelFolderError, match="header length 10000 does not fit"):
        check_safetensors_file(f)


def test_safetensors_too_short_and_bad_header(tmp_path):
    f = tmp_path / "short.safetensors"
    f.write_bytes(b"abc")
    with pytest.raises(ModelFolderError, match="too short"):
        check_safetensors_file(f)
    g = tmp_path / "bad.safetensors"
    g.write_bytes(struct.pack("<Q", 5) + b"{oops")
    with pytest.raises(ModelFolderError, match="header is not valid JSON"):
        check_safetensors_file(g)


def test_safetensors_tensor_size_mismatch(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}
    raw = json.dumps(header).encode()
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 12)
    with pytest.raises(ModelFolderError, match="should take 16 bytes"):
        check_safetensors_file(f)


def test_safetensors_written_by_the_library_pass(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    f = tmp_path / "lib.safetensors"
    safetensors_numpy.save_file({"w": np.ones((3, 5), dtype=np.float16), "i": np.arange(7)}, str(f),
                                metadata={"format": "pt"})
    assert check_safetensors_file(f) == 2


def test_sharded_index_with_a_missing_shard(tmp_path):
    folder = make_hf_folder(tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFolderError, match="missing.*model-00002-of-00002.safetensors"):
        check_hf_folder(inspect_model_folder(folder))


# -- pickle ----------------------------------------------------------------------------------------

def test_pickle_weights_need_the_opt_in(tmp_path):
    folder = make_hf_folder(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    info = inspect_model_folder(folder)
    with pytest.raises(ModelFolderError) as err:
        check_hf_folder(info)
    assert "pytorch_model.bin" in str(err.value) and "model.allow_pickle_weights: true" in str(err.value)
    check_hf_folder(info, allow_pickle_weights=True)


def test_safetensors_are_preferred_over_pickle(tmp_path):
    folder = make_hf_folder(tmp_path / "m")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    check_hf_folder(inspect_model_folder(folder))  # no opt-in needed: the .bin is not used


# -- GGUF ------------------------------------------------------------------------------------------

def test_valid_gguf(tmp_path):
    assert check_gguf_file(write_gguf(tmp_path / "ok.gguf")) == "qwen2"
    info = inspect_model_folder(tmp_path / "ok.gguf")  # a .gguf path works as the model path
    assert info.kind == "gguf" and require_gguf(info) == tmp_path / "ok.gguf"


def test_gguf_with_unsupported_architecture(tmp_path):
    f = write_gguf(tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(ModelFolderError, match="architecture 'llama'.*qwen2"):
        check_gguf_file(f)


def test_truncated_gguf(tmp_path):
    f = write_gguf(tmp_path / "t.gguf")
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ModelFolderError, match="truncated or corrupt"):
        check_gguf_file(f)
    g = tmp_path / "head.gguf"
    g.write_bytes(f.read_bytes()[:20])
    with pytest.raises(ModelFolderError, match="truncated or corrupt"):
        check_gguf_file(g)


def test_file_named_gguf_that_is_not_one(tmp_path):
    f = tmp_path / "fake.gguf"
    f.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ModelFolderError, match="not a GGUF file"):
        check_gguf_file(f)


def test_several_ggufs_need_a_choice(tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    write_gguf(folder / "a-q8.gguf")
    write_gguf(folder / "b-f16.gguf")
    with pytest.raises(ModelFolderError, match="several GGUF files.*model.gguf_file"):
        require_gguf(inspect_model_folder(folder))
    assert require_gguf(inspect_model_folder(folder, gguf_file="b-f16.gguf")) == folder / "b-f16.gguf"
    with pytest.raises(ModelFolderError, match="does not exist; GGUF files in .*a-q8.gguf"):
        inspect_model_folder(folder, gguf_file="c.gguf")


# -- SHA-256 ---------------------------------------------------------------------------------------

def test_sha256_check(tmp_path):
    folder = make_hf_folder(tmp_path / "m")
    good = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    verify_sha256(folder, {"config.json": good.upper()})
    with pytest.raises(ModelFolderError) as err:
        verify_sha256(folder, {"config.json": "0" * 64})
    assert good in str(err.value) and "0" * 64 in str(err.value) and "config.json" in str(err.value)
    with pytest.raises(ModelFolderError, match="lists missing.bin.*does not exist"):
        verify_sha256(folder, {"missing.bin": "0" * 64})


def test_sha256_via_the_backend_load(tmp_path, tiny_model_dir):
    pytest.importorskip("torch")
    from backends.config import Manifest
    from backends.engines.transformers import TransformersBackend

    folder = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, folder)
    manifest = Manifest.model_validate({
        "model": {"path": str(folder), "sha256": {"model.safetensors": "a" * 64}},
        "transformers": {"device": "cpu"},
    })
    with pytest.raises(BackendError, match="SHA-256"):
        TransformersBackend(manifest).load()


# -- CUDA ------------------------------------------------------------------------------------------

def test_require_cuda_explains_the_fix():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        require_cuda()
        return
    with pytest.raises(BackendError) as err:
        require_cuda()
    text = str(err.value)
    assert "transformers.device: cpu" in text and "cpu_fallback" in text
