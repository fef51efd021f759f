"""The memory plan: what each device holds while a training stage runs, from config arithmetic alone (no torch), so
that `plan` prints it and `validate` refuses a recipe that cannot fit the devices it names before any weight loads.

Per device, for each training stage (`attention_transfer`, `logit_distill`, `pretrain`):

- weights: the student's parameters in fp32 (bf16 autocast keeps fp32 master weights);
- gradients: 4 B per trainable parameter (under LoRA: the adapters and the modules LoRA trains in full);
- optimizer: AdamW's two fp32 moments, 8 B per trainable parameter;
- activations: what the forward keeps for the backward plus the loss's temporaries at the peak, for the tokens one
  device computes per micro-batch (batch_size ÷ devices windows of seq_len): per layer from `ACTIVATIONS`, plus the
  LM head's loss over the vocabulary; under bf16 autocast also the bf16 copies of the trainable weights; with
  activation checkpointing each layer's input and one layer's activations;
- teacher: its weights in the run's dtype (bf16 on CUDA, fp32 on CPU); none on a GPU while the stage reads stored
  top-k (the teacher waits in host memory); sharded (`runtime.teacher`, FSDP2) its 1/N, two decoder layers gathered
  and its root unit (embeddings, LM head);
- engine: over several processes, DDP's gradient buckets (a second copy of the gradients); under FSDP2 (weights,
  gradients and optimizer state ÷ devices) the whole layers it gathers — the one computing and the one prefetched,
  and a layer's full gradient before its reduce-scatter — and the root unit (embeddings, final norm, LM head),
  gathered through the step, with its gradients. DeepSpeed ZeRO-3 shards and gathers alike (`zero3.engine_config`
  sizes its buckets to a decoder layer) and also keeps an fp32 master copy of its partition of the trainable weights,
  counted with the weights.

The peak is weights + teacher + optimizer + engine + max(activations, gradients): the backward allocates gradients as
it frees activations, and `zero_grad(set_to_none=True)` frees them before the next forward; with grad_accumulation > 1
the gradients stay through the next micro-batch's forward, so both count.

Parameter counts come from the same tensor names and shapes the model classes create (`student_tensors`; a test
compares them with a meta-device model), so the stage's `trainable` groups select them exactly as training does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ling_surgery.surgery.plan import KDA, MLA, moe_layers, routed_experts

GIB = 2**30
CONV_KERNEL = 4  # bailing_hybrid's short_conv_kernel_size (transformers' default; target_config keeps it)


@dataclass(frozen=True)
class StudentDims:
    """The upgraded model's dims (`targets.target_config` without transformers): every one comes from the source."""

    model_type: str  # bailing_hybrid | deepseek_v3
    vocab: int
    hidden: int
    intermediate: int
    heads: int
    head_dim: int  # MLA value and KDA head dim = the source head dim
    kv_lora_rank: int
    rope_dim: int
    layer_types: tuple[str, ...]
    # MoE students: per layer MoE (True) or dense; routed experts, per token, their width and the shared experts
    sparse: tuple[bool, ...] = ()
    experts: int = 0
    top_k: int = 0
    expert_width: int = 0
    shared_experts: int = 0
    nope_dim: int | None = None  # MLA NoPE query/key dims (an MLA source's own); None: head_dim − rope_dim

    @property
    def qk_nope(self) -> int:
        return self.head_dim - self.rope_dim if self.nope_dim is None else self.nope_dim

    def is_sparse(self, i: int) -> bool:
        return bool(self.sparse) and self.sparse[i]

    def mlp_width(self, i: int) -> int:
        """The MLP width one token computes through in layer i: top-k experts and the shared ones, or the dense MLP."""
        return (self.top_k + self.shared_experts) * self.expert_width if self.is_sparse(i) else self.intermediate

    @classmethod
    def of_conversion(cls, shape, recipe, layer_types) -> "StudentDims":
        """From the source's `SourceShape` and a recipe whose plan values are resolved (`check_shapes`)."""
        from ling_surgery.surgery.targets import get_target

        moe = shape.moe
        experts = {} if moe is None else dict(sparse=moe.sparse, experts=moe.num_experts, top_k=moe.top_k,
                                              expert_width=moe.expert_width, shared_experts=moe.target_shared_experts)
        if shape.mla is not None:
            experts["nope_dim"] = shape.mla[1]
        return cls(get_target(recipe.target).model_type, shape.vocab_size, shape.hidden_size, shape.intermediate_size,
                   shape.num_heads, shape.head_dim, recipe.plan.mla.kv_lora_rank, recipe.plan.mla.qk_rope_head_dim,
                   tuple(layer_types), **experts)

    @classmethod
    def of_config(cls, config) -> "StudentDims":
        """From an upgraded model's config (object or config.json mapping)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        layers = get("num_hidden_layers")
        sparse = moe_layers(config)
        return cls(get("model_type"), get("vocab_size"), get("hidden_size"), get("intermediate_size"),
                   get("num_attention_heads"), get("v_head_dim"), get("kv_lora_rank"), get("qk_rope_head_dim"),
                   tuple(get("layer_types") or [MLA] * layers), sparse if any(sparse) else (), routed_experts(config),
                   get("num_experts_per_tok") or 0, get("moe_intermediate_size") or 0,
                   get("n_shared_experts") or get("num_shared_experts") or 0, get("qk_nope_head_dim"))


def student_tensors(dims: StudentDims) -> dict[str, tuple[int, ...]]:
    """Every parameter of the upgraded model, by the name and shape its transformers class gives it."""
    h, n, d, inter, r, dr = dims.hidden, dims.heads, dims.head_dim, dims.intermediate, dims.kv_lora_rank, dims.rope_dim
    tensors = {"model.embed_tokens.weight": (dims.vocab, h)}
    for i, kind in enumerate(dims.layer_types):
        p = f"model.layers.{i}."
        if kind == KDA:
            tensors |= {p + "self_attn.q_proj.weight": (n * d, h), p + "self_attn.k_proj.weight": (n * d, h),
                        p + "self_attn.v_proj.weight": (n * d, h),
                        p + "self_attn.conv1d.weight": (3 * n * d, 1, CONV_KERNEL),
                        p + "self_attn.forget_gate.A_log": (n,), p + "self_attn.forget_gate.dt_bias": (n * d,),
                        p + "self_attn.forget_gate.f_proj.weight": (n * d, h), p + "self_attn.b_proj.weight": (n, h),
                        p + "self_attn.o_norm.weight": (d,), p + "self_attn.o_proj.weight": (h, n * d),
                        p + "self_attn.g_proj.weight": (n * d, h)}
        else:
            dn = dims.qk_nope
            tensors |= {p + "self_attn.q_proj.weight": (n * (dn + dr), h),
                        p + "self_attn.kv_a_proj_with_mqa.weight": (r + dr, h),
                        p + "self_attn.kv_a_layernorm.weight": (r,),
                        p + "self_attn.kv_b_proj.weight": (n * (dn + d), r),
                        p + "self_attn.o_proj.weight": (h, n * d)}
            if dims.model_type == "bailing_hybrid":  # head-wise output gate
                tensors[p + "self_attn.g_proj.weight"] = (n, h)
        if dims.is_sparse(i):
            e, w, shared = dims.experts, dims.expert_width, dims.shared_experts * dims.expert_width
            tensors |= {p + "mlp.gate.weight": (e, h), p + "mlp.experts.gate_up_proj": (e, 2 * w, h),
                        p + "mlp.experts.down_proj": (e, h, w), p + "mlp.shared_experts.gate_proj.weight": (shared, h),
                        p + "mlp.shared_experts.up_proj.weight": (shared, h),
                        p + "mlp.shared_experts.down_proj.weight": (h, shared)}
        else:
            tensors |= {p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                        p + "mlp.down_proj.weight": (h, inter)}
        tensors |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    return tensors | {"model.norm.weight": (h,), "lm_head.weight": (dims.vocab, h)}


def teacher_root(shape) -> int:
    """A source's parameters outside its decoder layers: embeddings, LM head (unless tied), final norm."""
    return shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2) + shape.hidden_size


def teacher_parameters(shape) -> int:
    """Parameters of a Llama-family source, dense or MoE (a `sources.SourceShape`)."""
    from ling_surgery.surgery.architectures import ARCHITECTURES

    h, n, kv, d = shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim
    attention = 2 * h * n * d + 2 * h * kv * d + (n * d + 2 * kv * d if shape.qkv_bias else 0) + (h if shape.o_bias else 0)
    if shape.mla is not None:  # DeepSeek: q_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj
        r, dn, dr, dv = shape.mla
        attention = n * (dn + dr) * h + (r + dr) * h + r + n * (dn + dv) * r + h * n * dv
    arch = ARCHITECTURES.get(shape.model_type)
    if shape.qk_norm:  # q_norm, k_norm: per head, or over all heads (OLMoE)
        attention += 2 * d if arch.qk_norm_per_head else (n + kv) * d
    layers = shape.num_layers * (attention + 2 * h)
    moe = shape.moe
    for i in range(shape.num_layers):
        if moe is not None and moe.sparse[i]:  # router, experts, shared expert (and Qwen2-MoE's shared gate)
            layers += moe.num_experts * (h + 3 * h * moe.expert_width) + 3 * h * moe.shared_width
            layers += h if moe.shared_gated else 0
        else:
            layers += 3 * h * shape.intermediate_size
    return layers + teacher_root(shape)


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def trainable_parameters(tensors: dict[str, tuple[int, ...]], groups: list[str], layer_types, lora_rank: int | None) -> int:
    """Parameters that train: the groups' tensors (selected by name as training selects them), or under LoRA
    (`sft.with_lora`) an r × (in + out) adapter per linear weight of theirs (never the LM head, the embeddings) plus
    the modules LoRA cannot wrap, which train in full."""
    from ling_surgery.surgery.parameter_groups import LORA_FULL_MODULES, TRAINABLE_GROUPS

    total = 0
    for name, shape in tensors.items():
        if not any(TRAINABLE_GROUPS[g](name, list(layer_types)) for g in groups):
            continue
        if lora_rank is None:
            total += _numel(shape)
        elif any(f".{module}." in name or name.endswith(f".{module}") for module in LORA_FULL_MODULES):
            total += _numel(shape)
        elif len(shape) == 2 and name not in ("model.embed_tokens.weight", "lm_head.weight"):
            total += lora_rank * sum(shape)
    return total


@dataclass(frozen=True)
class LayerActivations:
    """Bytes per token that one layer keeps for the backward, as linear forms of the dims (coefficients × 4 B).

    Measured, not estimated: the student's fast training path (`kda.student_logits`) ran forward under FakeTensorMode
    with saved-tensor hooks counting each saved storage once (parameters excluded) on 17 configs of varied hidden
    size, heads, head dim, chunk, rank and MLP width; these forms reproduce every count within 0.05%
    (`tests/surgery/test_memory_plan.py` checks them against a fresh count). The LM head's factor × vocab × 4 B per
    token is the peak of the head and loss at the end of the forward (saved log-softmax outputs and the loss's
    temporaries; for the KL, the teacher's logits too), counted the same way with a live-storage tracker.
    """

    kda: tuple[float, ...]  # × (hidden, heads·dk, heads·dk²/chunk, heads·chunk, heads)
    mla: tuple[float, ...]  # × (hidden, heads·(qk_head_dim + v_head_dim)/2, kv_lora_rank, 1)
    mlp: tuple[float, ...]  # × (hidden, intermediate, 1)
    head: dict[str, float]  # loss → × vocab

    def layer(self, kind: str, dims: StudentDims, chunk: int, mlp: bool = True, width: int | None = None) -> float:
        """`width`: the MLP width a token goes through (an MoE layer's top-k and shared experts; default: dense)."""
        h, n, d = dims.hidden, dims.heads, dims.head_dim
        if kind == KDA:
            features = (h, n * d, n * d * d / chunk, n * chunk, n)
            mixer = sum(c * f for c, f in zip(self.kda, features))
        else:
            mixer = sum(c * f for c, f in zip(self.mla, (h, n * (2 * d) / 2, dims.kv_lora_rank, 1)))
        inner = sum(c * f for c, f in zip(self.mlp, (h, width or dims.intermediate, 1))) if mlp else 0
        return 4 * (mixer + inner)


ACTIVATIONS = {
    "fp32": LayerActivations(kda=(3, 32, 1, 2, 6.6), mla=(3, 6.53, 3, 66), mlp=(3, 4, 1),
                             head={"kl": 6.9, "ce": 2.9, "topk": 2.9}),
    "bf16": LayerActivations(kda=(5, 28.5, 1, 2, 7.1), mla=(3.5, 3.28, 2, 34), mlp=(3, 2, 1),
                             head={"kl": 6.15, "ce": 3.15, "topk": 3.15}),
}


@dataclass(frozen=True)
class StageMemory:
    """One training stage's memory on each device, in bytes."""

    stage: str
    kind: str
    weights: float
    gradients: float
    optimizer: float
    activations: float
    teacher: float
    engine: float
    accumulates: bool  # grad_accumulation > 1: gradients and activations are held at once
    trainable: int
    tokens: int  # per device per micro-batch

    @property
    def peak(self) -> float:
        held = self.gradients + self.activations if self.accumulates else max(self.gradients, self.activations)
        return self.weights + self.teacher + self.optimizer + self.engine + held


@dataclass(frozen=True)
class Hardware:
    """Where the stages run: processes (one device each), their device type and memory, and the numerics."""

    devices: int = 1
    device: str = "cpu"  # cpu | cuda
    memory_gib: float | None = None
    bf16: bool = False  # bf16 autocast and a bf16 teacher (CUDA's default)
    engine: str = "ddp"  # ddp | fsdp2 | zero3 (runtime.engine)
    shard_teacher: bool = False  # runtime.teacher: sharded (under fsdp2 or zero3 over several devices)

    @classmethod
    def of_runtime(cls, runtime, device: str | None = None, devices: int | None = None,
                   memory_gib: float | None = None) -> "Hardware":
        """The recipe's `runtime`; `run` passes where it really is (device type, processes launched, memory)."""
        # unresolved, auto is planned as where it runs without a GPU
        device = device or ("cuda" if runtime.device == "cuda" else "cpu")
        bf16 = runtime.dtype == "bfloat16" or (runtime.dtype == "auto" and device == "cuda")
        return cls(devices or runtime.devices, device, memory_gib or runtime.device_memory_gib, bf16, runtime.engine,
                   runtime.teacher == "sharded")

    @property
    def sharded(self) -> bool:
        return self.engine in ("fsdp2", "zero3") and self.devices > 1

    @property
    def shards(self) -> int:
        """How many ways the student's weights, gradients and optimizer state are split."""
        return self.devices if self.sharded else 1


def stage_memory(stage, dims: StudentDims, teacher_params: int, seq_len: int, chunk: int, hw: Hardware,
                 teacher_layout: tuple[int, int] = (0, 1)) -> StageMemory:
    """Per-device memory of one training stage (see the module doc); `teacher_layout`: the teacher's (root parameters,
    decoder layers), for a sharded teacher."""
    from ling_surgery.surgery.defaults import logit_distill_trainable

    tensors = student_tensors(dims)
    total = sum(_numel(s) for s in tensors.values())
    groups = stage.trainable or logit_distill_trainable(KDA in dims.layer_types)[0]
    lora = stage.lora.r if stage.lora is not None else None
    trainable = trainable_parameters(tensors, groups, dims.layer_types, lora)
    rows = -(-stage.batch_size // hw.devices)
    tokens = rows * (stage.seq_len or seq_len)
    table = ACTIVATIONS["bf16" if hw.bf16 else "fp32"]
    teacher_bytes = 2 if hw.bf16 else 4
    if stage.kind == "attention_transfer":
        # Only the mixers run, on the teacher's per-layer inputs, which are all held (taps: input and output per layer);
        # the teacher's forward computes its logits first.
        taps = 2 * len(dims.layer_types) * dims.hidden * teacher_bytes
        mixers = sum(table.layer(kind, dims, chunk, mlp=False) for kind in dims.layer_types)
        per_token = taps + max(mixers, dims.vocab * teacher_bytes)
        checkpointed = taps + max(max(table.layer(k, dims, chunk, mlp=False) for k in dims.layer_types),
                                  dims.vocab * teacher_bytes)
    else:
        loss = "kl" if stage.kind == "logit_distill" or getattr(stage, "kl_weight", 0) else "ce"
        if loss == "kl" and getattr(stage, "teacher_topk", 0):
            loss = "topk"
        head = 4 * table.head[loss] * dims.vocab
        layers = [table.layer(kind, dims, chunk, width=dims.mlp_width(i)) for i, kind in enumerate(dims.layer_types)]
        per_token = sum(layers) + head
        checkpointed = len(layers) * 4 * dims.hidden + max(layers) + head
    activations = tokens * (checkpointed if stage.activation_checkpointing else per_token)
    shards = hw.shards
    if hw.bf16:  # autocast's bf16 copies of the weights that train (under FSDP2: of the gathered layers')
        activations += 2 * trainable / shards
    on_gpu_topk = hw.device == "cuda" and getattr(stage, "teacher_topk", 0)
    if hw.sharded:  # units: each decoder layer, and the root (embeddings, final norm, LM head; shard_for_training)
        per_layer = [sum(_numel(t) for n, t in tensors.items() if n.startswith(f"model.layers.{i}."))
                     for i in range(len(dims.layer_types))]
        # the layer computing and the one prefetched, gathered, and one layer's gradient; the root throughout, with
        # its gradients
        engine = 4 * (3 * max(per_layer) + 2 * (total - sum(per_layer)))
    else:
        engine = 4 * trainable if hw.devices > 1 else 0  # DDP's gradient buckets
    teacher = teacher_bytes * teacher_params
    if hw.sharded and hw.shard_teacher and not getattr(stage, "teacher_topk", 0):
        # its shard, two decoder layers gathered (computing, prefetched) and its root unit through the forward
        teacher_root_params, teacher_layers = teacher_layout
        teacher = teacher_bytes * (teacher_params / shards + 2 * (teacher_params - teacher_root_params) / teacher_layers
                                   + teacher_root_params)
    return StageMemory(
        stage=stage.name, kind=stage.kind, gradients=4 * trainable / shards,
        weights=4 * (total + (trainable if hw.sharded and hw.engine == "zero3" else 0)) / shards,
        optimizer=8 * trainable / shards, activations=activations, teacher=0 if on_gpu_topk else teacher, engine=engine,
        accumulates=stage.grad_accumulation > 1, trainable=trainable, tokens=tokens)


TRAINING_KINDS = ("attention_transfer", "logit_distill", "pretrain")
# Below this share of free memory the plan warns: allocator fragmentation and the CUDA context take a few GiB.
HEADROOM = 0.9


@dataclass(frozen=True)
class MemoryPlan:
    """A recipe's training stages on its hardware (`runtime.devices`, `device`, `device_memory_gib`, `dtype`)."""

    stages: tuple
    dims: StudentDims
    teacher_params: int
    seq_len: int
    chunk: int
    hw: Hardware
    teacher_layout: tuple[int, int] = (0, 1)  # (root parameters, decoder layers): for runtime.teacher sharded

    @classmethod
    def of_recipe(cls, recipe, dims: StudentDims, teacher, hw: Hardware | None = None) -> "MemoryPlan":
        """`teacher`: the teacher's `SourceShape`."""
        return cls(tuple(s for s in recipe.stages if s.kind in TRAINING_KINDS), dims, teacher_parameters(teacher),
                   recipe.data.seq_len, recipe.runtime.kda_chunk_size, hw or Hardware.of_runtime(recipe.runtime),
                   (teacher_root(teacher), teacher.num_layers))

    @classmethod
    def of_shape(cls, shape, recipe, layer_types) -> "MemoryPlan | None":
        """For a conversion, from the source's `SourceShape` and the recipe with its plan values resolved; None when the
        source's header lacks the sizes (vocabulary, MLP width) the arithmetic needs."""
        if not (shape.vocab_size and (shape.intermediate_size or shape.moe)):
            return None
        return cls.of_recipe(recipe, StudentDims.of_conversion(shape, recipe, layer_types), shape)

    @classmethod
    def of_run(cls, conversion, hw: Hardware | None = None) -> "MemoryPlan | None":
        """For what `run` is about to do (`align.plan_recipe`): a conversion, or training an upgraded model against
        its teacher (`ling-surgery pretrain`); None when nothing trains with a teacher in this process's loop."""
        from ling_surgery.surgery.sources import SourceShape

        recipe = conversion.recipe
        if conversion.target_config is not None:
            dims, teacher = StudentDims.of_config(conversion.target_config), conversion.source_config
        elif getattr(conversion, "teacher_config", None) is not None and conversion.source_config.model_type in (
                "bailing_hybrid", "deepseek_v3"):
            dims, teacher = StudentDims.of_config(conversion.source_config), conversion.teacher_config
        else:
            return None
        return cls.of_recipe(recipe, dims, SourceShape.from_config(teacher), hw)

    def with_hardware(self, **changes) -> "MemoryPlan":
        return replace(self, hw=replace(self.hw, **changes))

    def stage(self, stage) -> StageMemory:
        return stage_memory(stage, self.dims, self.teacher_params, self.seq_len, self.chunk, self.hw, self.teacher_layout)

    def per_stage(self) -> list[StageMemory]:
        return [self.stage(s) for s in self.stages]

    def what_fits(self, stage) -> list[str]:
        """Changes to a stage that bring it within the devices' memory, each with its peak (at most three)."""
        from ling_surgery.surgery.config import LoraSettings

        budget = self.hw.memory_gib * GIB
        options = []
        if not stage.activation_checkpointing:
            options.append(("activation_checkpointing: true", {"activation_checkpointing": True}))
        if stage.lora is None:
            options.append(("lora: {r: 16}", {"lora": LoraSettings()}))
            if not stage.activation_checkpointing:
                options.append(("lora: {r: 16} with activation_checkpointing: true",
                                {"lora": LoraSettings(), "activation_checkpointing": True}))
        rows = -(-stage.batch_size // self.hw.devices)
        if rows > 1:
            options.append((f"batch_size {self.hw.devices} with grad_accumulation {rows * stage.grad_accumulation} "
                            "(the same tokens per step)",
                            {"batch_size": self.hw.devices, "grad_accumulation": rows * stage.grad_accumulation}))
        fits = []
        for text, update in options:
            peak = self.stage(stage.model_copy(update=update)).peak
            if peak <= budget:
                fits.append(f"{text} ({peak / GIB:.1f} GiB)")
        for engine in dict.fromkeys((self.hw.engine, "fsdp2")):
            for devices in (2, 4, 8, 16):
                if devices > self.hw.devices and stage.batch_size % devices == 0:
                    peak = self.with_hardware(devices=devices, engine=engine).stage(stage).peak
                    if peak <= budget:
                        fits.append(f"runtime.engine {engine} on {devices} devices ({peak / GIB:.1f} GiB each)")
                        break
        return fits[:4]

    def problems(self) -> list[str]:
        """One line per stage whose peak exceeds `runtime.device_memory_gib`: its arithmetic and what would fit."""
        if self.hw.memory_gib is None:
            return []
        problems = []
        for stage, memory in zip(self.stages, self.per_stage()):
            if memory.peak <= self.hw.memory_gib * GIB:
                continue
            fits = self.what_fits(stage)
            problems.append(
                f"stages.{memory.stage} needs {memory.peak / GIB:.1f} GiB per device ({describe(memory)} GiB; "
                f"{memory.trainable / 1e9:.2f}B trainable parameters, {memory.tokens} tokens per device per "
                f"micro-batch) but runtime.device_memory_gib is {self.hw.memory_gib:g} on {self.hw.devices} "
                f"device(s) ({self.hw.engine}); " + (f"would fit: {'; '.join(fits)}" if fits else
                                 "train fewer groups, use LoRA or a smaller source"))
        return problems

    def notes(self) -> list[str]:
        if self.hw.memory_gib is None:
            return []
        tight = [m for m in self.per_stage() if HEADROOM * self.hw.memory_gib * GIB < m.peak <= self.hw.memory_gib * GIB]
        return [f"stages.{m.stage} plans {m.peak / GIB:.1f} of {self.hw.memory_gib:g} GiB per device: under "
                f"{1 - HEADROOM:.0%} headroom for allocator fragmentation and the CUDA context" for m in tight]

    def table(self):
        from rich.table import Table

        hw = self.hw
        title = (f"memory per device (planned): {hw.devices} × {hw.device} ({hw.engine})"
                 + (f" of {hw.memory_gib:g} GiB" if hw.memory_gib else "") + (", bf16 autocast" if hw.bf16 else ", fp32"))
        table = Table(title=title, caption="live tensors; on CPU glibc's malloc keeps freed memory, so resident "
                      "memory runs higher (~35% measured)" if hw.device == "cpu" else None)
        engine = {"fsdp2": "FSDP2 gathered", "zero3": "ZeRO-3 gathered"}[hw.engine] if hw.sharded else "DDP buckets"
        for col in ("stage", "trainable", "weights", "gradients", "optimizer", "activations", "teacher", engine, "peak"):
            table.add_column(col, justify="left" if col == "stage" else "right")
        for m in self.per_stage():
            over = hw.memory_gib is not None and m.peak > hw.memory_gib * GIB
            cells = [m.weights, m.gradients, m.optimizer, m.activations, m.teacher, m.engine]
            table.add_row(m.stage, f"{m.trainable / 1e6:,.1f}M", *(f"{c / GIB:.2f} GiB" for c in cells),
                          f"[red]{m.peak / GIB:.2f} GiB[/]" if over else f"{m.peak / GIB:.2f} GiB")
        return table


def describe(memory: StageMemory) -> str:
    parts = [("weights", memory.weights), ("gradients", memory.gradients), ("optimizer", memory.optimizer),
             ("activations", memory.activations), ("teacher", memory.teacher), ("engine", memory.engine)]
    return " + ".join(f"{name} {value / GIB:.1f}" for name, value in parts if value)
