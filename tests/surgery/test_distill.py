"""Both distillation stages lower their loss on a tiny model, train only what they declare, and resume exactly."""

import math

import pytest
import torch
from helpers import dies_after_saving, tiny_model, tiny_recipe

from ling_surgery.surgery.architectures import get_arch
from ling_surgery.surgery.checkpoint import TrainingState
from ling_surgery.surgery.config import AttentionTransferStage, LogitDistillStage, PretrainStage
from ling_surgery.surgery.context import RunContext
from ling_surgery.surgery.data import TokenStream
from ling_surgery.surgery.distill import attention_transfer, logit_distill, pretrain
from ling_surgery.surgery.init_maps import LATENT_NORM_EPS, build_student, init_student_state
from ling_surgery.surgery.plan import KDA, MLA, make_plan, mixer_types
from ling_surgery.surgery.taps import collect_stats
from ling_surgery.surgery.targets import target_config


def _setup(**ctx_fields):
    teacher = tiny_model("llama")
    recipe = tiny_recipe()
    target = target_config(teacher.config, make_plan(4, 2), recipe)
    g = torch.Generator().manual_seed(0)
    # A repetitive token stream so a few steps of training show a clear trend.
    stream = TokenStream.of_tokens(torch.randint(3, 40, (64,), generator=g).repeat(40))
    stats = collect_stats(teacher, get_arch("llama"), [stream.windows(32)[:4]])
    state = init_student_state(teacher.state_dict(), get_arch("llama"), teacher.config, target, stats, recipe.stages[0])
    student = build_student(state, target)
    return teacher, student, RunContext(teacher, get_arch("llama"), stream, 32, torch.device("cpu"), 8, **ctx_fields)


def test_attention_transfer_lowers_the_loss_and_trains_only_mixers():
    teacher, student, ctx = _setup()
    before = {n: p.clone() for n, p in student.named_parameters()}
    student, result = attention_transfer(student, AttentionTransferStage(tokens=40 * 64, batch_size=2, lr=3e-3), ctx)
    assert result["steps"] == 40
    losses = result["losses"]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    for name, p in student.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (".self_attn." in name) or (".self_attn." in name and p.numel() == 0), name


@pytest.mark.parametrize("group, trained_kind", [("kda_mixers", KDA), ("mla_mixers", MLA)])
def test_a_per_kind_mixer_group_trains_only_that_kind_of_layer(group, trained_kind):
    teacher, student, ctx = _setup()
    kinds = mixer_types(student.config)
    assert set(kinds) == {KDA, MLA}
    before = {n: p.clone() for n, p in student.named_parameters()}
    student, _ = logit_distill(student, LogitDistillStage(tokens=3 * 64, batch_size=2, lr=1e-3, trainable=[group]), ctx)
    for name, p in student.named_parameters():
        in_group = name.startswith("model.layers.") and ".self_attn." in name and kinds[int(name.split(".")[2])] == trained_kind
        assert (not torch.equal(p, before[name])) == (in_group and p.numel() > 0), name


def test_logit_distill_lowers_the_kl():
    teacher, student, ctx = _setup()
    stage = LogitDistillStage(tokens=30 * 64, batch_size=2, lr=3e-3, trainable=["all"])
    student, result = logit_distill(student, stage, ctx)
    losses = result["losses"]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_resuming_from_the_training_state_gives_the_same_weights(tmp_path):
    """Die right after the step-4 save of a 10-step stage, resume in a fresh student: bit-equal to an unbroken run
    (copy windows included: they are seeded by window index)."""
    stage = LogitDistillStage(tokens=10 * 64, batch_size=2, lr=3e-3, trainable=["mixers", "norms"], recall_mix=0.5)
    _, unbroken, ctx = _setup()
    unbroken, full = logit_distill(unbroken, stage, ctx)

    state = dies_after_saving(TrainingState(tmp_path / "state.pt", "fp"), step=4)
    _, broken, ctx = _setup(state=state, save_every=2)
    try:
        logit_distill(broken, stage, ctx)
    except KeyboardInterrupt:
        pass
    assert state.saved_steps == [2, 4] and state.peek()["step"] == 4

    _, resumed, ctx = _setup(state=TrainingState(tmp_path / "state.pt", "fp"), save_every=2)
    resumed, result = logit_distill(resumed, stage, ctx)
    assert result["steps"] == 10 and result["losses"] == full["losses"]
    for (name, a), b in zip(unbroken.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_a_state_from_another_recipe_is_ignored(tmp_path):
    state = TrainingState(tmp_path / "state.pt", "recipe-a")
    state.save({"step": 1}, 1, 2)
    assert TrainingState(tmp_path / "state.pt", "recipe-b").load() is None
    assert TrainingState(tmp_path / "state.pt", "recipe-a").load()["step"] == 1


@pytest.mark.parametrize("stage_fn, stage", [
    (attention_transfer, AttentionTransferStage(tokens=2 * 64, batch_size=2, lr=3e-3)),
    (logit_distill, LogitDistillStage(tokens=2 * 64, batch_size=2, lr=3e-3, trainable=["all"])),
])
def test_training_steps_run_under_bf16_autocast(stage_fn, stage):
    """The path every CUDA run takes, on CPU: KDA (solve_triangular), MLA and the losses under bf16 autocast."""
    _, reference, ctx = _setup()
    _, fp32 = stage_fn(reference, stage, ctx)
    _, student, ctx = _setup(bf16_autocast=True)
    before = {n: p.clone() for n, p in student.named_parameters()}
    student, bf16 = stage_fn(student, stage, ctx)
    assert bf16["steps"] == 2 and all(torch.isfinite(torch.tensor(bf16["losses"])))
    # Same loss up to bf16 rounding: the autocast path computes the same function.
    assert bf16["losses"][0] == pytest.approx(fp32["losses"][0], rel=0.05)
    assert any(not torch.equal(p, before[n]) for n, p in student.named_parameters())
    assert all(p.dtype == torch.float32 for p in student.parameters())  # fp32 master weights


def _all_mla_setup(latent_norm: str, **ctx_fields):
    teacher = tiny_model("llama")
    recipe = tiny_recipe(target="all-mla", plan={"mla": {"kv_lora_rank": 24, "qk_rope_head_dim": 8}},
                         stages=[{"kind": "init", "latent_norm": latent_norm}])
    target = target_config(teacher.config, make_plan(4, 1), recipe)
    g = torch.Generator().manual_seed(0)
    stream = TokenStream.of_tokens(torch.randint(3, 40, (64,), generator=g).repeat(40))
    stats = collect_stats(teacher, get_arch("llama"), [stream.windows(32)[:4]])
    state = init_student_state(teacher.state_dict(), get_arch("llama"), teacher.config, target, stats, recipe.stages[0])
    return teacher, build_student(state, target), RunContext(teacher, get_arch("llama"), stream, 32, torch.device("cpu"), 8,
                                                             **ctx_fields)


def _latent_mean_squares(student, ids):
    seen = []
    hooks = [layer.self_attn.kv_a_layernorm.register_forward_pre_hook(lambda m, a: seen.append(a[0].pow(2).mean().item()))
             for layer in student.model.layers]
    with torch.no_grad():
        student(input_ids=ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("bf16", [False, True])
def test_training_keeps_the_latent_norm_in_its_linear_regime(bf16):
    """Per-row learning rates scale AdamW's steps on the tiny latent rows: training lowers the loss and the latent
    stays far below the norm's ε (without them, one step of ~lr per element would be ~1000× the rows' size)."""
    from ling_surgery.surgery.training import latent_row_rates

    teacher, student, ctx = _all_mla_setup("linear", bf16_autocast=bf16)
    ids = ctx.train.windows(32)[:2]
    assert max(_latent_mean_squares(student, ids)) < 1e-2 * LATENT_NORM_EPS
    rates = latent_row_rates(student, ids[:1], 8)
    assert len(rates) == 4
    for rate in rates.values():
        assert rate.shape == (24 + 8,) and rate[:24].max() < 1e-2 and torch.equal(rate[24:], torch.ones(8))
    student, result = attention_transfer(student, AttentionTransferStage(tokens=30 * 64, batch_size=2, lr=3e-3), ctx)
    losses = result["losses"]
    assert all(math.isfinite(x) for x in losses) and sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert max(_latent_mean_squares(student, ids)) < 0.1 * LATENT_NORM_EPS


def test_normalising_latents_train_with_plain_rates():
    from ling_surgery.surgery.training import latent_row_rates

    _, student, ctx = _all_mla_setup("per_token")
    assert latent_row_rates(student, ctx.train.windows(32)[:1], 8) == {}


def test_gradient_clipping_measures_latent_rows_at_their_natural_scale():
    """Rows scaled by s (the linear-regime latent) get gradients scaled by 1/s; with their rate s the clipped
    gradients of every other weight are what they would be without the reparametrisation (a plain global clip
    scaled them by ~s, so KDA mixers trained beside MLA layers barely moved)."""
    from ling_surgery.surgery.training import clip_gradients

    g = torch.Generator().manual_seed(0)
    other_grad, row_grad = torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g)
    scale = torch.tensor([1e-5, 1e-5, 1e-5, 1.0, 1.0])[:, None]  # three latent rows, two rope rows as they are

    def clipped(rows_scaled: bool):
        other, rows = torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(5, 3))
        other.grad = other_grad.clone()
        rows.grad = row_grad / scale if rows_scaled else row_grad.clone()
        clip_gradients([other, rows], {rows: scale} if rows_scaled else {}, 1.0)
        return other.grad, rows.grad  # scaled rows: their gradient times the rate, the natural one

    natural, reparametrised = clipped(False), clipped(True)
    assert torch.allclose(reparametrised[0], natural[0], rtol=1e-5)
    assert torch.allclose(reparametrised[1], natural[1], rtol=1e-4)
    assert natural[0].norm() > 0.1  # the clip did not squash the other weight


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_the_teacher_keeps_packed_documents_apart(model_type):
    from helpers import tiny_model as build

    from ling_surgery.surgery.distill import teacher_forward

    teacher = build(model_type)
    docs = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 12, 13)]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = teacher_forward(teacher, torch.cat(docs)[None], positions).logits[0]
        alone = torch.cat([teacher_forward(teacher, d[None]).logits[0] for d in docs])
        leaky = teacher_forward(teacher, torch.cat(docs)[None]).logits[0]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)
    assert (leaky[7:] - alone[7:]).abs().max() > 1e-3


def _documents_setup(separate: bool):
    """The hybrid setup on a stream of documents of 5 to 40 tokens (several per 32-token window)."""
    teacher, student, ctx = _setup(separate_documents=separate)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 41, (80,), generator=g)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    ctx.train = TokenStream.of_tokens(torch.randint(3, 40, (int(lengths.sum()),), generator=g), starts=starts)
    return teacher, student, ctx


def _pieces(ctx, rows):
    """The documents (token slices) of the first `rows` training windows, each window cut at its document starts."""
    windows = ctx.train.windows(32)[:rows]
    positions = ctx.train.positions(torch.arange(rows), 32)
    out = []
    for ids, pos in zip(windows, positions):
        cuts = (pos == 0).nonzero().flatten().tolist() + [32]
        out.append([ids[a:b] for a, b in zip(cuts, cuts[1:])])
    return out


@pytest.mark.parametrize("separate", [True, False])
def test_logit_distill_on_packed_windows_is_the_loss_of_each_document_alone(separate):
    from ling_surgery.surgery.distill import kl_divergence
    from ling_surgery.surgery.kda import student_logits

    teacher, student, ctx = _documents_setup(separate)
    alone = []
    with torch.no_grad():
        for pieces in _pieces(ctx, 2):
            for piece in pieces:
                t, s = teacher(input_ids=piece[None]).logits, student_logits(student, piece[None], 8)
                alone.append(kl_divergence(t, s) * len(piece))
    expected = (sum(alone) / 64).item()
    stage = LogitDistillStage(tokens=64, batch_size=2, lr=1e-3, trainable=["all"], recall_mix=0)
    _, result = logit_distill(student, stage, ctx)
    assert (result["losses"][0] == pytest.approx(expected, rel=1e-3)) == separate  # losses keep 5 decimals


@pytest.mark.parametrize("separate", [True, False])
def test_attention_transfer_on_packed_windows_is_the_loss_of_each_document_alone(separate):
    from ling_surgery.surgery.kda import mixer_forward, position_embeddings
    from ling_surgery.surgery.taps import attention_taps

    teacher, student, ctx = _documents_setup(separate)
    outputs = {i: ([], []) for i in range(4)}  # per layer: teacher outputs, student outputs, documents side by side
    with torch.no_grad():
        for pieces in _pieces(ctx, 2):
            row = {i: ([], []) for i in range(4)}
            for piece in pieces:
                with attention_taps(teacher, get_arch("llama")) as taps:
                    teacher(input_ids=piece[None])
                rope = position_embeddings(student, taps[0][0])
                for i, layer in enumerate(student.model.layers):
                    row[i][0].append(taps[i][1])
                    row[i][1].append(mixer_forward(layer, taps[i][0], rope, 8))
            for i in range(4):
                outputs[i][0].append(torch.cat(row[i][0], dim=1))
                outputs[i][1].append(torch.cat(row[i][1], dim=1))
    losses = []
    for i in range(4):
        y, pred = torch.cat(outputs[i][0]), torch.cat(outputs[i][1])
        losses.append(torch.nn.functional.mse_loss(pred, y) / y.pow(2).mean())
    expected = torch.stack(losses).mean().item()
    _, result = attention_transfer(student, AttentionTransferStage(tokens=64, batch_size=2, lr=1e-3, recall_mix=0), ctx)
    assert (result["losses"][0] == pytest.approx(expected, rel=1e-3)) == separate  # losses keep 5 decimals


def test_a_copy_window_in_a_packed_batch_is_one_document():
    """Copy windows lose their document ends, so they train as one document: with every window a copy window the
    packed stage computes exactly what the unpacked one does."""
    stage = LogitDistillStage(tokens=64, batch_size=2, lr=1e-3, trainable=["all"], recall_mix=1.0)
    _, student, ctx = _documents_setup(True)
    _, packed = logit_distill(student, stage, ctx)
    _, student, ctx = _documents_setup(False)
    _, unpacked = logit_distill(student, stage, ctx)
    assert packed["losses"] == unpacked["losses"]


@pytest.mark.parametrize("stage_fn, stage", [
    (attention_transfer, AttentionTransferStage(tokens=2 * 64, batch_size=2, lr=3e-3)),
    (logit_distill, LogitDistillStage(tokens=2 * 64, batch_size=2, lr=3e-3, trainable=["all"])),
    (pretrain, PretrainStage(tokens=2 * 64, batch_size=2, lr=3e-3, trainable=["all"], ce_weight=1.0)),
    (pretrain, PretrainStage(tokens=2 * 64, batch_size=2, lr=3e-3, trainable=["all"], teacher_topk=8)),
])
def test_packed_training_steps_run_under_bf16_autocast(stage_fn, stage):
    _, student, ctx = _documents_setup(True)
    _, fp32 = stage_fn(student, stage, ctx)
    _, student, ctx = _documents_setup(True)
    ctx.bf16_autocast = True
    _, bf16 = stage_fn(student, stage, ctx)
    assert bf16["losses"][0] == pytest.approx(fp32["losses"][0], rel=0.05)
    assert all(torch.isfinite(torch.tensor(bf16["losses"])))


def test_next_token_loss_never_asks_a_document_for_the_next_ones_first_token():
    from ling_surgery.surgery.distill import next_token_loss

    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(1, 9, 50, generator=g), torch.randint(0, 50, (1, 9), generator=g)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    alone = [torch.nn.functional.cross_entropy(logits[0, a : b - 1], ids[0, a + 1 : b], reduction="sum")
             for a, b in ((0, 4), (4, 9))]
    assert next_token_loss(logits, ids, positions).item() == pytest.approx((sum(alone) / 7).item(), rel=1e-6)
    assert next_token_loss(logits, ids, None).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item(), rel=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0)])
def test_pretrain_lowers_its_loss_and_reports_perplexity_before_and_after(weights):
    from ling_surgery.surgery.config import PretrainStage
    from ling_surgery.surgery.distill import pretrain

    _, student, ctx = _setup()  # the repetitive stream: a clear trend in a few steps
    ctx.eval_windows = ctx.train.windows(32)[-8:]
    stage = PretrainStage(tokens=20 * 64, batch_size=2, lr=3e-3, kl_weight=weights[0], ce_weight=weights[1],
                          schedule="cosine", trainable=["all"])
    student, result = pretrain(student, stage, ctx)
    losses = result["losses"]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    before, after = result["perplexity_before"]["perplexity"], result["perplexity_after"]["perplexity"]
    assert after < before if weights[1] else math.isfinite(after)  # KL alone moves it toward the teacher's
    assert not student.training and not any(p.requires_grad for p in student.parameters())


def test_pretrain_with_lora_trains_adapters_and_merges_them():
    from ling_surgery.surgery.config import LoraSettings, PretrainStage
    from ling_surgery.surgery.distill import pretrain

    _, student, ctx = _documents_setup(True)
    before = _weights_of(student)
    stage = PretrainStage(tokens=4 * 64, batch_size=2, lr=3e-3, trainable=["mixers", "mlp"], lora=LoraSettings(r=4))
    merged, result = pretrain(student, stage, ctx)
    after = _weights_of(merged)
    assert after.keys() == before.keys()  # merged: no adapter tensors left, the stock names
    assert result["trainable_params"] < 0.5 * sum(p.numel() for p in before.values())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(".mlp." in n for n in changed) and any(".self_attn." in n for n in changed)
    frozen = ("model.embed_tokens", "input_layernorm", "post_attention_layernorm", "model.norm")
    assert not any(part in n for n in changed for part in frozen)  # the groups that do not train


def _weights_of(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}
