"""The conversion config: one strict, nested schema that the CLI flags, `--config FILE` and `--set` all feed.

Unknown keys are rejected with a "did you mean" hint; everything is validated before any weights load.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ling_surgery.surgery.errors import SurgeryError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(Strict):
    model: str = Field("smollm2-135m", description="HF folder, hub id, .gguf file or embedded name")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")


class PlanConfig(Strict):
    layer_group_size: int | None = Field(
        6, ge=1, description="periodic plan: the last layer of every group keeps full attention (MLA)"
    )
    full_attention_layers: list[int] | None = Field(
        None, description="explicit MLA layer indices (non-periodic layouts are not served by vLLM/llama.cpp)"
    )


class MLAConfig(Strict):
    kv_lora_rank: int = Field(256, ge=1, description="latent width r of the compressed KV cache")
    qk_rope_head_dim: int = Field(32, ge=2, description="RoPE'd key/query dims per head (even); the rest are NoPE")
    svd: Literal["activation", "weight"] = Field(
        "activation", description="activation-aware SVD (calibration whitening) or plain weight SVD"
    )


class KDAConfig(Strict):
    chunk_size: int = Field(32, ge=1, description="chunk of the fast exact KDA training path")
    half_life_min: float = Field(2.0, gt=0, description="shortest forget-gate half-life at init (tokens)")
    half_life_max: float = Field(2048.0, gt=0, description="longest forget-gate half-life at init (tokens)")


class DataConfig(Strict):
    train: str = Field("wikipedia", description="'wikipedia' (packaged), a .txt/.jsonl/.parquet file or HF dataset")
    text_field: str = "text"
    heldout_fraction: float = Field(0.05, gt=0, lt=1, description="documents kept out of training for evaluation")
    seq_len: int = Field(256, ge=8)


class CalibrationConfig(Strict):
    tokens: int = Field(8192, ge=0, description="teacher tokens for activation statistics (0: plain inits)")


Trainable = Literal["mixers", "mlp", "norms", "embeddings", "all"]


class AttentionTransferConfig(Strict):
    """Stage 1: each new mixer learns its teacher layer's attention output from the teacher's inputs (MSE)."""

    tokens: int = Field(49_152, ge=0)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(5, ge=0)
    trainable: list[Trainable] = ["mixers"]


class LogitDistillConfig(Strict):
    """Stage 2: end-to-end KL(teacher ‖ student) on next-token distributions, teacher frozen."""

    tokens: int = Field(32_768, ge=0)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(5, ge=0)
    temperature: float = Field(1.0, gt=0)
    trainable: list[Trainable] = ["mixers", "mlp", "norms"]


class EvalConfig(Strict):
    tokens: int = Field(16_384, ge=0, description="held-out tokens for teacher vs. student perplexity")
    seq_len: int = Field(512, ge=8)


class ConvertConfig(Strict):
    source: SourceConfig = SourceConfig()
    target: Literal["hybrid-linear"] = "hybrid-linear"
    plan: PlanConfig = PlanConfig()
    mla: MLAConfig = MLAConfig()
    kda: KDAConfig = KDAConfig()
    data: DataConfig = DataConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    attention_transfer: AttentionTransferConfig = AttentionTransferConfig()
    logit_distill: LogitDistillConfig = LogitDistillConfig()
    eval: EvalConfig = EvalConfig()
    output: str | None = None
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: fp32 on CPU, bf16 on CUDA")

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.mla.qk_rope_head_dim % 2:
            raise ValueError(f"mla.qk_rope_head_dim must be even, got {self.mla.qk_rope_head_dim}")
        if self.kda.half_life_min > self.kda.half_life_max:
            raise ValueError("kda.half_life_min must not exceed kda.half_life_max")
        if self.plan.full_attention_layers is not None and any(i < 0 for i in self.plan.full_attention_layers):
            raise ValueError("plan.full_attention_layers must be non-negative layer indices")
        return self


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, before validation."""
    for item in overrides:
        if "=" not in item:
            raise SurgeryError(f"--set {item!r}: expected key.path=value, e.g. --set attention_transfer.tokens=2e4")
        path, value = item.split("=", 1)
        node = raw
        keys = path.strip().split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise SurgeryError(f"--set {item!r}: {key!r} is not a section")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # 2e4 and friends parse as strings in YAML 1.1
            try:
                parsed = float(parsed) if any(c in parsed for c in ".eE") else parsed
                parsed = int(parsed) if isinstance(parsed, float) and parsed.is_integer() else parsed
            except ValueError:
                pass
        node[keys[-1]] = parsed
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] = (), **flags: Any) -> ConvertConfig:
    """Build a validated ConvertConfig from a YAML file, `--set` overrides and explicit flags (flags win)."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SurgeryError(f"config file {str(path)!r} not found; pass an existing YAML file to --config")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise SurgeryError(f"config file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise SurgeryError(f"config file {str(path)!r} must hold a mapping of sections")
    raw = apply_overrides(raw, list(overrides))
    for dotted, value in flags.items():
        if value is not None:
            node = raw
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
    try:
        return ConvertConfig.model_validate(raw)
    except ValidationError as err:
        raise SurgeryError(describe_validation_error(err, ConvertConfig)) from None


def describe_validation_error(err: ValidationError, schema: type[BaseModel]) -> str:
    """One line for the first problem: the key path, what is wrong and a hint."""
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    path = ".".join(loc) or "config"
    if first["type"] == "extra_forbidden":
        known = _known_keys(schema, loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
        return f"config: unknown key {path!r}; {hint}"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"config: {path}: {first['msg']}{more}"


def _known_keys(schema: type[BaseModel], loc: list[str]) -> list[str]:
    for key in loc:
        field = schema.model_fields.get(key)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return sorted(schema.model_fields)
        schema = annotation
    return sorted(schema.model_fields)
