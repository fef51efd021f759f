"""Write the upgraded model as a stock `bailing_hybrid` checkpoint that transformers, vLLM, SGLang and llama.cpp load.

Written into a hidden temporary folder beside the destination and renamed into place at the end, so an
interrupted run never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ling_surgery.surgery.errors import SurgeryError

MANIFEST = "ling_surgery_manifest.json"


def check_output_dir(path: str | Path) -> Path:
    """The destination must not exist yet and its parent must be writable; checked before any work starts."""
    path = Path(path).expanduser().resolve()
    if path.exists():
        raise SurgeryError(f"output {str(path)!r} already exists; pass a new --output folder or remove it")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SurgeryError(f"cannot create the parent of output {str(path)!r}: {err.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise SurgeryError(f"output folder {str(parent)!r} is not writable; pick another --output")
    return path


def serving_config(config_dict: dict, config) -> dict:
    """Config keys the serving engines read that transformers does not write (see DESIGN.md, export target)."""
    layers = config.num_hidden_layers
    out = dict(config_dict)
    out.update(
        {
            "architectures": ["BailingMoeV3ForCausalLM"],
            # transformers writes the RoPE dim here; the engines (and transformers' own reload) read the KDA dim.
            "head_dim": config.linear_head_dim,
            "first_k_dense_replace": layers,
            "no_kda_lora": True,
            "kda_safe_gate": True,
            "gated_attention_proj_granularity_type": "head_wise",
            "rope_interleave": True,
            "num_nextn_predict_layers": 0,
            "tie_word_embeddings": False,
            "use_bias": False,
            "use_qkv_bias": False,
            "score_function": "sigmoid",
            "moe_router_enable_expert_bias": True,
            "moe_shared_expert_intermediate_size": config.intermediate_size,
            "num_shared_experts": 0,
            "moe_intermediate_size": config.intermediate_size,
            "norm_topk_prob": config.norm_topk_prob,
            "moe_renormalize": config.norm_topk_prob,
            "n_group": config.n_group,
            "num_expert_group": config.n_group,
            "num_experts_per_tok": config.num_experts_per_tok,
            "num_experts_per_token": config.num_experts_per_tok,
            "max_position_embeddings": config.max_position_embeddings,
            "model_max_length": config.max_position_embeddings,
        }
    )
    if config.rope_parameters:
        out["rope_theta"] = config.rope_parameters.get("rope_theta", out.get("rope_theta"))
    return out


def export_checkpoint(model, tokenizer, output: str | Path, manifest: dict, before_commit=None) -> Path:
    """Save model, tokenizer (with chat template), generation config and manifest atomically into `output`.

    `before_commit(folder)` runs on the finished temporary folder (checks, reports) before it is renamed into place.
    """
    output = Path(output)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        config_path.write_text(json.dumps(serving_config(json.loads(config_path.read_text()), model.config), indent=2) + "\n")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        if before_commit is not None:
            before_commit(tmp)
        os.replace(tmp, output)  # atomic on one filesystem; fails if `output` appeared meanwhile
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "the disk is full" if err.errno == 28 else (err.strerror or str(err))
        raise SurgeryError(f"export to {str(output)!r} failed: {reason}; nothing was written there") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
