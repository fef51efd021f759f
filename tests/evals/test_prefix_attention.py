"""The split past/new attention equals masked SDPA, and anything it is not exact for goes to SDPA unchanged."""

import pytest
import torch
import torch.nn.functional as F

from ling_surgery.evals import prefix_attention


class Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 3


def _lower_right(q_len, kv_len):
    return (torch.arange(kv_len)[None, :] <= torch.arange(kv_len - q_len, kv_len)[:, None])[None, None]


@pytest.mark.parametrize("q_len, past", [(5, 11), (16, 1), (2, 40)])
def test_split_attention_equals_masked_sdpa_with_grouped_heads(q_len, past, monkeypatch):
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 6, q_len, 8), torch.randn(1, 2, past + q_len, 8), torch.randn(1, 2, past + q_len, 8)
    mask = _lower_right(q_len, past + q_len)
    expected = F.scaled_dot_product_attention(query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1),
                                              attn_mask=mask, scale=0.3).transpose(1, 2)
    calls = []
    split = prefix_attention.split_attention
    monkeypatch.setattr(prefix_attention, "split_attention", lambda *a: calls.append(a[3]) or split(*a))
    out, _ = prefix_attention.prefix_sdpa_forward(Module(), query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert calls == [past]  # the split ran, not SDPA with the mask


def test_masks_it_is_not_exact_for_go_to_sdpa(monkeypatch):
    assert prefix_attention._lower_right_causal(_lower_right(4, 10), 4, 10)
    padded = _lower_right(4, 10).clone()
    padded[..., 0] = False  # a left-padded prompt
    assert not prefix_attention._lower_right_causal(padded, 4, 10)
    assert not prefix_attention._lower_right_causal(None, 4, 10)
    monkeypatch.setattr(prefix_attention, "split_attention", None)  # must not be reached
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 6, 4, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    out, _ = prefix_attention.prefix_sdpa_forward(Module(), query, key, value, padded, scaling=0.3)
    expected = F.scaled_dot_product_attention(query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1),
                                              attn_mask=padded, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
