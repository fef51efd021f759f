"""What a stage gets besides its model and its config: the frozen teacher, data, device and checkpoint hooks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ling_surgery.surgery.architectures import ArchSpec
from ling_surgery.surgery.checkpoint import TrainingState
from ling_surgery.surgery.data import TokenStream


@dataclass
class RunContext:
    teacher: torch.nn.Module  # frozen, eval mode
    arch: ArchSpec  # the teacher's architecture table
    train: TokenStream
    seq_len: int
    device: torch.device
    chunk_size: int = 32  # exact fast KDA path
    window_start: int = 0  # this stage's first training window: stages read disjoint text
    console: object = None
    state: TrainingState | None = None  # in-stage checkpoint for --resume (None: not saved)
    save_every: int = 0
    source_config: object = None
    target_config: object = None
    eval_windows: torch.Tensor | None = None  # held-out windows, for metrics a stage reports
    bf16_autocast: bool = False  # train under bf16 autocast (runtime.dtype bfloat16, or auto on CUDA)
    tokenizer: object = None  # the model's tokenizer (alignment stages give it thinking modes; saved with each stage)
    seed: int = 0
    separate_documents: bool = True  # training windows keep their documents apart (data.attend_across_documents false)
    work_dir: Path | None = None  # the run folder: files a stage keeps beside its checkpoints (teacher-logits/)
    teacher_name: str = "teacher"  # where the teacher came from (keys what is computed from it)
    on_step: object = None  # called with the step index after each optimizer step (benchmarks time and count there)
    engine: str = "ddp"  # runtime.engine: ddp (a replica per process), fsdp2 or zero3 (sharded over the processes)
    shard_teacher: bool = False  # runtime.teacher sharded: under fsdp2 a training stage shards the teacher too
