"""Shared builders for tests: a character-level tokenizer and a saved tiny model folder with text data."""

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
MODEL_TYPES = ["llama", "mistral", "qwen2", "qwen3"]
TINY_PLAN = {"layer_group_size": 2, "mla": {"kv_lora_rank": 32, "qk_rope_head_dim": 8}}


def tiny_recipe(**sections):
    """A validated Recipe for the tiny models (periodic plan of 2, latent 32, 8 RoPE dims) with `sections` merged in."""
    from ling_surgery.surgery.config import Recipe

    return Recipe.model_validate({"plan": TINY_PLAN, **sections})


def tiny_model(model_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        # Random norms and biases so copies and folds are actually exercised (HF inits them to 1 / 0).
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.2 * torch.randn_like(param))
    return model.requires_grad_(False)


def char_tokenizer():
    """A 100-symbol character tokenizer (fits the tiny models' vocab of 128), built offline."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    from tokenizers import decoders

    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>")


def save_tiny_source(folder: Path, model_type: str = "llama", **overrides) -> Path:
    model = tiny_model(model_type, **overrides)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder
