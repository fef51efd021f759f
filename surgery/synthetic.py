"""Training windows that exercise copying, mixed into the distillation stages (`recall_mix`).

Wikipedia leads rarely repeat themselves, so a student distilled on them never has to find an earlier token to get
its next-token distribution right — and the one ability a hybrid's MLA layers exist for goes untrained (measured:
the upgraded default found 0% of passkeys). A copy window is a training window in which a span occurs twice, so the
teacher's second occurrence is predicted by copying (induction heads), and distillation asks the student to do the
same:

- **text span**: a span of the window's own prose, written again later in the window;
- **random span**: a span of tokens drawn at random from elsewhere in the training stream (ordinary tokens, no
  meaning to predict them by), placed in the prose and written again later.

Spans are 8 tokens to a quarter of the window, the second copy starts anywhere after the first, and nothing here
uses an evaluation's prompts, filler or number formats. A copy window is one document: the document ends inside it
become a paragraph break, since across a document end a teacher rightly expects unrelated text and would not copy
(measured on the CPU demo, passkey hits after distillation at 512/2k/4k: 3/6, 0/6, 0/6 with the ends kept, 6/6, 2/6,
0/6 without). Each window's randomness is seeded by its index, so a resumed stage sees the same windows.
"""

from __future__ import annotations

import torch

MIN_SPAN = 8


def copy_window(window: torch.Tensor, stream, seed: int,
                joins: tuple[int, int] | None = None) -> torch.Tensor:
    """`window` (T,) with a span written twice (see the module doc); T ≥ 4·MIN_SPAN, else unchanged. `stream`: where
    random spans come from, a token tensor or a `data.TokenStream` (both index by a tensor of positions). `joins`:
    (document-end token, paragraph-break token), the first replaced by the second so the window is one document."""
    length = len(window)
    if length < 4 * MIN_SPAN:
        return window
    g = torch.Generator().manual_seed(seed)

    def randint(low: int, high: int) -> int:  # inclusive bounds
        return int(torch.randint(low, high + 1, (1,), generator=g))

    span = randint(MIN_SPAN, length // 4)
    first = randint(0, length - 2 * span)
    second = randint(first + span, length - span)
    out = window.clone()
    if randint(0, 1):  # random span: tokens from anywhere in the stream, in random order
        picks = torch.randint(0, len(stream), (span,), generator=g)
        out[first : first + span] = stream[picks]
    out[second : second + span] = out[first : first + span]
    if joins is not None:
        out[out == joins[0]] = joins[1]
    return out


def copy_rows(rows: int, share: float, first_index: int) -> torch.Tensor:
    """Which rows of a batch become copy windows: about `share` of them, window i chosen by a generator seeded with
    `first_index + i`, its index in the stage's window sequence."""
    def chosen(index: int) -> bool:
        return share > 0 and torch.rand(1, generator=torch.Generator().manual_seed(2 * index)).item() < share

    return torch.tensor([chosen(first_index + row) for row in range(rows)], dtype=torch.bool)


def mix_copy_windows(batch: torch.Tensor, share: float, stream, first_index: int,
                     joins: tuple[int, int] | None = None) -> torch.Tensor:
    """The batch with the `copy_rows` turned into copy windows, each built by a generator seeded with its index."""
    out = batch.clone()
    for row in copy_rows(len(batch), share, first_index).nonzero().flatten().tolist():
        out[row] = copy_window(batch[row], stream, seed=2 * (first_index + row) + 1, joins=joins)
    return out
