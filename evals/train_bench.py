"""`ling-surgery bench train`: tokens/s, MFU and peak memory of each training stage kind, on a real model.

MFU is the FLOPs a step executes over its time and this machine's matmul peak:

- FLOPs are counted, not estimated: one optimizer step runs under torch's `FlopCounterMode`, which adds up every
  matmul, convolution and attention call as dispatched — the teacher's forward, the student's forward and backward
  (weight and input gradients where they are computed), the KDA chunk products — so frozen weights, LoRA or a
  stage's own loss cost what they really cost;
- the peak is measured here, in the stage's compute dtype (fp32 on CPU, bf16 on CUDA): the best rate of large square
  matmuls, i.e. what this machine's BLAS delivers, not a datasheet figure.

Each stage runs one warm-up step (allocator, thread pools), one counted step, then `steps` timed steps on packed
Wikipedia windows, from the same freshly initialised student. The student is the recipe's conversion of MODEL
(`plan` values derived from the source as `convert` derives them; `--set` changes them), initialised without
calibration (speed does not depend on it).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ling_surgery.surgery.errors import SurgeryError

KINDS = ("attention_transfer", "logit_distill", "pretrain")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5, inner: int = 3) -> float:
    """The best FLOP/s of `inner` back-to-back (size × size) @ (size × size) matmuls, over `repeats` tries."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up: BLAS thread pool, kernels
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * inner / best


class _PeakMemory:
    """Peak memory while a stage runs: the GPU allocator's peak on CUDA; on CPU the process's peak resident set
    (VmHWM, reset through /proc/self/clear_refs where the kernel allows it)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None


class _StepClock:
    """`RunContext.on_step`: counts the FLOPs of step 1 (step 0 warms up) and times the steps after it."""

    def __init__(self, device: torch.device):
        from torch.utils.flop_counter import FlopCounterMode

        self.device, self.counter = device, FlopCounterMode(display=False)
        self.flops, self.seconds, self.last = 0, [], 0.0

    def __call__(self, step: int) -> None:
        sync(self.device)
        now = time.perf_counter()
        if step == 0:
            self.counter.__enter__()
        elif step == 1:
            self.counter.__exit__(None, None, None)
            self.flops = self.counter.get_total_flops()
        else:
            self.seconds.append(now - self.last)
        self.last = time.perf_counter()


def bench_train(model: str = "smollm2-135m", kinds: tuple[str, ...] = KINDS, seq_len: int = 512, batch_size: int = 2,
                steps: int = 3, device: str = "auto", overrides: list[str] = (), console: Console | None = None,
                output: Path | None = None) -> dict:
    """Benchmark each stage kind in `kinds` (see the module doc); prints a table, writes `bench_train.json` to
    `output`, returns the same numbers."""
    from ling_surgery.surgery import sources
    from ling_surgery.surgery.align import plan_recipe
    from ling_surgery.surgery.config import AttentionTransferStage, InitStage, LogitDistillStage, PretrainStage, load_recipe
    from ling_surgery.surgery.context import RunContext
    from ling_surgery.surgery.data import TokenStream, load_documents
    from ling_surgery.surgery.run import resolve_device
    from ling_surgery.surgery.stages import STAGES

    console = console or Console(stderr=True)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise SurgeryError(f"--stages {','.join(kinds)!s}: choose from {', '.join(KINDS)}")
    if steps < 1 or batch_size < 1 or seq_len < 8:
        raise SurgeryError("--steps and --batch-size must be at least 1 and --seq-len at least 8")
    recipe = load_recipe(None, [f"source.model={model}", f"data.seq_len={seq_len}", *overrides])
    conversion = plan_recipe(recipe)
    if conversion.target_config is None:
        raise SurgeryError(f"{model!r} is already an upgraded model; bench train converts a source model (pass the "
                           "teacher, e.g. smollm2-135m)")
    torch_device = resolve_device(device)
    bf16 = torch_device.type == "cuda"  # the run's default: bf16 autocast on CUDA, fp32 on CPU
    compute_dtype = torch.bfloat16 if bf16 else torch.float32
    console.print(f"measuring the {compute_dtype} matmul peak on {torch_device} …")
    peak = matmul_peak(torch_device, compute_dtype)
    teacher, tokenizer = sources.load_model(conversion.source, compute_dtype, str(torch_device))
    step_tokens = batch_size * seq_len
    stream = TokenStream.from_documents(load_documents("wikipedia")[:4000], tokenizer,
                                        max_tokens=(steps + 3) * step_tokens, seed=recipe.seed)
    ctx = RunContext(teacher=teacher, arch=conversion.arch, train=stream, seq_len=seq_len, device=torch_device,
                     chunk_size=recipe.runtime.kda_chunk_size, source_config=conversion.source_config,
                     target_config=conversion.target_config, bf16_autocast=bf16, tokenizer=tokenizer, seed=recipe.seed)
    student, _ = STAGES["init"](teacher, InitStage(calibration_tokens=0), ctx)
    stage_types = {"attention_transfer": AttentionTransferStage, "logit_distill": LogitDistillStage,
                   "pretrain": PretrainStage}
    memory, rows = _PeakMemory(torch_device), []
    for kind in kinds:
        stage = stage_types[kind](tokens=(steps + 2) * step_tokens, batch_size=batch_size, recall_mix=0.0,
                                  warmup_steps=0)
        clock = _StepClock(torch_device)
        ctx.on_step = clock
        trained = copy.deepcopy(student)
        memory.reset()
        STAGES[kind](trained, stage, ctx)
        step_seconds = sum(clock.seconds) / len(clock.seconds)
        rows.append({"stage": kind, "trainable": stage.trainable or "(default)", "tokens_per_step": step_tokens,
                     "step_seconds": round(step_seconds, 4), "tokens_per_second": round(step_tokens / step_seconds, 1),
                     "flops_per_step": clock.flops, "flops_per_token": round(clock.flops / step_tokens),
                     "flops_per_second": round(clock.flops / step_seconds), "mfu": clock.flops / step_seconds / peak,
                     "peak_memory_bytes": memory.peak()})
        del trained
    result = {"model": model, "device": str(torch_device), "dtype": str(compute_dtype).replace("torch.", ""),
              "threads": torch.get_num_threads(), "seq_len": seq_len, "batch_size": batch_size, "steps": steps,
              "matmul_peak_flops": round(peak), "stages": rows}
    console.print(train_table(result))
    if output is not None:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        (output / "bench_train.json").write_text(json.dumps(result, indent=1))
        console.print(f"wrote {output / 'bench_train.json'}")
    return result


def train_table(result: dict) -> Table:
    table = Table(title=f"training throughput: {result['model']} on {result['device']} ({result['dtype']}, "
                        f"{result['threads']} threads), {result['batch_size']} × {result['seq_len']} tokens a step; "
                        f"matmul peak {result['matmul_peak_flops'] / 1e9:,.1f} GFLOP/s")
    for col in ("stage", "tokens/s", "GFLOP/token", "GFLOP/s", "MFU", "peak memory"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for row in result["stages"]:
        mem = row["peak_memory_bytes"]
        table.add_row(row["stage"], f"{row['tokens_per_second']:,.1f}", f"{row['flops_per_token'] / 1e9:.3f}",
                      f"{row['flops_per_second'] / 1e9:,.1f}", f"{row['mfu']:.1%}",
                      "–" if mem is None else f"{mem / 2**30:.2f} GiB")
    return table
