"""Exact, fast chunked Kimi Delta Attention (KDA) for training on CPU, and functional student forwards.

transformers' reference `chunk_kimi_delta_attention` is exact but builds ``[C, C, dk]`` broadcast tensors and
inverts the intra-chunk system row by row in Python. This module computes the *same* function with the WY /
UT-transform formulation of the delta rule (Yang et al., "Parallelizing Linear Transformers with the Delta Rule
over Sequence Length", 2024, §3; Kimi Linear tech report 2025, eq. 6-9 for the channel-wise decay):

    S_t = (I - β_t k_t k_tᵀ) Diag(α_t) S_{t-1} + β_t k_t v_tᵀ,      o_t = S_tᵀ q_t,      α_t = exp(g_t)

Inside a chunk with cumulative log-decay G_t = Σ_{s≤t} g_s (per key channel, from the chunk start) and
start state S₀, the delta-rule "pseudo values" u solve a unit lower-triangular system

    (I + A) u = β ⊙ (V - (K ⊙ e^G) S₀),   A_{ts} = β_t (k_t ⊙ e^{G_t}) · (k_s ⊙ e^{-G_s})  for s < t,

so all S₀-independent work (A, the triangular solves, the intra-chunk scores) runs batched over every chunk at
once, and the sequential part is four small matmuls per chunk. With the "safe" forget gate g ≥ -5
(``kda_safe_gate``), a chunk of 16 keeps e^{±G} inside fp32 range (|G| ≤ 80).

The weights stay in the stock `bailing_hybrid` modules; these functions read them, so what is trained here is
exactly what is exported. Parity against the reference lives in ``tests/surgery/test_kda.py``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

SAFE_CHUNK_LOG_RANGE = 80.0  # |G| we allow inside a chunk: e^80 ≈ 5.5e34 < fp32 max 3.4e38


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # Same formula as fla / transformers' reference (x / sqrt(Σx² + eps)), so results match bit-for-bit in spirit.
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def chunk_kda(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int = 16,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    documents: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA with q/k L2-normalised in the kernel, as `chunk_kimi_delta_attention(..., use_qk_l2norm_in_kernel=True)`.

    Shapes: query/key/value/g ``[B, T, H, dk]``, beta ``[B, T, H]``; returns ``[B, T, H, dk]`` and the final
    state ``[B, H, dk, dv]`` (fp32) when asked. `documents` ``[B, T]`` (non-decreasing document index of every
    position, see `document_index`) restarts the recurrence at every document start, exactly as if each document were
    run alone (what fla's kernels do with ``cu_seqlens``); `initial_state` is the state before the first document.
    Computation is fp32 whatever the input dtype, and also inside autocast (the path every CUDA run takes): autocast would hand bf16 matrices to `solve_triangular`, which has no
    bf16 kernel, and e^{±G} up to e^80 multiplied in bf16 keeps only ~3 significant digits. fla's Triton kernels
    keep this part in fp32 too. The result is returned in the input dtype.
    """
    devices = {t.device.type for t in (query, key, value, g, beta)}
    with torch.autocast(devices.pop(), enabled=False):
        return _chunk_kda_fp32(query, key, value, g, beta, chunk_size, initial_state, output_final_state, documents)


def _symbolic(tensor: torch.Tensor) -> bool:
    """A tensor without values (meta, or a FakeTensor while memory is planned): shape-only paths skip data-dependent
    choices."""
    from torch._subclasses.fake_tensor import is_fake

    return tensor.device.type == "meta" or is_fake(tensor)


def _chunk_kda_fp32(query, key, value, g, beta, chunk_size, initial_state, output_final_state, documents):
    in_dtype = query.dtype
    batch, seq_len, heads, dk = key.shape
    dv = value.shape[-1]
    min_g = float(g.detach().min()) if g.numel() and not _symbolic(g) else 0.0
    if min_g < 0 and chunk_size * -min_g > SAFE_CHUNK_LOG_RANGE:
        # Unbounded gates (kda_safe_gate=False) need smaller chunks to stay inside fp32 range.
        chunk_size = max(1, int(SAFE_CHUNK_LOG_RANGE // -min_g))
    q, k, v, g, beta = (x.transpose(1, 2).to(torch.float32) for x in (query, key, value, g, beta))  # (B, H, T, ·)
    q = l2norm(q) * dk**-0.5
    k = l2norm(k)

    pad = (-seq_len) % chunk_size
    if pad:
        # Padded steps have g = 0 and β = 0: no decay and no write, so the state passes through unchanged.
        q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
        beta = F.pad(beta, (0, pad))
        if documents is not None:  # padded steps belong to the last document (they change nothing anyway)
            documents = torch.cat([documents, documents[:, -1:].expand(-1, pad)], dim=1)
    n_chunks = (seq_len + pad) // chunk_size
    q, k, v, g = (x.reshape(batch, heads, n_chunks, chunk_size, x.shape[-1]) for x in (q, k, v, g))
    beta = beta.reshape(batch, heads, n_chunks, chunk_size, 1)

    log_decay = g.cumsum(dim=-2)  # G_t, (B, H, N, C, dk)
    k_fwd = k * log_decay.exp()  # k_t ⊙ e^{G_t}
    k_bwd = k * (-log_decay).exp()  # k_s ⊙ e^{-G_s}
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    strict = causal.tril(-1)

    # Packed documents: no pair of positions in different documents interacts (A and the scores are block-diagonal
    # per document), only positions still in the chunk's first document see the start state S₀ (`sees_start`), and
    # only the chunk's last document writes the state it passes on. The products e^{G_t - G_s} that remain are
    # decays between positions of one document, so the result is each document's own recurrence.
    sees_start = last_writes = None
    if documents is not None:
        doc = documents.reshape(batch, 1, n_chunks, chunk_size)
        same = doc[..., :, None] == doc[..., None, :]  # (B, 1, N, C, C)
        causal, strict = causal & same, strict & same
        entering = torch.cat([doc[:, :, :1, :1], doc[:, :, :-1, -1:]], dim=2)  # the document the state S₀ belongs to
        sees_start = (doc == entering).unsqueeze(-1)  # (B, 1, N, C, 1)
        last_writes = (doc == doc[..., -1:]).unsqueeze(-1)

    # Intra-chunk delta-rule system (I + A) u = β (v - (k ⊙ e^G) S₀), solved for both right-hand sides at once.
    a = ((beta * k_fwd) @ k_bwd.transpose(-1, -2)).masked_fill(~strict, 0.0)
    system = a + torch.eye(chunk_size, dtype=a.dtype, device=a.device)
    rhs = torch.cat([beta * v, beta * (k_fwd if sees_start is None else k_fwd * sees_start)], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u_base, w = solved.split([dv, dk], dim=-1)  # u = u_base - w S₀

    q_fwd = q * log_decay.exp()
    scores = (q_fwd @ k_bwd.transpose(-1, -2)).masked_fill(~causal, 0.0)  # inclusive of the diagonal
    last = log_decay[..., -1:, :]  # G at the chunk end, (B, H, N, 1, dk)
    k_to_end = k * (last - log_decay).exp()
    state_decay = last.exp().transpose(-1, -2)  # (B, H, N, dk, 1)
    if documents is not None:
        q_fwd = q_fwd * sees_start
        k_to_end = k_to_end * last_writes
        state_decay = state_decay * sees_start[..., -1:, :]  # a document starting in the chunk drops S₀

    state = (
        torch.zeros(batch, heads, dk, dv, dtype=torch.float32, device=q.device)
        if initial_state is None
        else initial_state.to(torch.float32)
    )
    outputs = []
    for n in range(n_chunks):
        u = u_base[:, :, n] - w[:, :, n] @ state
        outputs.append(q_fwd[:, :, n] @ state + scores[:, :, n] @ u)
        state = state_decay[:, :, n] * state + k_to_end[:, :, n].transpose(-1, -2) @ u
    out = torch.stack(outputs, dim=2).reshape(batch, heads, n_chunks * chunk_size, dv)[:, :, :seq_len]
    return out.transpose(1, 2).to(in_dtype), (state if output_final_state else None)


@dataclass(frozen=True)
class KDAState:
    """What a KDA layer carries from one segment to the next: the last K−1 inputs of its causal depthwise
    convolution (pre-activation, ``[B, 3·H·dk, K−1]``) and the delta-rule state S (fp32, ``[B, H, dk, dv]``)."""

    conv_tail: torch.Tensor
    recurrent: torch.Tensor


def kda_mixer_forward(attn, hidden_states: torch.Tensor, chunk_size: int = 16, state: KDAState | None = None,
                      return_state: bool = False, documents: torch.Tensor | None = None):
    """`BailingHybridDeltaAttention.forward` without padding mask, using `chunk_kda`.

    Reads the stock module's parameters, so training through this path trains the exported weights. With `state`
    the segment continues an earlier one exactly (the convolution sees the previous inputs, the recurrence starts
    from S); `return_state` also returns the state at the segment's end. `documents` (``[B, T]``, `document_index`)
    keeps packed documents apart: neither the convolution nor the recurrence reaches across a document start.
    """
    batch, seq_len = hidden_states.shape[:2]
    head_shape = (batch, seq_len, -1, attn.head_dim)
    mixed = torch.cat(
        [attn.q_proj(hidden_states), attn.k_proj(hidden_states), attn.v_proj(hidden_states)], dim=-1
    ).transpose(1, 2)
    weight = attn.conv1d.weight  # (3·H·dk, 1, K), depthwise causal
    width = weight.shape[-1] - 1
    mixed = mixed.to(weight.dtype)
    # Causal: the K−1 inputs before the segment (zeros at the sequence start) are prepended, no padding after.
    tail = mixed.new_zeros(batch, mixed.shape[1], width) if state is None else state.conv_tail.to(mixed.dtype)
    padded = torch.cat([tail, mixed], dim=-1)
    mixed = ACT2FN[attn.activation](causal_conv(padded, weight, documents))
    query, key, value = mixed.transpose(1, 2).to(hidden_states.dtype).split([attn.qkv_dim] * 3, dim=-1)
    query, key, value = (x.reshape(head_shape) for x in (query, key, value))
    decay = attn.forget_gate(hidden_states)
    beta = torch.sigmoid(attn.b_proj(hidden_states))
    out, recurrent = chunk_kda(query, key, value, decay, beta, chunk_size=chunk_size,
                               initial_state=None if state is None else state.recurrent, output_final_state=return_state,
                               documents=documents)
    gate = attn.g_proj(hidden_states).reshape(head_shape)
    out = attn.o_proj(attn.o_norm(out, gate).reshape(batch, seq_len, -1))
    if not return_state:
        return out
    return out, KDAState(padded[..., padded.shape[-1] - width :], recurrent)


def causal_conv(padded: torch.Tensor, weight: torch.Tensor, documents: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal convolution of ``padded`` ``[B, C, K−1+T]`` (the K−1 earlier inputs, then the segment's) with
    ``weight`` ``[C, 1, K]``. With `documents` an output sums only the inputs of its own document, as the convolution
    of each document alone (zeros before its start) would; the K−1 earlier inputs belong to the first document."""
    if documents is None:
        return F.conv1d(padded, weight, groups=padded.shape[1])
    width = weight.shape[-1] - 1
    owners = torch.cat([documents[:, :1].expand(-1, width), documents], dim=1)
    own = (owners.unfold(-1, width + 1, 1) == documents[..., None]).to(padded.dtype)  # (B, T, K)
    taps = padded.unfold(-1, width + 1, 1)  # (B, C, T, K): inputs t−K+1 … t
    return torch.einsum("bctk,btk,ck->bct", taps, own, weight[:, 0])


def document_index(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """``[B, T]`` index of the document every position belongs to in packed rows, or None when no row holds more
    than one. A document starts wherever a position id does not follow the one before by 1 (position ids restart at
    each document): transformers' packed-sequence convention, which its attention masks and flash-attention follow."""
    if position_ids is None:
        return None
    from transformers.masking_utils import find_packed_sequence_indices

    return find_packed_sequence_indices(position_ids)


def document_causal_mask(documents: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, T]`` booleans: query t sees key s ≤ t of its own document only."""
    length = documents.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=documents.device).tril()
    return (causal & (documents[:, :, None] == documents[:, None, :]))[:, None]


class LatentPast:
    """The MLA layer's cache for one segment: the latents (normed ``c_kv`` and the shared RoPE key) of every earlier
    position. `update` is the call the stock attention makes on a cache; it returns the concatenation and keeps the
    old tensors untouched, so one prefix can be continued by several segments."""

    def __init__(self, kv_nope: torch.Tensor | None = None, k_rot: torch.Tensor | None = None):
        self.kv_nope, self.k_rot = kv_nope, k_rot

    def update(self, kv_nope: torch.Tensor, k_rot: torch.Tensor, layer_idx: int):
        if self.kv_nope is not None:
            kv_nope, k_rot = torch.cat([self.kv_nope, kv_nope], dim=-2), torch.cat([self.k_rot, k_rot], dim=-2)
        self.kv_nope, self.k_rot = kv_nope, k_rot
        return kv_nope, k_rot


def mixer_forward(layer, hidden_states: torch.Tensor, position_embeddings, chunk_size: int = 16,
                  documents: torch.Tensor | None = None) -> torch.Tensor:
    """The token mixer of one decoder layer of an upgraded model on already-normalised inputs (causal, no cache);
    `documents` (`document_index`) keeps packed documents apart."""
    if getattr(layer, "block_type", None) == "linear_attention":  # all-MLA targets have no block types
        return kda_mixer_forward(layer.self_attn, hidden_states, chunk_size, documents=documents)
    # MLA: the stock module; attention_mask=None lets SDPA apply the causal mask itself.
    mask = None if documents is None else document_causal_mask(documents)
    return layer.self_attn(hidden_states, position_embeddings=position_embeddings, attention_mask=mask)[0]


def position_embeddings(model, hidden_states: torch.Tensor, offset: int = 0, position_ids: torch.Tensor | None = None):
    """RoPE (cos, sin) of a segment after `offset` positions, or at the given (packed: restarting) `position_ids`."""
    if position_ids is None:
        position_ids = torch.arange(offset, offset + hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
    return model.model.rotary_emb(hidden_states, position_ids)


def student_hidden(model, input_ids: torch.Tensor, chunk_size: int = 16,
                   position_ids: torch.Tensor | None = None, checkpoint: bool = False) -> torch.Tensor:
    """Final (normed) hidden states of an upgraded model (no cache) through the fast KDA path.

    Causal everywhere, so right-padding a batch leaves every real position exact without a mask. Packed rows
    (`position_ids` restarting at every document) give every document the result it gets alone.
    """
    return student_extend(model, input_ids, None, chunk_size, position_ids, checkpoint)[0]


@dataclass(frozen=True)
class StudentState:
    """An upgraded model after `length` tokens: per layer a `KDAState` or the MLA latents. Immutable, so one prefix
    state can be continued by several segments (recall questions asked of the same haystack)."""

    length: int
    layers: tuple


class FastLayer(torch.nn.Module):
    """One decoder layer of an upgraded model on the fast path, as a module of its own (the stock layer is its child).

    The fast path calls a layer's parts (norms, mixer internals, MLP), not its `forward`; a sharding engine gathers a
    module's parameters around its forward, so under FSDP2 and ZeRO-3 the training loop shards these modules
    (`training.shard_for_training`, `zero3.wrap`), and every use — `mixer` too — goes through `forward`: the whole
    layer is at hand while it computes."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden, rope, mla_mask, documents, chunk_size: int, previous=None, mixer_only: bool = False):
        """(hidden states after the layer, its state at the segment's end: a `KDAState` or the MLA latents); with
        `mixer_only`, `mixer_forward` of the layer on already-normalised `hidden`."""
        layer = self.layer
        if mixer_only:
            return mixer_forward(layer, hidden, rope, chunk_size, documents)
        normed = layer.input_layernorm(hidden)
        if getattr(layer, "block_type", None) == "linear_attention":
            mixed, carried = kda_mixer_forward(layer.self_attn, normed, chunk_size, previous, return_state=True,
                                               documents=documents)
        else:
            past = LatentPast(*(previous or (None, None)))
            mixed = layer.self_attn(normed, position_embeddings=rope, attention_mask=mla_mask, past_key_values=past)[0]
            carried = (past.kv_nope, past.k_rot)
        hidden = hidden + mixed
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden)), carried

    def mixer(self, hidden_states, rope, chunk_size: int = 16, documents=None):
        """`mixer_forward` of this layer (attention transfer trains the mixers alone)."""
        return self(hidden_states, rope, None, documents, chunk_size, mixer_only=True)


# A model being trained by a sharding engine → its sharded `FastLayer`s (one per decoder layer); other models get
# plain ones made on the fly (a module wrapping a module: nothing is copied).
_SHARDED_LAYERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def set_fast_layers(model, layers) -> None:
    """Make `layers` (an engine's sharded `FastLayer`s) the ones the fast path runs for `model`; None: plain again."""
    if layers is None:
        _SHARDED_LAYERS.pop(model, None)
    else:
        _SHARDED_LAYERS[model] = layers


def fast_layers(model) -> list[FastLayer]:
    """The model's decoder layers as `FastLayer`s: the engine's sharded ones while it trains the model."""
    sharded = _SHARDED_LAYERS.get(model)
    return list(sharded) if sharded is not None else [FastLayer(layer) for layer in model.model.layers]


def student_extend(model, input_ids: torch.Tensor, state: StudentState | None = None, chunk_size: int = 16,
                   position_ids: torch.Tensor | None = None, checkpoint: bool = False):
    """(final normed hidden states of the segment, the state after it): `input_ids` continue the tokens `state`
    summarises, exactly as if the whole sequence were run at once (one sequence, no padding). `position_ids` (no
    `state`) may restart at document starts: packed documents are then kept apart in every layer (`document_index`),
    and the state returned is not one to continue. `checkpoint`: activation checkpointing, each layer recomputed in
    the backward pass (same result, less memory)."""
    inner = model.model
    offset = 0 if state is None else state.length
    if position_ids is not None and state is not None:
        raise ValueError("student_extend: position_ids are for packed rows from the start, not for continuing a state")
    documents = document_index(position_ids)
    hidden = inner.embed_tokens(input_ids)
    rope = position_embeddings(model, hidden, offset, position_ids)
    # One mask serves every MLA layer.
    mla_mask = _causal_after(offset, hidden) if documents is None else document_causal_mask(documents)
    recompute = checkpoint and torch.is_grad_enabled()
    layers = []
    for index, layer in enumerate(fast_layers(model)):
        previous = None if state is None else state.layers[index]
        if recompute:
            hidden, carried = torch.utils.checkpoint.checkpoint(layer, hidden, rope, mla_mask, documents, chunk_size,
                                                                previous, use_reentrant=False)
        else:
            hidden, carried = layer(hidden, rope, mla_mask, documents, chunk_size, previous)
        layers.append(carried)
    return inner.norm(hidden), StudentState(offset + input_ids.shape[1], tuple(layers))


def _causal_after(offset: int, hidden: torch.Tensor) -> torch.Tensor | None:
    """The boolean mask of a segment after `offset` cached positions; None at the start, where SDPA's own causal
    mask is exact and skips the masked blocks."""
    if offset == 0:
        return None
    return lower_right_causal_mask(offset, hidden.shape[1], hidden.device)[None, None]


def lower_right_causal_mask(past: int, length: int, device) -> torch.Tensor:
    """(length, past + length) booleans: query t of a segment after `past` cached positions sees keys ≤ past + t."""
    keys = torch.arange(past + length, device=device)
    return keys[None, :] <= torch.arange(past, past + length, device=device)[:, None]


def student_logits(model, input_ids: torch.Tensor, chunk_size: int = 16,
                   position_ids: torch.Tensor | None = None, checkpoint: bool = False) -> torch.Tensor:
    """Full forward of an upgraded model (no padding, no cache) through the fast KDA path; packed rows with
    `position_ids` restarting at every document, activation checkpointing (see `student_extend`)."""
    return model.lm_head(student_hidden(model, input_ids, chunk_size, position_ids, checkpoint))
