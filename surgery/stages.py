"""The stage registry: each recipe `kind` is a plain function (model, stage config, context) → (model, metrics).

The runner (`surgery/run.py`) writes each stage's model and metrics as a checkpoint with a manifest.
"""

from __future__ import annotations

import torch

from ling_surgery.surgery.architectures import source_moe
from ling_surgery.surgery.context import RunContext
from ling_surgery.surgery.distill import attention_transfer, heldout_perplexity, logit_distill, pretrain
from ling_surgery.surgery.init_maps import build_student, init_student_state, mla_energy_kept
from ling_surgery.surgery.moe import measure_map, print_map
from ling_surgery.surgery.rl import rl
from ling_surgery.surgery.sft import sft
from ling_surgery.surgery.taps import collect_stats


def init(teacher, stage, ctx: RunContext) -> tuple[torch.nn.Module, dict]:
    """Stage `kind: init`: activation statistics of the teacher on calibration text, then the init maps (for MoE
    sources, how closely each MoE block is reproduced: `moe.routing_fidelity`).

    The calibration windows are the first training windows; later stages start after them.
    """
    n_windows = stage.calibration_tokens // ctx.seq_len
    windows = ctx.train.windows(ctx.seq_len)[ctx.window_start : ctx.window_start + n_windows]
    stats = collect_stats(teacher, ctx.arch, list(windows.split(4))) if n_windows else None
    teacher_state = {name: tensor.detach().cpu() for name, tensor in teacher.state_dict().items()}
    state = init_student_state(teacher_state, ctx.arch, ctx.source_config, ctx.target_config, stats, stage)
    student = build_student(state, ctx.target_config).to(ctx.device)
    energy = mla_energy_kept(teacher_state, ctx.arch, ctx.source_config, ctx.target_config, stats, stage.svd)
    moe = source_moe(ctx.source_config)
    moe_map = {} if moe is None else measure_map(teacher, teacher_state, state, ctx.arch, moe, stats, windows)
    del state, teacher_state
    metrics = {"calibration_tokens": int(windows.numel()) if n_windows else 0,
               "parameters": sum(p.numel() for p in student.parameters()),
               "mla_energy_kept": {str(i): kept for i, kept in energy.items()}, **moe_map}
    if ctx.console is not None and energy:
        ctx.console.print(energy_table(energy))
    if ctx.console is not None:
        print_map(ctx.console, moe_map, moe)
    if ctx.eval_windows is not None:
        metrics["perplexity_after_init"] = heldout_perplexity(student, ctx)
        if ctx.console is not None:
            ctx.console.print(f"upgraded model straight after init: perplexity {metrics['perplexity_after_init']['perplexity']:.4g}")
    return student, metrics


def energy_table(energy: dict[int, dict]):
    """Per MLA layer, the worst and mean KV head's share of key/value energy that the init keeps."""
    from rich.table import Table

    table = Table(title="MLA init: share of each KV head's energy kept (worst head / mean)")
    for col in ("layer", "NoPE keys (latent)", "values (latent)", "RoPE keys (shared key)"):
        table.add_column(col, justify="right")
    for i, kept in energy.items():
        table.add_row(str(i), *(f"{min(kept[k]):.1%} / {sum(kept[k]) / len(kept[k]):.1%}" for k in ("k_nope", "v", "k_rope")))
    return table


STAGES = {
    "init": init,
    "attention_transfer": attention_transfer,
    "logit_distill": logit_distill,
    "pretrain": pretrain,
    "sft": sft,
    "rl": rl,
}
