"""Stage `kind: rl`: fine-grained RL (Ling 2.0 §4.2, arXiv 2510.22115) through TRL's `GRPOTrainer`.

Verifiable problems are asked in every mode the model has (its chat template's fast and think modes, or its default);
each prompt gets `num_generations` sampled completions, scored by the stage's rewards (`surgery/rewards.py`: the
task's scorer, Evo-CoT's length reward, a mode-format penalty, user functions), and the policy moves on the group-
normalised advantages with the importance ratio per token, per sequence (GSPO) or per sentence (LPO, `lpo.py`).

`LPOTrainer` is GRPOTrainer with three small overrides, none a copy of its loss:
- the sentence-level ratio: `segment_ids` are added to each rollout, and inside `_compute_loss` the log-probabilities
  (current and old) are replaced by their sentence means, so TRL's own token-level loss computes LPO's (`lpo.py`);
- on CPU without flash-linear-attention, an upgraded model samples and scores through the exact fast KDA path
  (`rollout.py`): transformers' reference KDA kernels made a rollout's prefill alone take longer than its decode;
- per-mode reward, correctness and completion length are logged with TRL's metrics (the PNG and the report).

Generation: on CPU (or with no vLLM installed) the model's own sampler — transformers' `generate`, or `rollout.py` for
upgraded hybrids; TRL's continuous batching rejects linear-attention layers. vLLM is not used: its BailingMoeV3
loader needs the HF module names mapped to Ling's (research/ecosystem.md §3.4), untested here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import time
from pathlib import Path

from transformers import PrinterCallback, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from ling_surgery.surgery.context import RunContext
from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.lpo import segment_mean, sentence_ids

RL_SEED_OFFSET = 500_009  # RL problems are drawn from other seeds than SFT's (sft_data: seed·7919 + 31·i)


def rollout_sampler(choice: str, model_type: str, cuda: bool, vllm_installed: bool) -> tuple[bool, str]:
    """(use vLLM, which sampler and why) for `stages.rl.generation`; a choice that cannot run is a one-line error."""
    from ling_surgery.surgery.sft import _has_fla

    if model_type == "bailing_hybrid":
        if choice == "vllm":
            raise SurgeryError("stages.rl.generation vllm: vLLM cannot sample an upgraded bailing_hybrid model (its "
                               "BailingMoeV3 loader needs Ling's weight names, continuous batching rejects KDA); "
                               "use generation: generate")
        if not _has_fla():
            return False, ("ling-surgery's cached sampler on the fast KDA path (transformers' reference KDA kernels "
                           "are slow; vLLM cannot load bailing_hybrid as exported)")
        return False, "transformers generate on fla's kernels (vLLM cannot load bailing_hybrid as exported)"
    if choice == "vllm" and not (cuda and vllm_installed):
        raise SurgeryError("stages.rl.generation vllm needs " + ("a CUDA device" if not cuda else "the vllm package")
                           + "; pip install vllm (TRL takes 0.10.2 to 0.17.1) on a GPU machine, or use generation: "
                           "generate")
    if choice != "generate" and cuda and vllm_installed:
        return True, "vLLM colocated in the trainer process (TRL's vllm_mode colocate)"
    why = ("as asked" if choice == "generate" else
           "vLLM needs CUDA" if not cuda else "vllm is not installed; pip install vllm for faster rollouts")
    return False, f"transformers generate ({why})"


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def prompt_rows(stage, tokenizer, seed: int) -> list[dict]:
    """Each problem once per mode: the prompt rendered by the model's chat template in that mode (a model without
    ling-surgery's modes: its default), with what the rewards read (mode, task, answer, reasoning-gym entry)."""
    from ling_surgery.evals.modes import question_text
    from ling_surgery.surgery.chat_template import has_thinking_modes
    from ling_surgery.surgery.sft_data import MAX_PROBLEMS, EVAL_SEED, training_problems

    with_modes = has_thinking_modes(tokenizer)
    rows = []
    for i, data in enumerate(stage.data):
        tasks = data.tasks or ["gsm_symbolic"]
        for j, task in enumerate(tasks):
            share = data.problems // len(tasks) + (j < data.problems % len(tasks))
            base = (seed * 7919 + RL_SEED_OFFSET + 100_003 * (31 * i + j)) % (EVAL_SEED - MAX_PROBLEMS)
            pool = training_problems(task, share, base, data.config)
            if len(pool) < share:
                raise SurgeryError(f"stages.{stage.name}: reasoning-gym {task!r} has too few problems outside the "
                                   f"evaluation's for {share}; lower problems or widen its config")
            for problem in pool:
                for mode in (data.modes if with_modes else ["default"]):
                    rows.append({"prompt": render_prompt(tokenizer, question_text(problem["question"]), mode),
                                 "mode": mode, "task": task, "answer": problem["answer"],
                                 "entry": json.dumps(problem["entry"], default=str)})
    random.Random(seed).shuffle(rows)
    return rows


def render_prompt(tokenizer, question: str, mode: str) -> str:
    """The chat prompt as text (TRL tokenises text prompts with the tokenizer, which may add its BOS again)."""
    kwargs = {} if mode == "default" else {"enable_thinking": mode == "think"}
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True, **kwargs)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text


class LPOTrainer(GRPOTrainer):
    """GRPOTrainer with the sentence-level ratio, the fast KDA path for upgraded hybrids on CPU and per-mode metrics."""

    sentence_level = False
    fast_path = False
    rollout_sampler = ""  # which sampler the rollouts use, and why (the manifest says it)
    kda_chunk_size = 32

    def _base(self, model):
        model = self.accelerator.unwrap_model(model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if not self.fast_path or self.use_vllm or images is not None:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        from ling_surgery.surgery.rewards import groups
        from ling_surgery.surgery.rollout import sample_group

        model = self._base(self.model)
        was_training = model.training
        model.eval()  # LoRA dropout off while sampling, as `generate` would run
        completions = []
        for start, end in groups(prompt_ids):
            completions += sample_group(model, prompt_ids[start], end - start, self.max_completion_length,
                                        self.eos_token_ids, True, self.temperature, self.top_p or 1.0,
                                        self.top_k or 0, self.kda_chunk_size)
        model.train(was_training)
        return completions, None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **kwargs):
        # Over several processes the log-probabilities that train go through the engine's wrapper (DDP averages the
        # gradients only of its own forward); the rollouts still sample on the fast path.
        if (self.fast_path and not compute_aux_loss and all(v is None for v in kwargs.values())
                and self.accelerator.num_processes == 1):
            from ling_surgery.surgery.rollout import completion_logps

            logps, entropies = completion_logps(self._base(model), input_ids, attention_mask, logits_to_keep,
                                                self.temperature, compute_entropy, self.kda_chunk_size)
            aux = None
        else:
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss, **kwargs)
        loss_inputs = getattr(self, "_loss_inputs", None)
        if loss_inputs is not None:
            self._log_drift(logps, loss_inputs)
            if self.sentence_level:
                logps = segment_mean(logps, loss_inputs["segment_ids"], loss_inputs["completion_mask"])
        return logps, entropies, aux

    def _log_drift(self, logps, inputs) -> None:
        """KL(π_old ‖ π_θ) on the rollout's tokens (k3 estimator): how far this update has moved from the policy that
        sampled the rollout (0 on its first update)."""
        old = inputs.get("old_per_token_logps")
        if old is None:
            drift = 0.0
        else:
            mask = inputs["completion_mask"].float()
            delta = (old - logps.detach()).clamp(-20, 20)
            drift = float(((delta.exp() - delta - 1) * mask).sum() / mask.sum().clamp(min=1))
        self._metrics["train" if self.model.training else "eval"]["drift"].append(drift)

    def _compute_loss(self, model, inputs):
        self._loss_inputs = inputs
        try:
            if self.sentence_level and inputs.get("old_per_token_logps") is not None:
                inputs = {**inputs, "old_per_token_logps": segment_mean(
                    inputs["old_per_token_logps"], inputs["segment_ids"], inputs["completion_mask"])}
            return super()._compute_loss(model, inputs)
        finally:
            self._loss_inputs = None

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.sentence_level:
            cache = self.__dict__.setdefault("_token_texts", {})
            out["segment_ids"] = sentence_ids(self.processing_class, out["completion_ids"], out["completion_mask"],
                                              cache).to(out["completion_ids"].device)
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        modes, lengths = [row["mode"] for row in inputs], [len(ids) for ids in completion_ids_list]
        if rewards.shape[0] != len(inputs):  # several processes: the rewards are all of theirs, in process order
            from accelerate.utils import gather_object

            modes, lengths = gather_object(modes), gather_object(lengths)
        split = "train" if self.model.training else "eval"
        total = (rewards * self.reward_weights.to(rewards.device).unsqueeze(0)).nansum(dim=1)
        names = list(self.reward_func_names)
        for name in sorted(set(modes)):
            rows = [i for i, mode in enumerate(modes) if mode == name]
            self._metrics[split][f"{name}/reward"].append(float(total[rows].mean()))
            self._metrics[split][f"{name}/completion_length"].append(sum(lengths[i] for i in rows) / len(rows))
            if "correctness" in names:
                scores = rewards[rows, names.index("correctness")]
                self._metrics[split][f"{name}/correct"].append(float((scores >= 1.0).float().mean()))
        return rewards


def sampling_settings(stage, model) -> tuple[float, float, int]:
    """(temperature, top_p, top_k) for rollouts: the stage's, else the model's shipped sampling, else plain T=1."""
    if stage.sampling is not None:
        return stage.sampling.temperature, stage.sampling.top_p, stage.sampling.top_k
    config = model.generation_config
    if getattr(config, "do_sample", False):
        return float(config.temperature or 1.0), float(config.top_p or 1.0), int(config.top_k or 0)
    return 1.0, 1.0, 0


def make_trainer(model, tokenizer, stage, ctx: RunContext, rows: list[dict], out_dir: Path | None, callbacks=()):
    """LPOTrainer for the stage: one rollout of prompts_per_rollout × num_generations completions per
    updates_per_rollout optimizer steps; fp32 on CPU, bf16 on CUDA."""
    import tempfile

    from datasets import Dataset

    from ling_surgery.surgery.rewards import reward_functions
    from ling_surgery.surgery.sft import _has_fla, rows_per_process

    cuda = ctx.device.type == "cuda"
    temperature, top_p, top_k = sampling_settings(stage, model)
    low, high = stage.clip_range()
    funcs, weights = reward_functions(stage.rewards)
    use_vllm, sampler = rollout_sampler(stage.generation, model.config.model_type, cuda, vllm_installed())
    rows_per_update = stage.prompts_per_rollout * stage.num_generations // stage.updates_per_rollout
    save_every = stage.updates_per_rollout * max(1, math.ceil(ctx.save_every / stage.updates_per_rollout))
    args = GRPOConfig(
        output_dir=str(out_dir or tempfile.mkdtemp(prefix="ling-surgery-rl-")),
        per_device_train_batch_size=rows_per_process(rows_per_update, f"stages.{stage.name} completions per update"),
        gradient_accumulation_steps=1,
        steps_per_generation=stage.updates_per_rollout, num_generations=stage.num_generations,
        num_train_epochs=stage.epochs, learning_rate=stage.lr, warmup_steps=stage.warmup_steps,
        lr_scheduler_type="constant_with_warmup", max_completion_length=stage.max_completion_length,
        temperature=temperature, top_p=top_p, top_k=top_k,
        loss_type=stage.loss_type, beta=stage.beta, epsilon=low, epsilon_high=high,
        # sentence: TRL's token-level loss over sentence-mean log-probabilities (LPOTrainer)
        importance_sampling_level="token" if stage.importance_sampling_level == "sentence" else stage.importance_sampling_level,
        bf16=cuda, gradient_checkpointing=False, use_cpu=not cuda, report_to="none", logging_steps=1,
        save_strategy="steps" if (ctx.save_every and out_dir) else "no", save_steps=save_every, save_total_limit=2,
        seed=ctx.seed, data_seed=ctx.seed, disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
        reward_weights=weights, use_vllm=use_vllm, vllm_mode="colocate",
    )
    trainer = LPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=list(callbacks))
    trainer.rollout_sampler = sampler
    trainer.sentence_level = stage.importance_sampling_level == "sentence"
    trainer.fast_path = model.config.model_type == "bailing_hybrid" and not _has_fla()
    trainer.kda_chunk_size = ctx.chunk_size
    trainer.remove_callback(PrinterCallback)
    return trainer


def rl(model, stage, ctx: RunContext):
    """RL on verifiable problems in every mode; returns the model (LoRA merged) with per-mode curves."""
    from ling_surgery.surgery.sft import StateMarker, prepare_policy, resume_point, train_to_end

    tokenizer = ctx.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise SurgeryError(f"stages.{stage.name}: the model has no chat template to ask its problems in; run an sft "
                           "stage first or pass a chat model")
    rows = prompt_rows(stage, tokenizer, ctx.seed)
    model, groups, trainable_params = prepare_policy(model, stage, ctx)
    out_dir, resume_from = resume_point(ctx)
    progress = RLProgress(ctx, stage)
    callbacks = [progress] + ([StateMarker(ctx)] if out_dir is not None else [])
    trainer = make_trainer(model, tokenizer, stage, ctx, rows, out_dir, callbacks)
    model, seconds = train_to_end(trainer, model, stage, resume_from, progress)
    history = rl_history(trainer.state.log_history)
    metrics = {
        "prompts": len(rows),
        "steps": int(trainer.state.global_step),
        "rollouts": -(-int(trainer.state.global_step) // stage.updates_per_rollout),
        "seconds": round(seconds, 1),
        "generation": trainer.rollout_sampler,
        "importance_sampling_level": stage.importance_sampling_level,
        "clip_range": list(stage.clip_range()),
        "rewards": {spec.name: spec.weight for spec in stage.rewards},
        "lora": stage.lora is not None,
        "trainable": groups,
        "trainable_params": trainable_params,
        "resumed_from": resume_from,
        "history": history,
    }
    metrics.update(curve_summary(history))
    return model.eval().requires_grad_(False), metrics


HISTORY_KEYS = ("reward", "drift", "kl", "completions/mean_length", "clip_ratio/region_mean", "num_tokens")


def rl_history(log_history: list[dict]) -> list[dict]:
    """Per logged step: the overall and per-mode reward, completion length and correctness, KL/drift and clipping."""
    out = []
    for entry in log_history:
        if "step" not in entry or not any(k in entry for k in ("reward", "drift", "loss")):
            continue
        row = {"step": int(entry["step"])}
        for key, value in entry.items():
            if key in HISTORY_KEYS or key.split("/")[0] in ("fast", "think", "default"):
                row[key] = round(float(value), 5)
        out.append(row)
    return out


def curve_summary(history: list[dict]) -> dict:
    """First and last rollouts' reward and completion length per mode (means over a quarter of the rollouts)."""
    out = {}
    for mode in ("fast", "think", "default"):
        for metric in ("reward", "completion_length", "correct"):
            points = [row[f"{mode}/{metric}"] for row in history if f"{mode}/{metric}" in row]
            if not points:
                continue
            quarter = max(1, len(points) // 4)
            out[f"{mode}_{metric}_first"] = round(sum(points[:quarter]) / quarter, 4)
            out[f"{mode}_{metric}_last"] = round(sum(points[-quarter:]) / quarter, 4)
    return out


class RLProgress(TrainerCallback):
    """A rich bar over the optimizer steps with reward, KL (or drift from the rollout policy), completion length and
    tokens/s (sampled and scored tokens: TRL's num_tokens)."""

    def __init__(self, ctx: RunContext, stage):
        self.ctx, self.stage = ctx, stage
        self._bar, self._cm, self._step, self._tokens, self._time, self._last = None, None, 0, 0.0, None, {}
        self._rate = float("nan")

    def on_train_begin(self, args, state, control, **kwargs):
        from ling_surgery.surgery.progress import training_progress

        self._step = int(state.global_step)
        self._cm = training_progress(self.stage.name, max(int(state.max_steps), 1), self.ctx.console,
                                     completed=self._step, unit="steps")
        self._bar = self._cm.__enter__()
        self._time = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._bar is None or not logs or "loss" not in logs:
            return
        now, tokens = time.perf_counter(), float(logs.get("num_tokens", self._tokens))
        if tokens != self._tokens:  # a new rollout: its tokens over the time since the last one
            self._rate = (tokens - self._tokens) / max(now - self._time, 1e-9) if self._tokens else float("nan")
            self._tokens, self._time = tokens, now
        # The rollout's metrics come with the first update after it; later updates carry only the loss and drift.
        self._last.update({key: float(logs[key]) for key in ("reward", "completions/mean_length") if key in logs})
        fields = {"reward": self._last.get("reward", float("nan"))}
        fields["kl" if "kl" in logs else "drift"] = float(logs.get("kl", logs.get("drift", 0.0)))
        fields["len"] = self._last.get("completions/mean_length", float("nan"))
        fields["tok/s"] = self._rate
        self._bar.advance(int(state.global_step) - self._step, **fields)
        self._step = int(state.global_step)

    def close(self):
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = self._bar = None
