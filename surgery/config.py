"""The recipe: one strict, nested schema that `run`, `convert`, `validate` and `plan` all read.

Nested by concern (source, target, plan, data, stages[], eval, export, runtime). Every level rejects unknown keys
with a "did you mean" hint; each stage picks its schema by `kind`; cross-field checks run at validation time, before
any weights load. `--set a.b=c` overrides edit the raw mapping before validation, and a stage is addressed by its
`name` (which defaults to its `kind`): `--set stages.logit_distill.tokens=2e6`.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from ling_surgery.surgery.errors import RecipeError, SurgeryError
from ling_surgery.surgery.sft_data import EASY_ARITHMETIC


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(Strict):
    model: str = Field("smollm2-135m", description="HF folder, hub id, .gguf file or embedded name")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    teacher: str | None = Field(None, description="the model a recipe that does not convert distills from (pretrain "
                                "on an upgraded model); unset: the model it was converted from, as its "
                                "ling_surgery_manifest.json says. A converting recipe's teacher is its source")


class MLAShape(Strict):
    """Unset values are derived from the source (surgery/defaults.py); `plan` and `--dry-run` show them."""

    kv_lora_rank: int | None = Field(
        None, ge=1, description="latent width r of the compressed KV cache (unset: half the teacher's KV-head width, ≤ 512)"
    )
    qk_rope_head_dim: int | None = Field(
        None, ge=2, description="RoPE'd key/query dims per head (even); the rest are NoPE (unset: half the head, ≤ 64)"
    )


class PlanConfig(Strict):
    """Which layers become what, and the shape of the new layers (unset values are derived from the source)."""

    layer_group_size: int | None = Field(
        None, ge=1, description="periodic plan: the last layer of every group keeps full attention (MLA); unset: the "
        "divisor of the layer count closest to Ling's 1 in 6-8"
    )
    full_attention_layers: list[int] | None = Field(
        None, description="explicit MLA layer indices (non-periodic layouts run in transformers and in ling-surgery's "
        "GGUF for llama.cpp, not in vLLM)"
    )
    placement: Literal["periodic", "measured"] = Field(
        None, validate_default=False, description="measured: keep as MLA the layers where the teacher retrieves "
        "(`plan --measure`); periodic: the last layer of every group (the layouts vLLM serves; on SmolLM2-135M their "
        "models found no pass key). Unset: periodic when layer_group_size or full_attention_layers is set, else measured"
    )
    full_attention_count: int | None = Field(
        None, ge=1, description="with placement: measured, how many layers stay MLA (unset: as many as the derived "
        "periodic layout has)"
    )
    measure_by: Literal["retrieval", "kl"] = Field(
        "retrieval", description="placement: measured ranks layers by their best copying head (retrieval) or by the "
        "teacher's KL when that layer alone becomes KDA (kl)"
    )
    mla: MLAShape = MLAShape()
    moe_layout: Literal["engines", "source"] = Field(
        "engines", description="MoE sources whose dense MLP layers are not all leading: 'engines' refuses them (vLLM "
        "and llama.cpp build dense MLPs only for the first layers); 'source' keeps the source's layout, which then runs "
        "in transformers only"
    )

    @model_validator(mode="before")
    @classmethod
    def _placement_from_layout(cls, data):
        # An explicit layout (a group size or layer list) is a periodic/explicit plan; otherwise the MLA layers are the
        # ones where the teacher retrieves: with the same data, the 1-in-10 periodic layout of the CPU demo found no
        # pass key at 512, 2k or 4k (measured placement: 6/6, 4/6, 3/6).
        if isinstance(data, dict) and data.get("placement") is None:
            explicit = data.get("layer_group_size") is not None or data.get("full_attention_layers") is not None
            data = {**data, "placement": "periodic" if explicit else "measured"}
        return data


class DataSource(Strict):
    """One source of a training mixture."""

    source: str = Field(description="'wikipedia' or 'chitchat' (packaged), a .txt/.md/.jsonl/.json/.parquet file or "
                        "folder, or a HF dataset (streamed)")
    weight: float = Field(1.0, gt=0, description="its share of the training tokens (weights are normalised)")
    text_field: str = "text"
    subset: str | None = Field(None, description="HF dataset config name")


class DataConfig(Strict):
    train: list[DataSource] = Field(
        min_length=1, description="one source ('wikipedia', 'chitchat', a .txt/.jsonl/.json/.parquet file or folder, "
        "or a HF dataset) or a weighted mixture: [{source: wikipedia, weight: 0.7}, {source: chitchat, weight: 0.3}]")
    text_field: str = Field("text", description="the text column of a single source given as a string")
    subset: str | None = Field(None, description="HF dataset config name (e.g. sample-10BT); hub data is streamed")
    epochs: int = Field(1, ge=1, description="passes the stages may make over the training text: text that runs out "
                        "before the stages' tokens is an error, or with epochs > 1 read again (reshuffled)")
    reread: bool = Field(False, description="a recipe that trains an existing upgraded model (pretrain) starts each "
                         "source after the documents the run that made the model read (its manifest's data_read); true: "
                         "read them again")
    heldout_fraction: float = Field(0.05, gt=0, lt=1, description="documents kept out of training for evaluation")
    seq_len: int = Field(1024, ge=8, description="training window length (tokens); 1024 holds a span and its copy "
                         "(on 256-token windows the upgraded SmolLM2-135M found no pass key at 2k)")
    attend_across_documents: bool = Field(
        False, description="training windows hold several documents; false: each is trained as if alone (attention, "
        "KDA and convolution state restart at every document start, for teacher and student); true: later documents "
        "see earlier ones")

    @model_validator(mode="before")
    @classmethod
    def _one_source(cls, data):
        # `train: wikipedia` (with text_field/subset beside it) is a mixture of one.
        if isinstance(data, dict) and isinstance(data.get("train", "wikipedia"), str):
            one = {"source": data.get("train", "wikipedia"), "text_field": data.get("text_field", "text"),
                   "subset": data.get("subset")}
            data = {**data, "train": [one]}
        elif isinstance(data, dict) and isinstance(data.get("train"), list):
            for key, default in (("text_field", "text"), ("subset", None)):
                entries = [e for e in data["train"] if isinstance(e, dict)]
                if data.get(key, default) != default and any(e.get(key, default) != data[key] for e in entries):
                    raise ValueError(f"data.{key} applies to a single source given as a string; with a list of "
                                     f"sources, set {key} on each entry, e.g. {{source: ..., {key}: {data[key]}}}")
        return data

    def sources(self) -> list[DataSource]:
        """The training sources with their weights normalised to shares."""
        total = sum(e.weight for e in self.train)
        return [e.model_copy(update={"weight": e.weight / total}) for e in self.train]

    def describe(self) -> str:
        """'wikipedia' or 'wikipedia 70% + chitchat 30%'."""
        entries = self.sources()
        return entries[0].source if len(entries) == 1 else " + ".join(f"{e.source} {e.weight:.0%}" for e in entries)


Trainable = Literal["mixers", "kda_mixers", "mla_mixers", "mlp", "norms", "embeddings", "all"]


class InitStage(Strict):
    """Calibration statistics from the teacher, then the init maps (exact copies, KDA and MLA from attention)."""

    kind: Literal["init"] = "init"
    name: str = "init"
    calibration_tokens: int = Field(8192, ge=0, description="teacher tokens for activation statistics (0: plain inits)")
    svd: Literal["activation", "weight"] = Field(
        "activation", description="MLA: activation-aware SVD (calibration whitening) or plain weight SVD"
    )
    latent_norm: Literal["linear", "per_token"] = Field(
        "linear", description="MLA latent RMSNorm at init: in its linear regime (keeps each token's key/value "
        "magnitudes) or normalising every token (the old init: far from the teacher)"
    )
    kda_half_life_min: float = Field(2.0, gt=0, description="shortest KDA forget-gate half-life at init (tokens)")
    kda_half_life_max: float = Field(2048.0, gt=0, description="longest KDA forget-gate half-life at init (tokens)")


class LoraSettings(Strict):
    """LoRA (PEFT) on every linear layer of the mixers and MLPs; the KDA conv, the output and latent norms and the
    forget gates train fully (PEFT cannot put LoRA on a depthwise conv); merged into the weights on export."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)


class TrainingStage(Strict):
    tokens: int = Field(ge=1, description="training tokens (steps = tokens // (batch_size × seq_len))")
    batch_size: int = Field(1, ge=1, description="windows per step")
    seq_len: int | None = Field(None, ge=8, description="this stage's training window length (None: data.seq_len); "
                                "e.g. short windows while the mixers learn, longer ones after, as context extension does")
    lr: float = Field(gt=0)
    warmup_steps: int = Field(5, ge=0)
    trainable: list[Trainable] = Field(min_length=1, description="parameter groups that train; the rest stay frozen")
    recall_mix: float = Field(0.0, ge=0, le=1, description="share of training windows in which a span is written twice "
                              "(text or random tokens), so distillation trains copying (surgery/synthetic.py)")
    grad_accumulation: int = Field(1, ge=1, description="micro-batches of batch_size windows per optimizer step")
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        "cosine", description="after warm-up: cosine to min_lr_ratio, wsd (constant, then a linear decay over the last "
        "decay_fraction of the steps), or constant")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the learning rate at the end of a cosine or wsd schedule, "
                                "as a share of lr")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: the share of the steps in the final decay")
    max_grad_norm: float = Field(1.0, gt=0, description="global gradient-norm clipping")
    router_bias_rate: float = Field(
        1e-3, ge=0, description="MoE students whose routers train: after each optimizer step every router's selection "
        "bias moves this much towards equal expert load (DeepSeek-V3's auxiliary-loss-free balancing); 0 keeps it")
    activation_checkpointing: bool = Field(False, description="recompute each layer in the backward pass instead of "
                                           "keeping its activations (less memory, ~1/3 more compute)")
    lora: LoraSettings | None = Field(None, description="train LoRA adapters on the trainable groups' linear layers "
                                      "instead of the layers themselves (merged into the weights at the end)")


class AttentionTransferStage(TrainingStage):
    """Each new mixer learns its teacher layer's attention output from the teacher's inputs (relative MSE)."""

    kind: Literal["attention_transfer"] = "attention_transfer"
    name: str = "attention_transfer"
    tokens: int = Field(49_152, ge=1)
    lr: float = Field(2e-3, gt=0)
    trainable: list[Trainable] = Field(["mixers"], min_length=1)
    recall_mix: float = Field(0.25, ge=0, le=1, description="share of training windows in which a span is written "
                              "twice, so the mixers learn the teacher's copying (surgery/synthetic.py)")


class LogitDistillStage(TrainingStage):
    """End-to-end KL(teacher ‖ student) on next-token distributions, teacher frozen."""

    kind: Literal["logit_distill"] = "logit_distill"
    name: str = "logit_distill"
    tokens: int = Field(49_152, ge=1)
    lr: float = Field(3e-4, gt=0)
    temperature: float = Field(1.0, gt=0)
    trainable: list[Trainable] | None = Field(
        None, min_length=1, description="unset: derived from the target — [kda_mixers, mlp, norms] for hybrids (the "
        "MLA layers keep the copying attention transfer taught them), [mixers, mlp, norms] for all-MLA")
    recall_mix: float = Field(0.5, ge=0, le=1, description="share of training windows in which a span is written "
                              "twice, so the KL is also taken where the teacher copies (surgery/synthetic.py)")


class PretrainStage(TrainingStage):
    """Continual pretraining with the teacher in the loop (RADLADS step 2 at scale; Ling 2.6): kl_weight ·
    KL(teacher ‖ student) + ce_weight · next-token cross-entropy on the data, after logit_distill or alone on an
    upgraded model (`ling-surgery pretrain`)."""

    kind: Literal["pretrain"] = "pretrain"
    name: str = "pretrain"
    tokens: int = Field(262_144, ge=1)
    lr: float = Field(1e-4, gt=0)
    trainable: list[Trainable] | None = Field(
        None, min_length=1, description="unset: as logit_distill — [kda_mixers, mlp, norms] for hybrids (training the "
        "MLA layers erased the copying attention transfer taught them), [mixers, mlp, norms] for all-MLA")
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        "wsd", description="after warm-up: wsd (constant, then a linear decay over the last decay_fraction of the "
        "steps: a run can be continued from before its decay), cosine to min_lr_ratio, or constant")
    kl_weight: float = Field(1.0, ge=0, description="weight of KL(teacher ‖ student) on next-token distributions")
    ce_weight: float = Field(0.0, ge=0, description="weight of next-token cross-entropy on the data itself")
    temperature: float = Field(1.0, gt=0, description="distillation temperature of the KL term")
    recall_mix: float = Field(0.25, ge=0, le=1, description="share of training windows in which a span is written "
                              "twice, so continued training keeps the copying the distillation stages taught")
    teacher_topk: int = Field(0, ge=0, description="0: the teacher runs in the loop; k > 0: its top-k next-token "
                              "log-probabilities are computed once before the stage, stored in the run folder "
                              "(teacher-logits/) and read from disk, and the KL is over those k tokens plus one bucket "
                              "for the rest (surgery/teacher_logits.py); on a GPU the teacher leaves it while the "
                              "student trains")

    @model_validator(mode="after")
    def _some_loss(self):
        if self.kl_weight == 0 and self.ce_weight == 0:
            raise ValueError("kl_weight and ce_weight are both 0: the stage would learn nothing; set one above 0")
        if self.teacher_topk and self.kl_weight == 0:
            raise ValueError(f"teacher_topk {self.teacher_topk} stores the teacher's logits for the KL term, but "
                             "kl_weight is 0: set kl_weight above 0 or teacher_topk: 0")
        return self


Mode = Literal["fast", "think"]


class SFTData(Strict):
    """One source of SFT conversations (surgery/sft_data.py has the table of sources)."""

    source: str = Field(description="reasoning-gym, chitchat, a .jsonl/.json file of {messages: [...]} rows, or a hub "
                        "dataset name (org/name, streamed)")
    examples: int = Field(ge=1, description="conversations drawn from it (reasoning-gym: each problem once per mode)")
    modes: list[Mode] = Field(["fast", "think"], min_length=1, description="reasoning-gym and chitchat: the modes "
                              "written (files and datasets carry their own: an answer in <think> markers is think mode)")
    tasks: list[str] | None = Field(None, description="reasoning-gym tasks (unset: [gsm_symbolic])")
    config: dict[str, Any] = Field({}, description="reasoning-gym: the tasks' settings (reasoning_gym.create_dataset "
                                   "keywords), e.g. {min_terms: 2, max_terms: 3, max_digits: 1} for chain_sum")
    messages_field: str = Field("messages", description="files and datasets: the field holding the conversation")
    split: str = Field("train", description="hub datasets: the split read")
    traces: Literal["dataset", "teacher"] = Field(
        "dataset", description="reasoning-gym think mode: the worked solutions the task ships, or solutions a model "
        "writes (trace_model), kept only where its final answer is right")
    trace_model: str | None = Field(None, description="traces: teacher — the model that solves the problems (folder, "
                                    "run folder, hub id or embedded name; unset: the run's source model)")
    trace_max_tokens: int = Field(384, ge=16, description="traces: teacher — longest solution written")

    @model_validator(mode="after")
    def _chitchat_is_fast(self):
        if self.source == "chitchat" and "think" in self.modes:
            raise ValueError("chitchat has no reasoning to put in think mode; set modes: [fast] for it")
        if self.traces == "teacher" and (self.source != "reasoning-gym" or "think" not in self.modes):
            raise ValueError("traces: teacher writes think-mode solutions to reasoning-gym problems; use it on a "
                             "reasoning-gym source whose modes include think")
        if self.config and self.source != "reasoning-gym":
            raise ValueError("config holds reasoning-gym task settings; set it on a reasoning-gym source")
        if self.trace_model is not None and self.traces != "teacher":
            raise ValueError("trace_model is the model that writes traces; set traces: teacher with it")
        return self


class SamplingSettings(Strict):
    """How the aligned model asks to be decoded, written into its generation_config.json (which vLLM and SGLang read
    as their default sampling parameters, and `ling-surgery eval` follows). Qwen3's and DeepSeek-R1's settings for
    thinking: greedy decoding makes small reasoning models repeat a line until the token limit instead of closing
    their think block (on the CPU demo, 40 GSM8K problems: 5 think answers greedy, none sampled this way)."""

    temperature: float = Field(0.6, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(20, ge=0, description="0: no top-k cut")


class SFTStage(Strict):
    """Decoupled SFT through TRL's SFTTrainer: both modes in one run, loss on the assistant turns only."""

    kind: Literal["sft"] = "sft"
    name: str = "sft"
    data: list[SFTData] = Field(
        default_factory=lambda: [SFTData(source="reasoning-gym", examples=320, tasks=["gsm_symbolic"]),
                                 SFTData(source="reasoning-gym", examples=160, tasks=["chain_sum"],
                                         config=EASY_ARITHMETIC),
                                 SFTData(source="chitchat", examples=40, modes=["fast"])],
        min_length=1, description="conversation sources, mixed and shuffled (default sized for a 2-core CPU: 160 "
        "word problems and 80 one-digit sums in both modes and 40 chats, two passes in ~18 min at 115 tok/s)")
    epochs: float = Field(2.0, gt=0, description="passes over the data (measured on the CPU demo: a second pass took "
                          "think-mode obedience from 55% to 90%, greedy)")
    batch_size: int = Field(4, ge=1, description="conversations per optimizer step (padded, never packed: packing "
                            "leaks KDA state across conversations)")
    lr: float = Field(2e-4, gt=0, description="measured on the CPU demo: 1e-4 for 70 steps left both modes alike")
    warmup_steps: int = Field(5, ge=0)
    max_length: int = Field(512, ge=16, description="tokens per conversation (longer ones are truncated)")
    trainable: list[Trainable] | None = Field(
        None, min_length=1, description="parameter groups that train (LoRA: the groups whose linear layers get "
        "adapters); unset: [kda_mixers, mlp, norms] for upgraded hybrids, [mlp, norms] for all-MLA, [all] otherwise")
    lora: LoraSettings | None = Field(None, description="train LoRA adapters instead of every weight")
    chat_template: str | None = Field(None, description="a .jinja file to build the modes from, for a model whose "
                                      "own template is missing or cannot render a system turn")
    sampling: SamplingSettings | None = Field(
        default_factory=SamplingSettings, description="the sampling the exported model ships in its generation config "
        "(null: keep the source's, greedy for most)")


class RLData(Strict):
    """Verifiable problems for RL: seeded reasoning-gym tasks, scored by the task's own `score_answer`; each problem is
    asked once in every mode, so neither mode stops being sampled (and neither collapses)."""

    source: Literal["reasoning-gym"] = "reasoning-gym"
    tasks: list[str] | None = Field(None, description="reasoning-gym tasks (unset: [gsm_symbolic])")
    config: dict[str, Any] = Field({}, description="the tasks' settings (reasoning_gym.create_dataset keywords), "
                                   "e.g. {min_terms: 2, max_terms: 3, max_digits: 1} for chain_sum")
    problems: int = Field(ge=1, description="distinct problems (each asked once per mode per epoch)")
    modes: list[Mode] = Field(["fast", "think"], min_length=1)


BUILTIN_REWARDS = ("correctness", "length", "length_by_accuracy", "format")



class RewardSpec(Strict):
    """One reward and its weight (the total is the weighted sum; GRPO normalises it within each prompt's group).

    correctness: the task's scorer on the answer after the think block (1 when right). length: Evo-CoT's dynamic length
    reward (Ling 2.0 §4.2, arXiv 2510.22115): p = 0.5 − (l − l_min)/(l_max − l_min) over the group, paid as p when
    correct and min(p, 0) when wrong — short right answers gain, long wrong ones lose; length_by_accuracy: the same
    times the share of the prompt's group that is right (Evo-CoT's larger weight on easy tasks, smaller on hard).
    format: −0.5 when an answer breaks its mode (a think marker in fast mode; a think block that is not closed and
    followed by an answer in think mode). Or `module:function`, called as TRL calls reward functions (prompts,
    completions, completion_ids and the dataset columns mode, task, answer; one float per completion)."""

    name: str
    weight: float = 1.0


def default_rewards() -> list[RewardSpec]:
    return [RewardSpec(name="correctness"), RewardSpec(name="length", weight=0.5), RewardSpec(name="format")]


ImportanceSamplingLevel = Literal["token", "sequence", "sentence"]
LossType = Literal["grpo", "dapo", "bnpo", "dr_grpo", "luspo", "sapo", "cispo", "vespo"]
# The losses whose policy term is the clipped (or soft-clipped) ratio alone: the sentence-level ratio replaces the
# log-probabilities that term reads (cispo and vespo also weight raw log-probabilities; luspo is TRL's sequence-only).
SENTENCE_LOSSES = ("grpo", "dapo", "bnpo", "dr_grpo", "sapo")
# Clip ranges: PPO's 0.2 per token; GSPO's 3e-4/4e-4 per sequence (arXiv 2507.18071 §5.1); LPO's 0.03 per sentence
# (Ling 2.0 §4.2).
DEFAULT_EPSILON = {"token": (0.2, 0.2), "sequence": (3e-4, 4e-4), "sentence": (0.03, 0.03)}


class RLStage(Strict):
    """Fine-grained RL through TRL's GRPOTrainer: verifiable rewards, Evo-CoT's length reward, and the importance ratio
    and its clipping per token, per sequence (GSPO) or per sentence (LPO, Ling 2.0 §4.2)."""

    kind: Literal["rl"] = "rl"
    name: str = "rl"
    data: list[RLData] = Field(
        default_factory=lambda: [RLData(tasks=["gsm_symbolic"], problems=8),
                                 RLData(tasks=["chain_sum"], config=EASY_ARITHMETIC, problems=40)],
        min_length=1, description="problem sources (default sized for a 2-core CPU: the SFT's word problems, and sums "
        "of one-digit numbers the CPU demo's model sometimes gets right, so correctness has something to pay)")
    rewards: list[RewardSpec] = Field(default_factory=default_rewards, min_length=1)
    importance_sampling_level: ImportanceSamplingLevel = Field(
        "sentence", description="token (PPO/GRPO), sequence (GSPO: one ratio per completion) or sentence (LPO: one "
        "ratio per sentence, the mean log-ratio of its tokens; sentences end at . ! ? or a newline)")
    loss_type: LossType = Field("dapo", description="TRL's loss (dapo: token-sum over the batch, no length bias)")
    epsilon: float | None = Field(None, gt=0, description="lower clip range (unset: 0.2 token, 3e-4 sequence, "
                                  "0.03 sentence)")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip range (unset: 0.2, 4e-4, 0.03)")
    beta: float = Field(0.0, ge=0, description="KL penalty to the stage's starting model (0: none, as DAPO/GSPO/LPO)")
    num_generations: int = Field(8, ge=2, description="completions per prompt (the group its rewards are normalised in)")
    prompts_per_rollout: int = Field(4, ge=1, description="prompts sampled together; the rollout is "
                                     "prompts_per_rollout × num_generations completions")
    updates_per_rollout: int = Field(2, ge=1, description="optimizer steps one rollout is split into: every one after "
                                     "the first is off-policy, where the importance ratio and its clipping act")
    epochs: int = Field(1, ge=1, description="passes over the problems")
    max_completion_length: int = Field(160, ge=4, description="tokens per completion (longer ones are cut)")
    lr: float = Field(2e-5, gt=0)
    warmup_steps: int = Field(2, ge=0, description="the first step runs at lr 0: Adam's first step moves every weight "
                              "by lr whatever its gradient (on the CPU demo at 3e-5: KL 14.5 from the rollout policy)")
    trainable: list[Trainable] | None = Field(None, min_length=1, description="as stages.sft.trainable")
    lora: LoraSettings | None = Field(None, description="train LoRA adapters instead of every weight")
    sampling: SamplingSettings | None = Field(
        None, description="how completions are sampled (unset: as the model ships in its generation config — an "
        "aligned model's sampling; temperature 1 for a greedy one)")
    generation: Literal["auto", "generate", "vllm"] = Field(
        "auto", description="the rollout sampler: vllm (TRL's colocated vLLM, on CUDA with vllm installed, for models "
        "vLLM loads as they are), generate (transformers; an upgraded hybrid on CPU: ling-surgery's cached KDA "
        "sampler), or auto (vllm where it can run, else generate)")

    def clip_range(self) -> tuple[float, float]:
        low, high = DEFAULT_EPSILON[self.importance_sampling_level]
        low = self.epsilon if self.epsilon is not None else low
        return low, self.epsilon_high if self.epsilon_high is not None else (low if self.epsilon is not None else high)


Stage = Annotated[Union[InitStage, AttentionTransferStage, LogitDistillStage, PretrainStage, SFTStage, RLStage],
                  Field(discriminator="kind")]
STAGE_KINDS = ("init", "attention_transfer", "logit_distill", "pretrain", "sft", "rl")
CONVERT_KINDS = ("init", "attention_transfer", "logit_distill")  # the stages that build and recover an upgraded model
ALIGN_KINDS = ("sft", "rl")
DEFAULT_STAGES = [{"kind": kind} for kind in CONVERT_KINDS]
ALIGN_STAGES = [{"kind": kind} for kind in ALIGN_KINDS]  # `align`: SFT, then RL
PRETRAIN_STAGES = [{"kind": "pretrain"}]  # `pretrain`


def _check_task_names(tasks: list[str]) -> None:
    from ling_surgery.evals.tasks import TASKS

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(TASKS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(TASKS)}"
        raise ValueError(f"unknown task {unknown[0]!r}; {hint}")


class StageEvalConfig(Strict):
    """Benchmarks run on every stage's model right after the stage (teacher once per run), with cheap budgets, so a
    stage that loses recall or generation quality shows where it happens (report.json `trajectory`)."""

    tasks: list[str] = Field([], description="tasks run after every stage, e.g. [passkey, niah, arc_easy]")
    limit: int = Field(1, ge=1, description="documents per task (recall tasks: items per length × depth cell)")
    recall_lengths: list[int] = Field([512, 2048], min_length=1, description="passkey/niah context lengths")
    recall_depths: list[float] = Field([0.0, 0.5, 1.0], min_length=1, description="passkey/niah needle depths in [0, 1]")

    @model_validator(mode="after")
    def _known_tasks(self):
        _check_task_names(self.tasks)
        if not all(0 <= d <= 1 for d in self.recall_depths):
            raise ValueError("recall_depths must lie in [0, 1] (0: start of the haystack, 1: its end)")
        return self


class EvalConfig(Strict):
    tokens: int = Field(16_384, ge=0, description="held-out tokens for teacher vs. upgraded perplexity (0: skip)")
    seq_len: int = Field(512, ge=8)
    tasks: list[str] = Field([], description="benchmarks run after export, teacher vs. upgraded (ling-surgery report)")
    limit: int | None = Field(None, ge=1, description="documents per benchmark (None: CPU defaults, all on CUDA)")
    inference: bool = Field(False, description="also benchmark prefill/decode speed and cache memory")
    each_stage: StageEvalConfig = StageEvalConfig()

    @model_validator(mode="after")
    def _known_tasks(self):
        _check_task_names(self.tasks)
        return self


class ExportConfig(Strict):
    output: str | None = Field(None, description="run folder: stage checkpoints in stages/, the upgraded model in model/")
    verify: bool = Field(True, description="reload the export in a fresh process and compare logits bit for bit")


class RuntimeConfig(Strict):
    """How to compute, not what: changing these never invalidates a finished stage."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: fp32 on CPU, bf16 autocast on CUDA")
    kda_chunk_size: int = Field(32, ge=1, description="chunk of the exact fast KDA training path")
    save_every: int = Field(25, ge=0, description="in-stage checkpoint every N optimizer steps, for --resume (0: never)")
    engine: Literal["ddp", "fsdp2", "zero3"] = Field(
        "ddp", description="over several processes: ddp (a whole replica of the student per process), fsdp2 (its "
        "weights, gradients and AdamW state sharded over them by PyTorch FSDP2, each decoder layer gathered while it "
        "computes) or zero3 (the same by DeepSpeed ZeRO-3; needs the deepspeed extra)")
    teacher: Literal["replicated", "sharded"] = Field(
        "replicated", description="runtime.engine fsdp2 or zero3: the frozen teacher whole on every device, or sharded "
        "(FSDP2) while a stage trains (1/N of its weights per device, each layer gathered for its forward)")
    devices: int = Field(1, ge=1, description="processes the run is launched on, one device each (accelerate launch "
                         "--num_processes): each trains batch_size / devices windows of every batch; the memory plan "
                         "is per device")
    device_memory_gib: float | None = Field(None, gt=0, description="memory of each device; set, `validate` and `run` "
                                            "refuse a training stage whose planned peak exceeds it (`ling-surgery plan` "
                                            "shows the plan)")


class Recipe(Strict):
    source: SourceConfig = SourceConfig()
    target: Literal["hybrid-linear", "all-mla"] = Field(
        "hybrid-linear", description="hybrid-linear: KDA + gated MLA (bailing_hybrid); all-mla: MLA everywhere (deepseek_v3)"
    )
    plan: PlanConfig = PlanConfig()
    data: DataConfig = DataConfig()
    stages: list[Stage] = Field(default_factory=lambda: [InitStage(), AttentionTransferStage(), LogitDistillStage()])
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    seed: int = 0
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo):
        # `validate_raw` builds a partial recipe first (context "partial") and collects these problems itself.
        if not (info.context or {}).get("partial"):
            problems = cross_check_problems(self)
            if problems:
                raise RecipeProblems(problems)
        return self

    def stage(self, name: str):
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise SurgeryError(f"no stage named {name!r}; stages: {', '.join(s.name for s in self.stages)}")


class RecipeProblems(ValueError):
    """Every cross-field problem of a Recipe built directly (`validate_raw` collects them itself, with the rest)."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def cross_check_problems(recipe: Recipe) -> list[str]:
    """Every cross-field problem of a schema-valid recipe, one line each with its key path and its fix."""
    problems = []
    dr = recipe.plan.mla.qk_rope_head_dim
    if dr is not None and dr % 2:
        problems.append(f"plan.mla.qk_rope_head_dim must be even (RoPE rotates pairs), got {dr}; use {dr - 1} or {dr + 1}")
    if recipe.plan.full_attention_layers is not None and any(i < 0 for i in recipe.plan.full_attention_layers):
        problems.append("plan.full_attention_layers must be non-negative layer indices")
    if recipe.runtime.teacher == "sharded" and recipe.runtime.engine == "ddp":
        problems.append("runtime.teacher sharded needs a sharding engine: set runtime.engine fsdp2 (or zero3), or "
                        "runtime.teacher replicated")
    if recipe.target == "all-mla":
        explicit = sorted(k for k in ("layer_group_size", "full_attention_layers", "full_attention_count")
                          if getattr(recipe.plan, k) is not None)
        if explicit:
            problems.append(f"target all-mla turns every layer into MLA; remove plan.{explicit[0]}")
    if recipe.plan.placement == "measured":
        explicit = sorted(k for k in ("layer_group_size", "full_attention_layers") if getattr(recipe.plan, k) is not None)
        if explicit:
            problems.append(f"plan.placement measured chooses the MLA layers itself; remove plan.{explicit[0]} (set "
                            "plan.full_attention_count for how many)")
    elif recipe.plan.full_attention_count is not None:
        problems.append("plan.full_attention_count is for plan.placement: measured; set plan.placement: measured, or "
                        "use plan.layer_group_size / plan.full_attention_layers")
    names = [s.name for s in recipe.stages]
    kinds = [s.kind for s in recipe.stages]
    if not recipe.stages:
        problems.append("stages: the recipe has no stages; add at least one")
    elif any(k in CONVERT_KINDS for k in kinds) and kinds[0] != "init":
        problems.append("stages: the first stage must be `kind: init` (it builds the upgraded model the distillation "
                        "stages train)")
    elif "init" in kinds and any(k not in CONVERT_KINDS for k in kinds[: kinds.index("init")]):
        problems.append("stages: `kind: init` must come before the alignment stages (convert, then align)")
    if [s.kind for s in recipe.stages].count("init") > 1:
        problems.append("stages: only one `kind: init` stage is allowed")
    if recipe.source.teacher is not None and "init" in kinds:
        problems.append("source.teacher: a recipe that converts distills from its source (source.model); remove "
                        "source.teacher, or run the conversion first and pretrain the upgraded model after")
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"stages: name {name!r} is used twice; give each stage a unique `name`")
    for stage in recipe.stages:
        if stage.kind == "init" and stage.kda_half_life_min > stage.kda_half_life_max:
            problems.append(f"stages.{stage.name}: kda_half_life_min must not exceed kda_half_life_max")
        if stage.kind == "init" and 0 < stage.calibration_tokens < stage_seq_len(stage, recipe):
            problems.append(f"stages.{stage.name}.calibration_tokens {stage.calibration_tokens} is less than one "
                            f"data.seq_len window ({stage_seq_len(stage, recipe)}): calibration would read nothing; "
                            "raise it, or set 0 for plain inits")
        if isinstance(stage, TrainingStage):
            step = stage.batch_size * stage.grad_accumulation * stage_seq_len(stage, recipe)
            if stage.tokens < step:
                where = f"stages.{stage.name}.seq_len" if stage.seq_len else "data.seq_len"
                problems.append(
                    f"stages.{stage.name}.tokens {stage.tokens} buys no optimizer step: one step is batch_size × "
                    f"grad_accumulation × {where} = {step} tokens; raise tokens or lower batch_size"
                )
    for stage in recipe.stages:
        if stage.kind == "rl":
            problems += rl_problems(stage)
    if 0 < recipe.eval.tokens < recipe.eval.seq_len:
        problems.append(f"eval.tokens {recipe.eval.tokens} is less than one eval.seq_len window ({recipe.eval.seq_len}); "
                        "raise eval.tokens or set it to 0 to skip")
    return problems


def rl_problems(stage: RLStage) -> list[str]:
    """What TRL cannot combine, and reward names that do not resolve, one line each."""
    where, level, loss = f"stages.{stage.name}", stage.importance_sampling_level, stage.loss_type
    problems = []
    if level == "sentence" and loss not in SENTENCE_LOSSES:
        problems.append(f"{where}: loss_type {loss} cannot take the sentence-level ratio (it reads per-token "
                        f"log-probabilities beside the ratio); use one of {', '.join(SENTENCE_LOSSES)}")
    if level == "sentence" and stage.beta:
        problems.append(f"{where}: beta {stage.beta:g} (a per-token KL) cannot be combined with "
                        "importance_sampling_level sentence; set beta 0 or use token or sequence")
    if loss == "luspo" and level != "sequence":
        problems.append(f"{where}: loss_type luspo needs importance_sampling_level sequence")
    if loss == "vespo" and level != "token":
        problems.append(f"{where}: loss_type vespo needs importance_sampling_level token")
    if stage.prompts_per_rollout % stage.updates_per_rollout:
        problems.append(f"{where}: prompts_per_rollout {stage.prompts_per_rollout} must be a multiple of "
                        f"updates_per_rollout {stage.updates_per_rollout} (each update takes whole groups)")
    from ling_surgery.surgery.rewards import reward_problem

    for spec in stage.rewards:
        problem = reward_problem(spec.name)
        if problem:
            problems.append(f"{where}.rewards: {problem}")
    return problems


def stage_seq_len(stage, recipe) -> int:
    """The window length a stage trains (and calibrates) on: its own `seq_len`, else `data.seq_len`."""
    return getattr(stage, "seq_len", None) or recipe.data.seq_len


def parse_value(text: str, item: str | None = None) -> Any:
    """A `--set` value: YAML, plus numbers like 2e4 that YAML 1.1 reads as strings."""
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SurgeryError(f"--set {item or text!r}: the value is not valid YAML ({yaml_problem(err)}); quote a plain "
                           "string inside the argument, e.g. --set 'source.model=\"my{model\"'") from None
    if isinstance(parsed, str):
        try:
            number = float(parsed)
        except ValueError:
            return parsed
        return int(number) if number.is_integer() and any(c in parsed for c in ".eE") else number
    return parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides to a nested recipe mapping, before validation.

    Inside `stages` a path element is a stage name (or a list index): `stages.logit_distill.lr=1e-4`.
    """
    for item in overrides:
        if "=" not in item:
            raise SurgeryError(f"--set {item!r}: expected key.path=value, e.g. --set stages.logit_distill.tokens=2e4")
        path, value = item.split("=", 1)
        keys = path.strip().split(".")
        node: Any = raw
        for depth, key in enumerate(keys[:-1]):
            if isinstance(node, list):
                node = _stage_entry(node, key, item)
                continue
            if keys[: depth + 1] == ["stages"] and "stages" not in node:
                node["stages"] = [dict(s) for s in DEFAULT_STAGES]
            node = node.setdefault(key, {})
            if not isinstance(node, (dict, list)):
                raise SurgeryError(f"--set {item!r}: {key!r} is not a section")
        if isinstance(node, list):
            raise SurgeryError(f"--set {item!r}: name a stage field, e.g. stages.{keys[-1]}.tokens=…")
        node[keys[-1]] = parse_value(value, item)
    return raw


def _stage_entry(stages: list, key: str, item: str) -> dict:
    for entry in stages:
        if isinstance(entry, dict) and entry.get("name", entry.get("kind")) == key:
            return entry
    if key.isdigit() and int(key) < len(stages):
        return stages[int(key)]
    known = [str(e.get("name", e.get("kind"))) for e in stages if isinstance(e, dict)]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"stages: {', '.join(known)}"
    raise SurgeryError(f"--set {item!r}: no stage named {key!r}; {hint}")


def yaml_problem(err: yaml.YAMLError) -> str:
    """What a YAML parser error says went wrong, and where ("expected ',' or ']' … at line 1, column 5")."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem is None:
        return str(err).splitlines()[0]
    return problem + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "")


def read_recipe_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"recipe {str(path)!r} not found; pass a YAML file or a shipped recipe name (ling-surgery recipes ls)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise SurgeryError(f"recipe {str(path)!r} is not UTF-8 text (byte 0x{err.object[err.start]:02x} on line {line}); "
                           "save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise SurgeryError(f"recipe {str(path)!r} is not valid YAML: {yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise SurgeryError(f"recipe {str(path)!r} must hold a mapping of sections (source, plan, data, stages, …)")
    return raw


def load_recipe(recipe: str | Path | None = None, overrides: list[str] = (), base: dict | None = None,
                skip_kinds: tuple[str, ...] = (), **flags: Any) -> Recipe:
    """A validated Recipe from a YAML file or shipped recipe name, `--set` overrides and flags (flags win).

    Flags are dotted keys, e.g. ``load_recipe("smollm2-135m-cpu", output="runs/x")`` sets ``export.output``. `base` is
    the raw recipe used when no file is given (`align`: ``{"stages": ALIGN_STAGES}``).
    """
    from ling_surgery.surgery.recipes import resolve_recipe

    raw = read_recipe_file(resolve_recipe(recipe)) if recipe is not None else copy.deepcopy(base or {})
    raw = apply_overrides(raw, list(overrides))
    if skip_kinds:  # `align --no-sft` / `--no-rl`: the recipe's other stages only
        stages = raw.get("stages", DEFAULT_STAGES)
        kept = [s for s in stages if not (isinstance(s, dict) and s.get("kind") in skip_kinds)]
        if stages and not kept:
            raise SurgeryError(f"switching off {' and '.join(skip_kinds)} leaves the recipe no stage to run; keep one")
        raw["stages"] = kept
    for dotted, value in flags.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = FLAG_KEYS.get(dotted, dotted).split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return validate_raw(raw)


FLAG_KEYS = {"output": "export.output", "model": "source.model", "teacher": "source.teacher", "data": "data.train"}


def validate_raw(raw: dict) -> Recipe:
    """The validated recipe, or a `RecipeError` that lists every problem at once (not the first one only).

    Schema errors are collected, their keys dropped (left to their defaults) and the rest validated again, so one run
    reports an unknown key, a bad value and a cross-field problem together; the error carries that partial recipe.
    """
    raw = copy.deepcopy(raw)
    problems: list[str] = []
    partial = None
    for _ in range(8):  # each round drops at least one failing key; real recipes need two or three
        try:
            partial = Recipe.model_validate(raw, context={"partial": True})
            break
        except ValidationError as err:
            problems += [describe_error(e, raw) for e in err.errors()]
            if not _drop_failing_keys(raw, [e["loc"] for e in err.errors()]):
                break
    if partial is not None:
        problems += cross_check_problems(partial)
    if problems:
        raise RecipeError(problems, partial)
    return partial


def describe_error(error: dict, raw: dict) -> str:
    """One pydantic error as a line: the key path (stages by name), what is wrong and a hint."""
    loc = _named_loc(list(error["loc"]), raw)
    path = ".".join(loc) or "recipe"
    if error["type"] == "extra_forbidden":
        known = _known_keys(list(error["loc"])[:-1], raw)
        close = difflib.get_close_matches(loc[-1], known, n=1)
        elsewhere = [p for p in _all_paths(Recipe) if p.rsplit(".", 1)[-1] == loc[-1]]
        if close:
            hint = f"did you mean {close[0]!r}?"
        elif elsewhere:
            hint = f"it lives at {' or '.join(repr(p) for p in elsewhere)}"
        else:
            hint = f"known keys: {', '.join(known)}"
        return f"unknown key {path!r}; {hint}"
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return f"{path}: `kind` must be one of {', '.join(STAGE_KINDS)}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error" and not loc:
        return message
    return f"{path}: {message}"


def _drop_failing_keys(raw: dict, locs: list[tuple]) -> bool:
    """Remove the raw entries behind failing locations (the key in its mapping, or a whole stage entry whose kind is
    unknown) so the rest of the recipe can still be validated; False when nothing could be removed."""
    keys, stage_entries = [], set()
    for loc in locs:
        node, target = raw, None
        for depth, part in enumerate(loc):
            if isinstance(node, dict) and part in node:
                target = (node, part)
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                if loc[:depth] == ("stages",):
                    target = ("stage", part)
                node = node[part]
            elif isinstance(node, dict) and part in STAGE_KINDS:
                continue  # the discriminator tag pydantic puts into stage paths
            else:
                break
        if target is None:
            continue
        if target[0] == "stage":
            stage_entries.add(target[1])
        else:
            keys.append(target)
    for mapping, key in keys:
        mapping.pop(key, None)
    changed = bool(keys)
    for index in sorted(stage_entries, reverse=True):
        if isinstance(raw.get("stages"), list) and index < len(raw["stages"]):
            entry = raw["stages"][index]
            kind = entry.get("kind") if isinstance(entry, dict) else None
            bare = {"kind": kind, **({"name": entry["name"]} if "name" in entry else {})} if kind in STAGE_KINDS else None
            if bare is not None and entry != bare:
                raw["stages"][index] = bare  # a stage whose fields clash keeps its place (with defaults), so no
            else:  # spurious "no stages" or ordering problem follows the real one
                del raw["stages"][index]
            changed = True
    return changed


def _named_loc(loc: list, raw: dict) -> list[str]:
    """('stages', 1, 'logit_distill', 'lr') → ['stages', '<name of stage 1>', 'lr']."""
    out: list[str] = []
    i = 0
    while i < len(loc):
        part = loc[i]
        if out == ["stages"] and isinstance(part, int):
            stages = raw.get("stages") or DEFAULT_STAGES
            entry = stages[part] if part < len(stages) and isinstance(stages[part], dict) else {}
            out.append(str(entry.get("name", entry.get("kind", part))))
            if i + 1 < len(loc) and loc[i + 1] in STAGE_KINDS:
                i += 1  # pydantic puts the discriminator tag in the path
        else:
            out.append(str(part))
        i += 1
    return out


def _all_paths(schema: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key path of the schema; stage fields appear under their default stage name."""
    paths = []
    for key, field in schema.model_fields.items():
        path = f"{prefix}{key}"
        paths.append(path)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths += _all_paths(annotation, path + ".")
    if schema is Recipe:
        for kind, stage_schema in _STAGE_SCHEMAS.items():
            paths += [f"stages.{kind}.{key}" for key in stage_schema.model_fields if key not in ("kind", "name")]
    return paths


_STAGE_SCHEMAS = {"init": InitStage, "attention_transfer": AttentionTransferStage, "logit_distill": LogitDistillStage,
                  "pretrain": PretrainStage, "sft": SFTStage, "rl": RLStage}


def _known_keys(loc: list, raw: dict) -> list[str]:
    schema: type[BaseModel] = Recipe
    i = 0
    while i < len(loc):
        key = loc[i]
        if key == "stages" and schema is Recipe and i + 1 < len(loc):
            stages = raw.get("stages") or DEFAULT_STAGES
            index = loc[i + 1]
            kind = stages[index].get("kind") if isinstance(index, int) and index < len(stages) else None
            schema = _STAGE_SCHEMAS.get(kind, InitStage)
            i += 3 if i + 2 < len(loc) and loc[i + 2] in STAGE_KINDS else 2
            continue
        field = schema.model_fields.get(key)
        annotation = getattr(field, "annotation", None)
        items = getattr(annotation, "__args__", (None,))[0] if getattr(annotation, "__origin__", None) is list else None
        if isinstance(items, type) and issubclass(items, BaseModel) and i + 1 < len(loc) and isinstance(loc[i + 1], int):
            schema, i = items, i + 2  # an entry of a list of records (data.train.0.source)
            continue
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        schema = annotation
        i += 1
    return sorted(schema.model_fields)
