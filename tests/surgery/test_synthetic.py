"""Copy windows: a span occurs twice, the rest is the window's own text, and the mix is seeded by window index."""

import torch

from ling_surgery.surgery.synthetic import MIN_SPAN, copy_window, mix_copy_windows


def _repeated_span(window: torch.Tensor, original: torch.Tensor) -> tuple[int, int, int]:
    """(first, second, length) of the span written twice: the changed positions are the second copy (and the first,
    for a random span); the second copy equals the `length` tokens at `first`."""
    changed = (window != original).nonzero().flatten().tolist()
    assert changed, "nothing was copied"
    second_end = changed[-1] + 1
    for length in range(len(window) // 4, MIN_SPAN - 1, -1):
        second = second_end - length
        for first in range(0, second - length + 1):
            if torch.equal(window[first : first + length], window[second:second_end]):
                return first, second, length
    raise AssertionError("no repeated span")


def test_a_copy_window_writes_one_span_twice():
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(1000, 2000, (5000,), generator=g)
    kinds = set()
    for seed in range(40):
        window = torch.arange(256)  # distinct tokens: any repeat is the copy
        out = copy_window(window, stream, seed)
        first, second, length = _repeated_span(out, window)
        assert MIN_SPAN <= length <= 64 and second >= first + length
        outside = torch.ones(256, dtype=torch.bool)
        outside[first : first + length] = outside[second : second + length] = False
        assert torch.equal(out[outside], window[outside])  # the rest of the window is untouched
        kinds.add("random" if (out[first : first + length] >= 1000).all() else "text")
        assert torch.equal(copy_window(window, stream, seed), out)  # seeded
    assert kinds == {"random", "text"}
    assert torch.equal(copy_window(torch.arange(16), stream, 0), torch.arange(16))  # too short to hold two spans


def test_the_mix_is_a_share_of_windows_chosen_by_index():
    stream = torch.randint(1000, 2000, (5000,))
    batch = torch.arange(64 * 256).view(64, 256)
    mixed = mix_copy_windows(batch, 0.25, stream, first_index=100)
    changed = [i for i in range(64) if not torch.equal(mixed[i], batch[i])]
    assert 6 <= len(changed) <= 26
    # The same window index gives the same window wherever it falls in a batch (a resumed stage sees the same data).
    again = mix_copy_windows(batch[10:20], 0.25, stream, first_index=110)
    assert torch.equal(again, mixed[10:20])
    assert torch.equal(mix_copy_windows(batch, 0.0, stream, 0), batch)


def test_a_copy_window_is_one_document_and_plain_windows_keep_their_document_ends():
    END, BREAK = 0, 1
    stream = torch.randint(1000, 2000, (5000,))
    window = torch.arange(2, 258)
    window[::50] = END  # a document ends every 50 tokens
    out = copy_window(window, stream, seed=3, joins=(END, BREAK))
    assert (out != END).all() and (out == BREAK).any()
    assert torch.equal(copy_window(window, stream, seed=3, joins=None)[out != BREAK], out[out != BREAK])
    batch = window.repeat(8, 1)
    mixed = mix_copy_windows(batch, 0.5, stream, first_index=0, joins=(END, BREAK))
    for row in range(8):
        copied = not torch.equal(mixed[row], batch[row])
        assert (mixed[row] == END).any() != copied  # only copy windows lose their document ends
