"""Which parameters a stage trains, by name: the `trainable` groups of a recipe and what LoRA trains in full.

Plain predicates on parameter names (no torch), shared by training (`training.select_trainable`, `sft.with_lora`) and
the memory plan's arithmetic (`memory_plan.trainable_parameters`), so both select the same tensors.
"""

from __future__ import annotations

import re

from ling_surgery.surgery.plan import KDA, MLA


def _mixer_of(name: str, types: list[str], kind: str | None) -> bool:
    """Whether a parameter belongs to a token mixer (of one kind — KDA or MLA — when `kind` is given)."""
    match = re.match(r"model\.layers\.(\d+)\.self_attn\.", name)
    return match is not None and (kind is None or types[int(match.group(1))] == kind)


# Predicates on (parameter name, per-layer mixer kinds). The per-kind mixer groups let a stage train the KDA layers
# while the MLA layers keep what attention transfer gave them (or the reverse).
TRAINABLE_GROUPS = {
    "mixers": lambda n, types: _mixer_of(n, types, None),
    "kda_mixers": lambda n, types: _mixer_of(n, types, KDA),
    "mla_mixers": lambda n, types: _mixer_of(n, types, MLA),
    "mlp": lambda n, types: ".mlp." in n,
    "norms": lambda n, types: "layernorm" in n or n == "model.norm.weight",
    "embeddings": lambda n, types: n in ("model.embed_tokens.weight", "lm_head.weight"),
    "all": lambda n, types: True,
}

# Modules (and bare parameters) of the trainable groups that LoRA cannot wrap and that therefore train in full.
LORA_FULL_MODULES = ("conv1d", "o_norm", "kv_a_layernorm", "A_log", "dt_bias")
