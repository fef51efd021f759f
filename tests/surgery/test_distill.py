"""Both distillation stages lower their loss on a tiny model and train only what they declare."""

import torch
from helpers import tiny_model

from ling_surgery.surgery.architectures import get_arch
from ling_surgery.surgery.config import AttentionTransferConfig, ConvertConfig, LogitDistillConfig
from ling_surgery.surgery.data import TokenStream
from ling_surgery.surgery.distill import StageContext, attention_transfer, logit_distill
from ling_surgery.surgery.init_maps import build_student, init_student_state
from ling_surgery.surgery.plan import make_plan, target_config
from ling_surgery.surgery.taps import collect_stats


def _setup():
    teacher = tiny_model("llama")
    cfg = ConvertConfig.model_validate({"plan": {"layer_group_size": 2}, "mla": {"kv_lora_rank": 32, "qk_rope_head_dim": 8}})
    target = target_config(teacher.config, make_plan(4, 2), cfg)
    g = torch.Generator().manual_seed(0)
    # A repetitive token stream so a few steps of training show a clear trend.
    stream = TokenStream(torch.randint(3, 40, (64,), generator=g).repeat(40))
    stats = collect_stats(teacher, get_arch("llama"), [stream.windows(32)[:4]])
    student = build_student(init_student_state(teacher.state_dict(), get_arch("llama"), teacher.config, target, stats, cfg), target)
    return teacher, student, StageContext(teacher, get_arch("llama"), stream, 32, torch.device("cpu"), 8)


def test_attention_transfer_lowers_the_loss_and_trains_only_mixers():
    teacher, student, ctx = _setup()
    before = {n: p.clone() for n, p in student.named_parameters()}
    student, result = attention_transfer(student, AttentionTransferConfig(tokens=40 * 64, batch_size=2, lr=3e-3), ctx)
    assert result.steps == 40
    assert sum(result.losses[-5:]) / 5 < 0.7 * sum(result.losses[:5]) / 5
    for name, p in student.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (".self_attn." in name) or (".self_attn." in name and p.numel() == 0), name


def test_logit_distill_lowers_the_kl():
    teacher, student, ctx = _setup()
    student, result = logit_distill(student, LogitDistillConfig(tokens=30 * 64, batch_size=2, lr=3e-3, trainable=["all"]), ctx)
    assert sum(result.losses[-5:]) / 5 < 0.7 * sum(result.losses[:5]) / 5
