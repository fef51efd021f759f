"""Shared builders for tests: a character-level tokenizer and a saved tiny model folder with text data."""

import json
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


MOE_TINY = {  # tiny MoE sources (research/moe.md §5): 8 experts of width 32, 2 per token
    "qwen3_moe": dict(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    # shared width 48 is not a multiple of the expert width: the target pads it with zeros
    "qwen2_moe": dict(moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=False),
    "mixtral": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "deepseek_v3": dict(moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                        n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32,
                        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=4,
                        head_dim=8),  # transformers reads the RoPE width from head_dim
    "glm4_moe": dict(moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                     n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=1.5),
    "dots1": dict(moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                  n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=2.0, norm_topk_prob=True),
}
MOE_TYPES = list(MOE_TINY)


def tiny_moe_model(model_type: str, seed: int = 0, **overrides):
    """A tiny MoE source with decisive random routers and non-zero selection biases (zero ones hide bugs)."""
    model = tiny_model(model_type, seed, **{**MOE_TINY[model_type], **overrides})
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.endswith("mlp.gate.weight"):
                tensor.copy_(torch.randn_like(tensor) * 2 / tensor.shape[1] ** 0.5)
            elif name.endswith("e_score_correction_bias"):
                tensor.copy_(0.1 * torch.randn_like(tensor))
    return model


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


def bpe_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer (GPT-2/SmolLM kind) trained in-process on a few sentences, with SmolLM2's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The quick brown fox jumps over the lazy dog.", "Linear attention keeps a fixed-size state.",
            "Multi-head latent attention caches a compressed latent per token.", "In 1984, 12345 people counted 3.14 apples!"]
    tok.train_from_iterator(text * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    return fast


# Text the family tokenizers are trained on: several scripts, code, numbers, whitespace runs.
TOKENIZER_TEXT = [
    "The quick brown fox jumps over the lazy dog.", "Linear attention keeps a fixed-size state.",
    "Multi-head latent attention caches a compressed latent per token.", "In 1984, 12345 people counted 3.14 apples!",
    "Grüße aus Köln: Straße, Äpfel, naïve café.", "Привет, мир! Как дела?", "東京は晴れ。大阪は雨です。",
    "def square(x):\n    return x ** 2  # 1024 * 768\n", "if (a != b) { y = a[i] + 0.5f; }\t// tab\r\n",
]
# Tokenised by transformers and llama.cpp in every GGUF parity test; has characters the training text lacks.
TOKENIZER_PROBE = ("Hello, world! The fox's 3 foxes didn't jump. Grüße aus Köln — naïve café. Привет, мир! "
                   "東京は晴れ、京都は曇り。 def f(x):\n    return x**2  # 12345 + 3.14 = 12348.14\n\tTabs  and   spaces 🙂 "
                   "ℵ₀ 2024-12-08")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
TOKENIZER_FAMILIES = ["gpt2", "smollm", "llama3", "qwen2", "mistral"]


def family_tokenizer(family: str, vocab_size: int = 512):
    """A tokenizer of one family's kind, trained in-process on `TOKENIZER_TEXT` and built the way its checkpoints load:
    gpt2 (plain ByteLevel), smollm (single digits + ByteLevel), llama3 (Llama-3's split regex, ignore_merges, BOS added),
    qwen2 (Qwen2Tokenizer: NFC, Qwen's regex), mistral (LlamaTokenizer: SentencePiece-style ▁ pieces with byte fallback,
    merges of every pair that forms a piece, as transformers converts SentencePiece models)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer

    if family == "mistral":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        tok.train_from_iterator(TOKENIZER_TEXT * 20, trainers.BpeTrainer(vocab_size=vocab_size - 259))
        pieces = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        names = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in pieces]
        vocab = {name: i for i, name in enumerate(names)}
        merges = sorted(((a, b) for a in vocab for b in vocab if a + b in vocab and not a.startswith("<") and
                         not b.startswith("<")), key=lambda m: (vocab[m[0] + m[1]], vocab[m[0]], vocab[m[1]]))
        return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, legacy=False)
    specials = {"llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]}.get(
        family, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = Tokenizer(models.BPE(ignore_merges=family == "llama3"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=family in ("gpt2", "smollm"))
    split = {"llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}.get(family)
    if split:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"), byte_level])
    elif family == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TOKENIZER_TEXT * 20, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if family == "qwen2":
        spec = json.loads(tok.to_str())["model"]
        return Qwen2Tokenizer(vocab=spec["vocab"], merges=[tuple(m) for m in spec["merges"]], unk_token=None,
                              bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if family == "llama3":
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                       pad_token="<|end_of_text|>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")


def save_tiny_source(folder: Path, model_type: str = "llama", **overrides) -> Path:
    model = tiny_model(model_type, **overrides)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def tiny_overrides(model, data) -> list[str]:
    """`--set` overrides that resize the shipped `ci-smoke` recipe for the tiny random models."""
    return [
        f"source.model={model}", f"data.train={data}", "data.seq_len=32", "data.heldout_fraction=0.3",
        "plan.layer_group_size=2", "plan.mla.kv_lora_rank=32", "plan.mla.qk_rope_head_dim=8",
        "stages.init.calibration_tokens=128", "stages.attention_transfer.tokens=256",
        "stages.logit_distill.tokens=256", "eval.tokens=128", "eval.seq_len=32",
        "eval.each_stage.tasks=[arc_easy]",  # the tiny models' 256 positions hold no passkey prompt
    ]


def tiny_source_with_text(root: Path, model_type: str = "llama") -> tuple[Path, Path]:
    """A saved tiny model (Llama unless `model_type` names another; MoE types from `tiny_moe_model`) with its character
    tokenizer, and a text file to train on."""
    if model_type in MOE_TINY:
        tiny_moe_model(model_type).save_pretrained(root / "model")
        char_tokenizer().save_pretrained(root / "model")
    else:
        save_tiny_source(root / "model", model_type)
    data = root / "data.txt"
    data.write_text("".join(f"Paragraph {i}: " + "the model reads text and learns. " * 3 + "\n\n" for i in range(200)))
    return root / "model", data


# Shapes llama.cpp's blocks accept: KDA head dim 64, MLA nope 32 + rope 32, latent 64 (rows multiples of 32).
GGUF_READY_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=64, max_position_embeddings=512, tie_word_embeddings=False)
GGUF_READY_PLAN = {"layer_group_size": 2, "mla": {"kv_lora_rank": 64, "qk_rope_head_dim": 32}}


def gguf_ready_teacher(tok, model_type: str = "llama", **overrides):
    """A tiny model of `model_type` (Llama unless named; MoE types as `tiny_moe_model`) with the tokenizer's vocabulary
    and specials, shaped so every GGUF type can hold its tensors."""
    specials = dict(bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else 1,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    build = tiny_moe_model if model_type in MOE_TINY else tiny_model
    return build(model_type, vocab_size=len(tok), **{**specials, **GGUF_READY_SHAPE, **overrides})


def gguf_ready_student(tok, plan: dict | None = None, teacher=None, target: str = "hybrid-linear"):
    """The upgrade of `teacher` (default: `gguf_ready_teacher(tok)`; bailing_hybrid with layers 1 and 3 MLA unless
    `plan` or `target` say otherwise), moved off the init so every transform is exercised."""
    from ling_surgery.surgery.architectures import get_arch
    from ling_surgery.surgery.config import Recipe
    from ling_surgery.surgery.init_maps import build_student, init_student_state
    from ling_surgery.surgery.targets import layer_plan, target_config

    teacher = teacher if teacher is not None else gguf_ready_teacher(tok)
    recipe = Recipe.model_validate({"target": target, "plan": plan or GGUF_READY_PLAN})
    config = target_config(teacher.config, layer_plan(recipe, 4), recipe)
    arch = get_arch(teacher.config.model_type)
    stats = None
    # biases are folded, and softmax routers mapped, over calibration inputs
    if arch.moe is not None or any(name.endswith("_proj.bias") for name in teacher.state_dict()):
        from ling_surgery.surgery.taps import collect_stats

        generator = torch.Generator().manual_seed(0)
        stats = collect_stats(teacher, arch, [torch.randint(0, len(tok), (2, 64), generator=generator)])
    state = init_student_state(teacher.state_dict(), arch, teacher.config, config, stats, recipe.stages[0])
    model = build_student(state, config)
    with torch.no_grad():  # random gates, decays and conv taps exercise every transform
        for name, param in model.named_parameters():
            if "kv_a_proj_with_mqa" in name:  # relative noise: the latent rows stay in their norm's linear regime
                param.mul_(1 + 0.5 * torch.randn_like(param))
            elif name.endswith("mlp.gate.weight"):  # decisive routers whose sigmoid scores do not saturate to ties
                param.copy_(torch.randn_like(param) * 2 / param.shape[1] ** 0.5)
            else:
                param.add_(0.05 * torch.randn_like(param))
    return model


def vowel_share(completions, **_):
    """A user reward for RL tests (`helpers:vowel_share`): the share of vowels in each completion, so the completions of
    a tiny random model differ in reward and every update moves the weights."""
    return [sum(c in "aeiou" for c in text) / max(1, len(text)) for text in completions]


def kill_after_checkpoint(monkeypatch, step: int) -> None:
    """Make a stage trained by TRL stop (KeyboardInterrupt) right after its checkpoint at `step` is complete and its
    training state names it, as a kill there would; `monkeypatch.undo()` lets the next run go through."""
    from ling_surgery.surgery import sft

    saved = sft.StateMarker.on_save

    def stop(self, args, state, control, **kwargs):
        saved(self, args, state, control, **kwargs)
        if state.global_step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(sft.StateMarker, "on_save", stop)


def dies_after_saving(state, step: int):
    """`state` (a TrainingState) whose save at `step` completes and then stops the stage (KeyboardInterrupt), as a
    kill right after that in-stage checkpoint would; `state.saved_steps` lists the steps saved."""
    save = state.save
    state.saved_steps = []

    def save_then_die(payload, saved_step, steps):
        save(payload, saved_step, steps)
        state.saved_steps.append(saved_step)
        if saved_step == step:
            raise KeyboardInterrupt

    state.save = save_then_die
    return state
