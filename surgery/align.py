"""`align`: SFT (and later RL) of any causal LM — an upgraded model, a stock one, or a run folder — under `run`.

`ling-surgery align MODEL --output DIR` is `ling-surgery run` of a recipe whose stages are `[sft]` (or `--config FILE`)
with `source.model` and `export.output` set from the flags: one code path, the same manifests, fingerprints, atomic
folders and `--resume` as `convert`. A recipe that starts with `kind: init` converts first and aligns after.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.markup import escape
from rich.table import Table

from ling_surgery.surgery import sources
from ling_surgery.surgery.config import CONVERT_KINDS, Recipe
from ling_surgery.surgery.defaults import logit_distill_trainable, sft_trainable
from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.targets import TARGETS


def converts(recipe: Recipe) -> bool:
    """Whether the recipe builds an upgraded model (an `init` stage) before anything else it does."""
    return any(stage.kind in CONVERT_KINDS for stage in recipe.stages)


@dataclass
class AlignmentPlan:
    """What `run` needs to know about a recipe that only aligns: its source model, as is (no layer plan, no target)."""

    source: sources.Source
    source_config: object
    recipe: Recipe
    arch: object = None
    plan: object = None
    target: object = None
    target_config: object = None
    derived: list = field(default_factory=list)
    samplers: dict = field(default_factory=dict)  # rl stage name → which rollout sampler runs it, and why
    teacher: sources.Source | None = None  # what pretrain stages distill from (None: no stage needs one)
    teacher_config: object = None

    def table(self, memory=None) -> Table:
        """The stages, and the memory plan of those that train against a teacher (`memory`: the run's)."""
        from ling_surgery.surgery.memory_plan import MemoryPlan

        model_type = getattr(self.source_config, "model_type", "?")
        title = f"{escape(self.source.name)} ({model_type})"
        if self.teacher is not None:
            title += f", teacher {escape(self.teacher.name)} ({getattr(self.teacher_config, 'model_type', '?')})"
        table = Table(title=title)
        for col in ("stage", "kind", "data", "training"):
            table.add_column(col)
        for stage in self.recipe.stages:
            table.add_row(stage.name, stage.kind, *alignment_row(stage, model_type, self.samplers.get(stage.name, ""),
                                                                 self.recipe.data.describe()))
        memory = memory or MemoryPlan.of_run(self)
        if memory is None or not memory.stages:
            return table
        grid = Table.grid(padding=1)
        grid.add_row(table)
        grid.add_row(memory.table())
        return grid


def alignment_row(stage, model_type: str, sampler: str, data_source: str = "") -> tuple[str, str]:
    """(data, training) of a pretrain, sft or rl stage, as the plan shows them (`sampler`: an rl stage's rollout
    sampler; `data_source`: the recipe's training text, which pretrain reads)."""
    if stage.kind == "pretrain":
        loss = " + ".join(f"{w:g}·{term}" for w, term in ((stage.kl_weight, "KL"), (stage.ce_weight, "CE")) if w)
        groups = stage.trainable or logit_distill_trainable(model_type == "bailing_hybrid")[0]
        how = f"LoRA r={stage.lora.r} on [{', '.join(groups)}]" if stage.lora else f"[{', '.join(groups)}]"
        training = (f"{stage.tokens:,} tokens, {loss}, batch {stage.batch_size}×{stage.grad_accumulation}, "
                    f"{stage.schedule} lr {stage.lr:g}, recall_mix {stage.recall_mix:g}")
        return escape(data_source), escape(f"{how}, {training}")
    if stage.kind == "rl":
        data = ", ".join(f"{d.source} {'/'.join(d.tasks or ['gsm_symbolic'])} ×{d.problems} problems "
                         f"[{'+'.join(d.modes)}]" for d in stage.data)
        low, high = stage.clip_range()
        rewards = ", ".join(f"{r.name} {r.weight:g}" for r in stage.rewards)
        training = (f"{stage.importance_sampling_level}-level ratio (ε {low:g}/{high:g}), {stage.loss_type}, "
                    f"{stage.num_generations} samples × {stage.prompts_per_rollout} prompts per rollout in "
                    f"{stage.updates_per_rollout} update(s), ≤{stage.max_completion_length} tokens; "
                    f"rewards: {rewards}; "
                    f"generation: {sampler}")
    else:
        data = ", ".join(f"{d.source}{' ' + '/'.join(d.tasks) if d.tasks else ''} ×{d.examples} [{'+'.join(d.modes)}]"
                         for d in stage.data)
        training = f"{stage.epochs:g} epoch(s), batch {stage.batch_size}, ≤{stage.max_length} tokens"
    groups = stage.trainable or sft_trainable(model_type)[0]
    how = f"LoRA r={stage.lora.r} on [{', '.join(groups)}]" if stage.lora else f"[{', '.join(groups)}]"
    return escape(data), escape(f"{how}, lr {stage.lr:g}, {training}")


def plan_alignment(recipe: Recipe) -> AlignmentPlan:
    """The source and its config; its chat template must be able to carry the modes (checked before any weights
    load, so a model without one costs a line, not a run)."""
    source = sources.resolve_source(recipe.source.model, recipe.source.revision)
    plan = AlignmentPlan(source, sources.load_config(source), recipe)
    if any(stage.kind == "pretrain" for stage in recipe.stages):
        plan.teacher, plan.teacher_config = pretrain_teacher(recipe, source, plan.source_config)
    from ling_surgery.surgery.run import resolve_device

    cuda = resolve_device(recipe.runtime.device).type == "cuda"
    for stage in recipe.stages:
        if stage.kind == "rl":  # a sampler that cannot run here costs a line, not a run
            from ling_surgery.surgery.rl import rollout_sampler, vllm_installed

            _, plan.samplers[stage.name] = rollout_sampler(stage.generation, plan.source_config.model_type, cuda,
                                                           vllm_installed())
    sft_stages = [stage for stage in recipe.stages if stage.kind == "sft"]
    if sft_stages and not sft_stages[0].chat_template:
        from transformers import AutoTokenizer

        from ling_surgery.surgery.chat_template import has_thinking_modes, read_format

        tokenizer = AutoTokenizer.from_pretrained(source.location, **source.load_kwargs())
        if not has_thinking_modes(tokenizer):
            read_format(tokenizer)
    return plan


UPGRADED_TYPES = tuple(target.model_type for target in TARGETS.values())  # what `convert` builds


def pretrain_teacher(recipe: Recipe, source: sources.Source, source_config) -> tuple[sources.Source, object]:
    """The teacher of a recipe that pretrains an upgraded model without converting it: source.teacher, else the
    model it was converted from. Checked before any weights load: an upgraded student, a teacher that exists, and
    one tokenizer for both (the KL compares their distributions token by token)."""
    if source_config.model_type not in UPGRADED_TYPES:
        raise SurgeryError(f"pretrain trains an upgraded model ({' or '.join(UPGRADED_TYPES)}); {source.name!r} is "
                           f"{source_config.model_type}: convert it first (ling-surgery convert), then pretrain the "
                           "result")
    if recipe.source.teacher is not None:
        teacher = sources.resolve_source(recipe.source.teacher)
    else:
        teacher = sources.recorded_teacher(source)
        if teacher is None:
            raise SurgeryError(f"pretrain needs a teacher and {source.name!r} records none (no ling_surgery_manifest"
                               ".json naming its source); pass --teacher SRC (source.teacher)")
    teacher_config = sources.load_config(teacher)
    student_vocab = sources.load_tokenizer(source).get_vocab()
    if sources.load_tokenizer(teacher).get_vocab() != student_vocab:
        raise SurgeryError(f"teacher {teacher.name!r} and {source.name!r} tokenize differently; pass the teacher the "
                           "model was converted from (--teacher)")
    return teacher, teacher_config


def plan_recipe(recipe: Recipe):
    """The conversion plan of a recipe that converts, else the alignment plan (what `run` and `plan` print)."""
    from ling_surgery.surgery.convert import plan_conversion

    return plan_conversion(recipe) if converts(recipe) else plan_alignment(recipe)


def align(recipe: Recipe, console=None, resume: bool = False) -> dict:
    """Run an alignment recipe into a new output folder (or continue one with `resume`); returns the report."""
    from ling_surgery.surgery.run import run

    return run(recipe, console, resume=resume, fresh=not resume)
