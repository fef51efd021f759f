"""`bench train`: counted FLOPs that add up, MFU against a measured matmul peak, and the JSON CI reads."""

import json

import torch
from helpers import save_tiny_source
from transformers import AutoModelForCausalLM

from ling_surgery.evals.train_bench import bench_train, matmul_peak


def test_the_matmul_peak_is_a_plausible_rate():
    rate = matmul_peak(torch.device("cpu"), torch.float32, size=256, repeats=3)
    assert 1e8 < rate < 1e14  # between 0.1 GFLOP/s and 100 TFLOP/s for fp32 on a CPU


def test_each_stage_kind_gets_counted_flops_a_rate_and_its_peak_memory(tmp_path):
    source = save_tiny_source(tmp_path / "model")
    teacher = AutoModelForCausalLM.from_pretrained(source)
    teacher_linear = sum(m.weight.numel() for m in teacher.modules() if isinstance(m, torch.nn.Linear))
    result = bench_train(str(source), seq_len=32, batch_size=2, steps=1, output=tmp_path / "bench",
                         overrides=["plan.layer_group_size=2", "plan.mla.kv_lora_rank=32", "plan.mla.qk_rope_head_dim=8"])
    rows = {row["stage"]: row for row in result["stages"]}
    assert list(rows) == ["attention_transfer", "logit_distill", "pretrain"]
    for row in rows.values():
        assert row["tokens_per_second"] > 0 and 0 < row["mfu"] < 2 and row["peak_memory_bytes"] > 0
    # pretrain with its defaults (KL only, logit_distill's trainable groups) is logit_distill on other text: the same
    # FLOPs; attention transfer trains mixers on the teacher's own hidden states (no MLP, no lm_head backward).
    assert rows["pretrain"]["flops_per_step"] == rows["logit_distill"]["flops_per_step"]
    assert rows["attention_transfer"]["flops_per_step"] < rows["logit_distill"]["flops_per_step"]
    # At least the teacher's forward and the student's forward: ≥ 2 FLOPs per linear weight and token, twice.
    assert rows["logit_distill"]["flops_per_token"] >= 4 * teacher_linear
    assert json.loads((tmp_path / "bench" / "bench_train.json").read_text())["stages"][1]["stage"] == "logit_distill"
