"""Stage `kind: sft`: decoupled SFT (Ling 2.0, arXiv 2510.22115 §4.1) through TRL's `SFTTrainer`.

One run teaches both modes: every conversation opens with the system turn that states its mode (`chat_template.py`),
and the loss covers the assistant turns only (`assistant_only_loss`, from the template's generation markers).
Conversations are padded, never packed: packing without `causal-conv1d` cannot keep the KDA conv and state apart
across conversations (research/ecosystem.md §3.2). fp32 on CPU (TRL defaults to bf16, ~4x slower on the torch KDA
fallback), bf16 on CUDA; no gradient checkpointing on CPU (another 1.5x).

`--resume` continues from TRL's own checkpoints: they go to `stages/.N-sft.trainer/`, and after each one is complete
the stage's training state (`checkpoint.TrainingState`) records which, so a kill while TRL writes one resumes from the
one before.
"""

from __future__ import annotations

import copy
import random
import shutil
import time
from pathlib import Path

import torch
from transformers import PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from ling_surgery.surgery.chat_template import add_thinking_modes
from ling_surgery.surgery.context import RunContext
from ling_surgery.surgery.defaults import sft_trainable
from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.parameter_groups import LORA_FULL_MODULES
from ling_surgery.surgery.progress import training_progress
from ling_surgery.surgery.sft_data import conversations

# A LoRA checkpoint of TRL holds the adapters and modules to save only; the bare parameters trained beside them
# (A_log, dt_bias) are written next to it, so --resume restores them too.
BARE_PARAMETERS_FILE = "ling_surgery_bare_parameters.safetensors"


def build_dataset(stage, seed: int, writers: dict | None = None) -> list[dict]:
    """Every source's conversations, in batches of similar length (padding costs compute: a think-mode answer is ~3x
    a fast one), the batches in a seeded random order; the trainer reads them in this order. `writers` maps a source's
    trace_model (None: the run's source) to the `TraceWriter` of its `traces: teacher`."""
    rows = []
    for i, source in enumerate(stage.data):
        rows += conversations(source, seed * 7919 + 31 * i, (writers or {}).get(source.trace_model))
    rng = random.Random(seed)
    rng.shuffle(rows)
    rows.sort(key=lambda row: sum(len(m["content"]) for m in row["messages"]))  # stable: ties keep the shuffle
    batches = [rows[i : i + stage.batch_size] for i in range(0, len(rows), stage.batch_size)]
    rng.shuffle(batches)
    return [row for batch in batches for row in batch]


STEP_BY_STEP = "Solve it step by step, then state the final answer."


class TraceWriter:
    """Solves problems with a chat model for `traces: teacher`: decoded as it ships (greedy for most; an aligned model
    samples, seeded per problem), with the cache, asked to reason step by step
    in its own template (a model with ling-surgery's modes in think mode; the think markers are taken off)."""

    def __init__(self, lm, max_new_tokens: int, console=None):
        self.lm, self.max_new_tokens, self.console = lm, max_new_tokens, console
        self.name = lm.name

    def solve(self, questions: list[str]) -> list[str]:
        from ling_surgery.evals.modes import chat_generate, question_text
        from ling_surgery.surgery.chat_template import assistant_turn, has_thinking_modes, split_thinking

        tok, texts = self.lm.tokenizer, []
        if not tok.chat_template:
            raise SurgeryError(f"traces: teacher — {self.name} has no chat template to be asked in; set trace_model to "
                               "a chat model")
        kwargs = {"enable_thinking": True} if has_thinking_modes(tok) else {}
        with training_progress(f"traces ({self.name})", len(questions), self.console, unit="problems") as bar:
            for index, question in enumerate(questions):
                prompt = tok.apply_chat_template([{"role": "user", "content": f"{question_text(question)} {STEP_BY_STEP}"}],
                                                 tokenize=False, add_generation_prompt=True, **kwargs)
                generated, _ = chat_generate(self.lm, prompt, self.max_new_tokens, seed=index)
                reasoning, answer = split_thinking(assistant_turn(prompt, generated))
                texts.append(f"{reasoning}\n{answer}" if reasoning else answer)
                bar.advance(1)
        return texts


def trace_writers(stage, ctx: RunContext) -> dict:
    """A `TraceWriter` per trace model the stage's `traces: teacher` sources name (None: the run's source model)."""
    from ling_surgery.evals.scoring import LoadedModel

    writers = {}
    for source in stage.data:
        if source.traces != "teacher" or source.trace_model in writers:
            continue
        max_tokens = max(s.trace_max_tokens for s in stage.data if s.traces == "teacher" and s.trace_model == source.trace_model)
        if source.trace_model is None:
            model, tokenizer, name = ctx.teacher, copy.deepcopy(ctx.tokenizer), "the source model"
        else:
            from ling_surgery.surgery.sources import load_model, resolve_source

            model, tokenizer = load_model(resolve_source(source.trace_model), torch.float32, str(ctx.device))
            name = source.trace_model
        writers[source.trace_model] = TraceWriter(LoadedModel(name, model, tokenizer, ctx.device), max_tokens, ctx.console)
    return writers


class KDASFTTrainer(SFTTrainer):
    """TRL's SFTTrainer whose loss runs an upgraded model through ling-surgery's exact chunked KDA (`surgery/kda.py`,
    the path the distillation stages train on) when flash-linear-attention is missing: transformers' reference
    fallback builds a (chunk × chunk × head-dim) decay tensor per head and trained the CPU demo's model at under
    20 tokens/s. Right-padded batches are exact there (every mixer is causal); anything else takes TRL's own loss, and
    so does a run over several processes: DDP averages the gradients only of a forward through its own wrapper (with
    flash-linear-attention, what GPUs run, the stock forward is the fast one anyway)."""

    kda_chunk_size = 32

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from ling_surgery.surgery.kda import student_hidden

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        mask = inputs.get("attention_mask")
        right_padded = mask is None or bool((mask[:, 1:] <= mask[:, :-1]).all())
        if (self.accelerator.num_processes > 1 or base.config.model_type != "bailing_hybrid" or _has_fla()
                or return_outputs or not right_padded
                or "labels" not in inputs or inputs.get("position_ids") is not None and mask is None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        logits = base.lm_head(student_hidden(base, inputs["input_ids"], self.kda_chunk_size))
        labels = inputs["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                 ignore_index=-100, reduction="sum")
        # As transformers' causal-LM loss: summed over the label tokens, divided by their count in the whole step.
        count = num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum()
        return loss / count


def _has_fla() -> bool:
    import importlib.util

    return importlib.util.find_spec("fla") is not None


def rows_per_process(rows: int, what: str) -> int:
    """A TRL stage's global batch of `rows` split over the launched processes (`accelerate launch`, which the
    trainers read themselves): each trains rows / processes of it, so N processes take the optimizer steps one does."""
    from accelerate import PartialState

    processes = PartialState().num_processes
    if rows % processes:
        raise SurgeryError(f"{what} {rows} does not split over {processes} processes: use a multiple of {processes} "
                           f"(it is the global batch; each process trains {what.split('.')[-1]} / processes of it)")
    return rows // processes


def make_trainer(model, tokenizer, stage, ctx: RunContext, rows: list[dict], out_dir: Path | None, callbacks=()):
    """TRL's SFTTrainer for the stage: assistant-only loss, padded batches, fp32 on CPU and bf16 on CUDA."""
    import tempfile

    from datasets import Dataset

    cuda = ctx.device.type == "cuda"
    args = SFTConfig(
        output_dir=str(out_dir or tempfile.mkdtemp(prefix="ling-surgery-sft-")),
        per_device_train_batch_size=rows_per_process(stage.batch_size, f"stages.{stage.name}.batch_size"),
        num_train_epochs=stage.epochs, learning_rate=stage.lr,
        warmup_steps=stage.warmup_steps, lr_scheduler_type="cosine", max_length=stage.max_length,
        assistant_only_loss=True, packing=False, bf16=cuda, gradient_checkpointing=False, use_cpu=not cuda,
        report_to="none", logging_steps=1, save_strategy="steps" if (ctx.save_every and out_dir) else "no",
        save_steps=max(1, ctx.save_every), save_total_limit=2, seed=ctx.seed, data_seed=ctx.seed, disable_tqdm=True,
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
        # The conversations are shuffled once with the recipe's seed (build_dataset); reading them in that order
        # makes a resumed run see exactly the batches an unbroken one would (a sampler drawn from the global RNG
        # after a restart does not).
        train_sampling_strategy="sequential",
    )
    trainer = KDASFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                            callbacks=list(callbacks))
    trainer.kda_chunk_size = ctx.chunk_size
    trainer.remove_callback(PrinterCallback)  # the rich bar shows the loss; no raw dicts in the log
    return trainer


def sft(model, stage, ctx: RunContext):
    """Fine-tune `model` on both modes; returns it (LoRA merged) with the loss curve and token counts."""
    tokenizer = ctx.tokenizer
    template = None
    if stage.chat_template:
        path = Path(stage.chat_template).expanduser()
        if not path.is_file():
            raise SurgeryError(f"stages.{stage.name}.chat_template {stage.chat_template!r} not found; pass a .jinja file")
        template = path.read_text(encoding="utf-8")
    # Traces are written before the modes are added: a trace model sharing the tokenizer is asked in its own template.
    rows = build_dataset(stage, ctx.seed, trace_writers(stage, ctx))
    add_thinking_modes(tokenizer, template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model, groups, trainable_params = prepare_policy(model, stage, ctx)
    out_dir, resume_from = resume_point(ctx)
    progress = RichProgress(ctx, stage)
    callbacks = [progress] + ([StateMarker(ctx)] if out_dir is not None else [])
    trainer = make_trainer(model, tokenizer, stage, ctx, rows, out_dir, callbacks)
    progress.total = int(sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * stage.epochs)
    kept = len(trainer.train_dataset)
    if kept < len(rows) and ctx.console is not None:
        ctx.console.print(f"[yellow]note:[/] {len(rows) - kept} of {len(rows)} conversations had no answer token within "
                          f"max_length {stage.max_length} and are not trained on; raise stages.{stage.name}.max_length")
    if kept == 0:
        raise SurgeryError(f"stages.{stage.name}: no conversation has an answer token within max_length "
                           f"{stage.max_length}; raise it")
    model, seconds = train_to_end(trainer, model, stage, resume_from, progress)
    tokens = int(trainer.state.num_input_tokens_seen)
    metrics = {
        "conversations": kept,
        "steps": int(trainer.state.global_step),
        "tokens": tokens,
        "seconds": round(seconds, 1),
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
        "losses": [round(float(entry["loss"]), 4) for entry in trainer.state.log_history if "loss" in entry],
        "lora": stage.lora is not None,
        "trainable": groups,
        "trainable_params": trainable_params,
        "resumed_from": resume_from,
    }
    if metrics["losses"]:
        # Means over the first and last tenth of the steps: one batch's loss swings with its mix (a chat batch scores
        # ~2× a worked-solution batch), so single steps say little about the trend.
        losses, tenth = metrics["losses"], max(1, len(metrics["losses"]) // 10)
        metrics["loss_first"] = round(sum(losses[:tenth]) / tenth, 4)
        metrics["loss_last"] = round(sum(losses[-tenth:]) / tenth, 4)
    if stage.sampling is not None:
        ship_sampling(model.generation_config, stage.sampling)
        metrics["sampling"] = stage.sampling.model_dump()
    return model.eval().requires_grad_(False), metrics


def prepare_policy(model, stage, ctx: RunContext):
    """(the model a TRL stage trains, its trainable groups, its trainable parameter count): a copy when it is the run's
    source (an align-only recipe keeps the source as the reference the evaluations compare with), in train mode, with
    LoRA adapters or the stage's groups unfrozen."""
    if model is ctx.teacher:
        model = copy.deepcopy(model)
    groups = stage.trainable or sft_trainable(model.config.model_type)[0]
    model.train()
    if stage.lora is not None:
        model = with_lora(model, stage.lora, groups)
    else:
        trainable_groups(model, groups)
    return model, groups, sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_to_end(trainer, model, stage, resume_from: str | None, progress) -> tuple[torch.nn.Module, float]:
    """Train from the start or from `resume_from`; (the trained model with LoRA merged, seconds)."""
    if resume_from is not None:
        restore_weights(model, resume_from, stage.lora is not None)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    progress.close()
    model = trainer.model
    if stage.lora is not None:
        model = model.merge_and_unload()
    return model, time.perf_counter() - start


def resume_point(ctx: RunContext) -> tuple[Path | None, str | None]:
    """(the folder TRL checkpoints into, the checkpoint to resume from or None) of a stage trained by TRL."""
    out_dir = ctx.state.trainer_dir if ctx.state is not None else None
    saved = ctx.state.load() if ctx.state is not None else None
    if saved and (out_dir / saved["checkpoint"]).is_dir():
        return out_dir, str(out_dir / saved["checkpoint"])
    if out_dir is not None:
        shutil.rmtree(out_dir, ignore_errors=True)  # a trainer folder no state points to is from another run
    return out_dir, None


def restore_weights(model, checkpoint: str, lora: bool) -> None:
    """The weights of a TRL checkpoint, before the Trainer restores optimizer, schedule, RNG and data position."""
    if lora:
        load_bare_parameters(model, Path(checkpoint))
        return
    # The Trainer reloads a checkpoint's weights by their names on disk, which transformers' weight conversion
    # renames for bailing_hybrid (self_attn.o_proj → attention.dense, …): most would be skipped silently. Load
    # them the way from_pretrained does.
    from transformers import AutoModelForCausalLM

    saved_model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.load_state_dict(saved_model.state_dict())
    del saved_model


def ship_sampling(generation_config, sampling) -> None:
    """The model samples by default, as `sampling` says (config.SamplingSettings: why)."""
    generation_config.do_sample = True
    generation_config.temperature = sampling.temperature
    generation_config.top_p = sampling.top_p
    generation_config.top_k = sampling.top_k


def trainable_groups(model, groups: list[str]) -> list[str]:
    """Freeze all but the named parameter groups (`training.TRAINABLE_GROUPS`); returns the trainable names."""
    if groups == ["all"]:
        model.requires_grad_(True)
    else:
        from ling_surgery.surgery.training import select_trainable

        select_trainable(model, groups)
    return [name for name, param in model.named_parameters() if param.requires_grad]


def with_lora(model, settings, groups: list[str]):
    """LoRA adapters on the linear layers of the trainable groups (never the LM head); those groups' convs, norms
    and forget-gate parameters, which LoRA cannot wrap, train fully."""
    from peft import LoraConfig, get_peft_model

    trainable = set(trainable_groups(model, groups))
    linear = sorted(name for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear) and f"{name}.weight" in trainable and name != "lm_head")
    full = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules()
                   if name.rsplit(".", 1)[-1] in LORA_FULL_MODULES and any(p.startswith(name + ".") for p in trainable)})
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=linear, modules_to_save=full or None, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():  # bare parameters (A_log, dt_bias) are not modules to save
        if name.rsplit(".", 1)[-1] in LORA_FULL_MODULES and any(name.endswith(t) for t in trainable):
            param.requires_grad_(True)
    return peft_model


class RichProgress(TrainerCallback):
    """A rich bar over the stage's tokens with the loss (TRL's own tqdm is off); `total` is set once TRL has
    tokenised the data."""

    def __init__(self, ctx: RunContext, stage):
        self.ctx, self.stage = ctx, stage
        self.total, self._bar, self._cm, self._seen = 0, None, None, 0

    def on_train_begin(self, args, state, control, **kwargs):
        from ling_surgery.surgery.progress import training_progress

        self._seen = int(state.num_input_tokens_seen)
        self._cm = training_progress(self.stage.name, max(self.total, 1), self.ctx.console, completed=self._seen)
        self._bar = self._cm.__enter__()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._bar is None or not logs or "loss" not in logs:
            return
        seen = int(state.num_input_tokens_seen)
        self._bar.advance(seen - self._seen, loss=float(logs["loss"]), step=int(state.global_step))
        self._seen = seen

    def close(self):
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = self._bar = None


class StateMarker(TrainerCallback):
    """After TRL has written a checkpoint in full — every process its part (its RNG state) — the main process makes
    the stage's training state name it (what --resume reads)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    def on_save(self, args, state, control, model=None, **kwargs):
        from accelerate import PartialState

        PartialState().wait_for_everyone()
        if not state.is_world_process_zero:
            return
        name = f"checkpoint-{state.global_step}"
        if (Path(args.output_dir) / name).is_dir():
            if model is not None and hasattr(model, "peft_config"):
                save_bare_parameters(model, Path(args.output_dir) / name)
            self.ctx.state.save({"checkpoint": name}, int(state.global_step), int(state.max_steps))


def bare_trained_parameters(model) -> dict[str, torch.Tensor]:
    """The trained parameters of a PEFT model that its adapter checkpoint leaves out (no module of their own)."""
    return {name: param for name, param in model.named_parameters()
            if param.requires_grad and "lora_" not in name and "modules_to_save" not in name}


def save_bare_parameters(model, checkpoint: Path) -> None:
    import os

    from safetensors.torch import save_file

    tensors = {name: param.detach().contiguous().clone() for name, param in bare_trained_parameters(model).items()}
    partial = checkpoint / f".{BARE_PARAMETERS_FILE}.partial"
    save_file(tensors, str(partial))
    os.replace(partial, checkpoint / BARE_PARAMETERS_FILE)


def load_bare_parameters(model, checkpoint: Path) -> None:
    from safetensors.torch import load_file

    path = checkpoint / BARE_PARAMETERS_FILE
    expected = bare_trained_parameters(model)
    if not expected:
        return
    if not path.is_file():
        raise SurgeryError(f"{checkpoint} has no {BARE_PARAMETERS_FILE} (written by an older ling-surgery?); rerun the "
                           "stage without --resume")
    saved = load_file(str(path))
    if set(saved) != set(expected):
        raise SurgeryError(f"{path}: its parameters differ from this stage's trainable ones; rerun without --resume")
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(saved[name])
