"""The fast chunked KDA equals transformers' reference, and the functional student forward equals the stock model."""

import pytest
import torch
from transformers.models.bailing_hybrid import modeling_bailing_hybrid as ref

from ling_surgery.surgery.kda import chunk_kda, kda_mixer_forward, student_extend, student_hidden, student_logits


def _inputs(batch=2, seq=45, heads=3, dk=8, gate_scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, seq, heads, dk, generator=g) for _ in range(3))
    gate = -5 * torch.sigmoid(gate_scale * torch.randn(batch, seq, heads, dk, generator=g))
    beta = torch.rand(batch, seq, heads, generator=g)
    return q, k, v, gate, beta


@pytest.mark.parametrize("chunk", [1, 7, 16, 32])
@pytest.mark.parametrize("gate_scale", [0.5, 8.0])  # 8.0 pushes many gates to the -5 bound
def test_chunk_kda_matches_reference_recurrence(chunk, gate_scale):
    q, k, v, g, beta = _inputs(gate_scale=gate_scale)
    state0 = torch.randn(2, 3, 8, 8) * 0.1
    expected, expected_state = ref.recurrent_kimi_delta_attention(
        q, k, v, g, beta, initial_state=state0, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    out, state = chunk_kda(q, k, v, g, beta, chunk_size=chunk, initial_state=state0, output_final_state=True)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(state, expected_state, atol=2e-5, rtol=1e-4)


def test_chunk_kda_gradients_match_reference():
    q, k, v, g, beta = (x.double().requires_grad_() for x in _inputs(seq=20))
    out_ref, _ = ref.chunk_kimi_delta_attention(q, k, v, g, beta, chunk_size=8, use_qk_l2norm_in_kernel=True)
    grads_ref = torch.autograd.grad(out_ref.pow(2).sum(), (q, k, v, g, beta))
    out, _ = chunk_kda(q, k, v, g, beta, chunk_size=16)
    grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v, g, beta))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-3)


def _tiny_hybrid():
    from transformers import BailingHybridConfig, BailingHybridForCausalLM

    torch.manual_seed(0)
    config = BailingHybridConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        layer_group_size=2, mlp_layer_types=["dense"] * 4, first_k_dense_replace=4, num_mtp_layers=0,
        pad_token_id=0, eos_token_id=1, rope_theta=10000.0, num_local_experts=1, n_group=1, topk_group=1,
        num_experts_per_tok=1,
    )
    model = BailingHybridForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial gates and conv so the comparison means something
        for layer in model.model.layers:
            if layer.block_type == "linear_attention":
                layer.self_attn.conv1d.weight.normal_(0, 0.5)
                layer.self_attn.forget_gate.f_proj.weight.normal_(0, 0.3)
    return model


def test_student_forward_matches_stock_model():
    model = _tiny_hybrid()
    ids = torch.randint(0, 64, (2, 37))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = student_logits(model, ids, chunk_size=8)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_kda_mixer_forward_matches_module():
    model = _tiny_hybrid()
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 21, 32)
    with torch.no_grad():
        torch.testing.assert_close(kda_mixer_forward(attn, x, chunk_size=4), attn(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cuts", [(37,), (5, 37), (1, 2, 19, 37), (8, 16, 37)])
def test_student_continued_in_segments_equals_one_pass(cuts):
    """A prefix's state continued segment by segment (KDA conv tail and delta-rule state, MLA latents) gives the
    hidden states of one uncached pass."""
    model = _tiny_hybrid()
    ids = torch.randint(0, 64, (1, 37))
    with torch.no_grad():
        whole = student_hidden(model, ids, chunk_size=8)
        state, pieces = None, []
        for start, end in zip((0,) + cuts[:-1], cuts):
            hidden, state = student_extend(model, ids[:, start:end], state, chunk_size=8)
            pieces.append(hidden)
    assert state.length == 37
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-5, rtol=1e-4)


def test_a_student_state_is_reusable_by_several_continuations():
    model = _tiny_hybrid()
    ids = torch.randint(0, 64, (1, 30))
    with torch.no_grad():
        _, prefix = student_extend(model, ids[:, :20], chunk_size=8)
        first, _ = student_extend(model, ids[:, 20:], prefix, chunk_size=8)
        other = torch.randint(0, 64, (1, 6))
        student_extend(model, other, prefix, chunk_size=8)  # a sibling branch must not disturb the prefix state
        again, _ = student_extend(model, ids[:, 20:], prefix, chunk_size=8)
        whole = student_hidden(model, ids, chunk_size=8)
    assert torch.equal(first, again)
    torch.testing.assert_close(first, whole[:, 20:], atol=1e-5, rtol=1e-4)


def test_chunk_kda_runs_in_fp32_inside_bf16_autocast():
    """The CUDA training path: autocast would hand bf16 matrices to solve_triangular (no bf16 kernel)."""
    q, k, v, g, beta = _inputs()
    expected, _ = chunk_kda(q, k, v, g, beta, chunk_size=16)
    leaves = [x.bfloat16().requires_grad_() for x in (q, k, v, g, beta)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = chunk_kda(*leaves, chunk_size=16)
    assert out.dtype == torch.bfloat16
    # Inputs rounded to bf16 are the only error: the kernel itself is fp32.
    exact_on_rounded, _ = chunk_kda(*(x.detach().float() for x in leaves), chunk_size=16)
    torch.testing.assert_close(out.float(), exact_on_rounded, atol=1e-2, rtol=1e-2)
    assert (out.float() - expected).abs().max() < 0.1
    out.float().pow(2).sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)


def _packed(lengths, vocab=64, seed=1):
    """One row of documents of the given lengths back to back, its position ids (restarting at each document) and
    the documents alone."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    positions = torch.cat([torch.arange(n) for n in lengths])
    return torch.cat(docs)[None], positions[None], docs


# Document starts inside chunks, on a chunk start (8, 16 with chunk 8), a one-token document, and one spanning chunks.
@pytest.mark.parametrize("lengths", [(8, 8, 21), (5, 1, 13, 18), (37,), (3, 30, 4)])
def test_packed_documents_give_each_document_its_own_logits(lengths):
    """Packing without leaks: KDA recurrence, short convolution and MLA attention all restart at every document."""
    model = _tiny_hybrid()
    ids, positions, docs = _packed(lengths)
    with torch.no_grad():
        packed = student_logits(model, ids, chunk_size=8, position_ids=positions)[0]
        alone = torch.cat([student_logits(model, doc[None], chunk_size=8)[0] for doc in docs])
        leaky = student_logits(model, ids, chunk_size=8)[0]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)
    if len(lengths) > 1:  # the test can fail: without the boundaries the later documents differ
        assert (leaky[lengths[0]:] - alone[lengths[0]:]).abs().max() > 1e-3


def test_packed_rows_of_a_batch_and_their_gradients_match_documents_alone():
    model = _tiny_hybrid().train()
    rows = [_packed((9, 14, 14), seed=2), _packed((20, 17), seed=3)]
    ids = torch.cat([r[0] for r in rows])
    positions = torch.cat([r[1] for r in rows])

    def loss(logits, targets):  # summed next-token CE inside each document
        return torch.nn.functional.cross_entropy(logits[:-1], targets[1:], reduction="sum")

    logits = student_logits(model, ids, chunk_size=8, position_ids=positions)
    packed_loss = sum(loss(logits[b, s : s + len(d)], d) for b, (_, _, docs) in enumerate(rows)
                      for s, d in zip(torch.tensor([0] + [len(d) for d in docs]).cumsum(0).tolist(), docs))
    packed_grads = torch.autograd.grad(packed_loss, list(model.parameters()), allow_unused=True)
    alone_loss = sum(loss(student_logits(model, d[None], chunk_size=8)[0], d) for _, _, docs in rows for d in docs)
    alone_grads = torch.autograd.grad(alone_loss, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(packed_loss, alone_loss, atol=1e-4, rtol=1e-5)
    for got, expected in zip(packed_grads, alone_grads):
        if expected is not None:  # fp32 sums over 70 tokens in another order
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)


def test_packed_chunk_kda_restarts_the_recurrence_at_each_document():
    q, k, v, g, beta = _inputs(batch=1, seq=29)
    documents = torch.tensor([[0] * 7 + [1] * 9 + [2] * 13])
    out, state = chunk_kda(q, k, v, g, beta, chunk_size=8, output_final_state=True, documents=documents)
    start = 0
    for n in (7, 9, 13):
        piece = slice(start, start + n)
        alone, alone_state = ref.recurrent_kimi_delta_attention(
            q[:, piece], k[:, piece], v[:, piece], g[:, piece], beta[:, piece], initial_state=None, output_final_state=True,
            use_qk_l2norm_in_kernel=True)
        torch.testing.assert_close(out[:, piece], alone, atol=2e-5, rtol=1e-4)
        start += n
    torch.testing.assert_close(state, alone_state, atol=2e-5, rtol=1e-4)  # the last document's final state


def test_the_fast_path_runs_on_fake_tensors_for_memory_planning():
    """Shape-only tensors (FakeTensorMode, as a memory plan uses them) go through forward and backward: the
    data-dependent chunk shrink for unbounded gates is skipped there, and the saved activations can be counted."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = _tiny_hybrid().config
    saved = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = type(_tiny_hybrid())(config)
        ids = torch.randint(0, config.vocab_size, (2, 40))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            logits = student_logits(model, ids, chunk_size=8)
        logits.float().pow(2).mean().backward()
        assert logits.shape == (2, 40, config.vocab_size)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert sum(saved) > 40 * 2 * config.hidden_size * 4 * config.num_hidden_layers  # ≥ a hidden state per layer
