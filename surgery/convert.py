"""`convert`: load → plan → calibrate → init maps → attention transfer → logit distillation → export → report.

`ling-surgery convert` is a thin shell over `convert()` and `plan_conversion()` here.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ling_surgery.surgery import sources
from ling_surgery.surgery.architectures import check_source_config
from ling_surgery.surgery.config import ConvertConfig
from ling_surgery.surgery.errors import SurgeryError
from ling_surgery.surgery.plan import LayerPlan, make_plan, student_costs, target_config, teacher_costs


@dataclass
class ConversionPlan:
    source: sources.Source
    source_config: object
    plan: LayerPlan
    target_config: object

    def table(self) -> Table:
        from ling_surgery.evals.report import cost_rows

        table = Table(title=f"plan: {self.source.name} → bailing_hybrid (KDA + gated MLA)")
        table.add_column("layers")
        table.add_column("mixer")
        table.add_column("init")
        runs: list[list] = []
        for i, kind in enumerate(self.plan.layer_types):
            if runs and runs[-1][2] == kind and runs[-1][1] == i - 1:
                runs[-1][1] = i
            else:
                runs.append([i, i, kind])
        for a, b, kind in runs:
            label = f"{a}" if a == b else f"{a}–{b}"
            if kind == "full_attention":
                t = self.target_config
                table.add_row(label, "MLA", f"joint K/V SVD → r={t.kv_lora_rank}, RoPE {t.qk_rope_head_dim}/{t.qk_rope_head_dim + t.qk_nope_head_dim} dims")
            else:
                table.add_row(label, "KDA", "q/k/v/o from attention, GQA repeated")
        costs = Table(title="costs (computed from configs)")
        for col in ("", "teacher", "upgraded", "ratio"):
            costs.add_column(col, justify="left" if not col else "right")
        for row in cost_rows(teacher_costs(self.source_config), student_costs(self.target_config)):
            costs.add_row(*row)
        grid = Table.grid(padding=1)
        grid.add_row(table)
        grid.add_row(costs)
        periodic = f"periodic, layer_group_size={self.plan.group_size}" if self.plan.group_size else "NOT periodic: transformers only, not vLLM/llama.cpp"
        grid.add_row(f"layout: {periodic}")
        return grid


def plan_conversion(cfg: ConvertConfig) -> ConversionPlan:
    """Resolve the source and build the layer plan and target config from the source config alone (no weights)."""
    source = sources.resolve_source(cfg.source.model, cfg.source.revision)
    source_config = sources.load_config(source)
    check_source_config(source_config)
    plan = make_plan(source_config.num_hidden_layers, cfg.plan.layer_group_size, cfg.plan.full_attention_layers)
    return ConversionPlan(source, source_config, plan, target_config(source_config, plan, cfg))


def convert(cfg: ConvertConfig, console: Console | None = None) -> dict:
    """Run the whole conversion; returns the report dict. The checkpoint lands in `cfg.output` atomically."""
    import torch

    from ling_surgery.evals.perplexity import perplexity
    from ling_surgery.evals.report import build_report, report_table, write_report
    from ling_surgery.surgery.architectures import get_arch
    from ling_surgery.surgery.data import TokenStream, load_documents, split_heldout
    from ling_surgery.surgery.distill import StageContext, attention_transfer, logit_distill
    from ling_surgery.surgery.export import check_output_dir, export_checkpoint
    from ling_surgery.surgery.init_maps import build_student, init_student_state
    from ling_surgery.surgery.kda import student_logits
    from ling_surgery.surgery.taps import collect_stats

    console = console or Console(stderr=True)
    if not cfg.output:
        raise SurgeryError("no output folder: pass --output DIR (or set `output:` in the config)")
    output = check_output_dir(cfg.output)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def mark(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 1)
        return now

    conversion = plan_conversion(cfg)
    arch = get_arch(conversion.source_config.model_type)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device))
    torch.manual_seed(cfg.seed)
    console.print(conversion.table())

    t = time.perf_counter()
    console.print(f"loading {conversion.source.name} ({conversion.source.kind}) …")
    # The frozen teacher runs in bf16 on CUDA (dtype=auto); on CPU always fp32 (bf16 is ~400x slower there).
    teacher_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda") else torch.float32
    if teacher_dtype == torch.bfloat16 and device.type == "cpu":
        console.print("[yellow]warning:[/] bf16 on CPU is typically ~400x slower than fp32")
    teacher, tokenizer = sources.load_model(conversion.source, teacher_dtype, str(device))
    docs = load_documents(cfg.data.train, cfg.data.text_field)
    train_docs, heldout_docs = split_heldout(docs, cfg.data.heldout_fraction)
    budget = cfg.calibration.tokens + cfg.attention_transfer.tokens + cfg.logit_distill.tokens + 4 * cfg.data.seq_len
    train = TokenStream.from_documents(train_docs, tokenizer, max_tokens=budget, seed=cfg.seed)
    heldout = TokenStream.from_documents(heldout_docs, tokenizer, max_tokens=cfg.eval.tokens, seed=0)
    console.print(f"data: {len(train_docs)} train / {len(heldout_docs)} held-out documents of {cfg.data.train!r}; "
                  f"{len(train.tokens)} train tokens, {len(heldout.tokens)} held-out tokens")
    t = mark("load", t)

    quality: dict = {}
    eval_windows = heldout.windows(cfg.eval.seq_len) if cfg.eval.tokens else None
    if eval_windows is not None:
        quality["teacher"] = perplexity(lambda ids: teacher(input_ids=ids).logits, eval_windows, device=device)
        console.print(f"teacher held-out perplexity {quality['teacher']['perplexity']:.2f}")
        t = mark("eval_teacher", t)

    n_calib = cfg.calibration.tokens // cfg.data.seq_len
    calib_batches = list(train.windows(cfg.data.seq_len)[:n_calib].split(4)) if n_calib else []
    stats = collect_stats(teacher, arch, calib_batches) if calib_batches else None
    state = init_student_state(teacher.state_dict(), arch, conversion.source_config, conversion.target_config, stats, cfg)
    student = build_student(state, conversion.target_config).to(device)
    del state
    t = mark("init", t)
    chunk = cfg.kda.chunk_size

    def student_fn(ids):
        return student_logits(student, ids, chunk)

    if eval_windows is not None:
        with torch.no_grad():
            quality["student_after_init"] = perplexity(student_fn, eval_windows[: max(1, len(eval_windows) // 4)], device=device)
        console.print(f"upgraded model straight after init: perplexity {quality['student_after_init']['perplexity']:.4g}")
        t = mark("eval_init", t)

    ctx = StageContext(teacher, arch, train, cfg.data.seq_len, device, chunk, window_start=n_calib, console=console)
    stages = {}
    student, result = attention_transfer(student, cfg.attention_transfer, ctx)
    stages["attention_transfer"] = result.summary()
    t = mark("attention_transfer", t)
    student, result = logit_distill(student, cfg.logit_distill, ctx)
    stages["logit_distill"] = result.summary()
    t = mark("logit_distill", t)

    if eval_windows is not None:
        quality["student"] = perplexity(student_fn, eval_windows, device=device)
        quality["perplexity_ratio"] = quality["student"]["perplexity"] / quality["teacher"]["perplexity"]
        t = mark("eval_student", t)

    t_costs, s_costs = teacher_costs(conversion.source_config), student_costs(conversion.target_config)
    meta = {
        "source": conversion.source.name,
        "source_kind": conversion.source.kind,
        "target": "bailing_hybrid (BailingMoeV3ForCausalLM)",
        "plan": {"full_attention_layers": list(conversion.plan.full_attention), "layer_group_size": conversion.plan.group_size},
        "device": str(device),
        "seed": cfg.seed,
        "versions": _versions(),
    }
    student = student.cpu()
    probe = train.windows(min(64, cfg.data.seq_len))[:1]

    def before_commit(folder: Path) -> None:
        timings["total"] = round(time.perf_counter() - started, 1)
        report = build_report(t_costs, s_costs, quality, stages, timings, meta)
        report["export_check"] = verify_export(folder, student, probe)
        write_report(folder, report, t_costs, s_costs)
        before_commit.report = report

    manifest = {"ling_surgery": meta, "config": cfg.model_dump(), "quality": quality,
                "stages": {k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in stages.items()}}
    export_checkpoint(student, tokenizer, output, manifest, before_commit=before_commit)
    report = before_commit.report
    console.print(report_table(report, t_costs, s_costs))
    check = report["export_check"]
    console.print(f"export: {output}  (reloaded in a fresh process: max |Δlogit| = {check['max_abs_diff']:.3g}, "
                  f"cached greedy = uncached argmax: {check['greedy_cache_matches']})")
    return report


def verify_export(folder: Path, model, input_ids) -> dict:
    """Reload the written folder with plain transformers in a fresh process (never imports ling_surgery) and
    compare its logits with the in-memory model's; also check cached greedy decoding against uncached argmax."""
    import torch

    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    torch.save({"input_ids": input_ids, "logits": expected}, folder / ".probe.pt")
    script = (
        "import json,sys,torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "p=torch.load(sys.argv[1]+'/.probe.pt')\n"
        "m=AutoModelForCausalLM.from_pretrained(sys.argv[1],dtype=torch.float32).eval()\n"
        "assert 'ling_surgery' not in sys.modules\n"
        "with torch.no_grad():\n"
        " l=m(input_ids=p['input_ids']).logits\n"
        " ids=p['input_ids'][:,:16]\n"
        " g=m.generate(ids,max_new_tokens=12,do_sample=False,use_cache=True,pad_token_id=0)\n"
        " full=m(input_ids=g).logits.argmax(-1)[:,ids.shape[1]-1:-1]\n"
        "print(json.dumps({'max_abs_diff':(l-p['logits']).abs().max().item(),'bit_exact':bool(torch.equal(l,p['logits'])),"
        "'greedy_cache_matches':bool(torch.equal(full,g[:,ids.shape[1]:]))}))\n"
    )
    try:
        out = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=600, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except subprocess.CalledProcessError as err:
        raise SurgeryError(f"the exported checkpoint does not reload: {(err.stderr.strip().splitlines() or ['?'])[-1]}") from None
    finally:
        (folder / ".probe.pt").unlink(missing_ok=True)


def _versions() -> dict:
    import torch
    import transformers

    import ling_surgery

    return {"ling_surgery": ling_surgery.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
