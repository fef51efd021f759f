"""Side-by-side speed of KDA forward+backward: transformers' reference chunked fallback vs ling-surgery's chunk_kda.

    python benchmarks/bench_kda.py [--heads 9 --head-dim 64 --batch 4 --seq 256]

Prints tokens/s for each and their ratio, measured in one run on this machine (defaults: the SmolLM2-135M shape).
"""

import argparse
import time

import torch
from transformers.models.bailing_hybrid import modeling_bailing_hybrid as ref

from ling_surgery.surgery.kda import chunk_kda


def bench(fn, inputs, repeats):
    fn(*inputs)[0].sum().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*inputs)[0].sum().backward()
    return repeats / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = (args.batch, args.seq, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    g = (-5 * torch.sigmoid(torch.randn(shape) - 4)).requires_grad_()
    beta = torch.rand(shape[:3]).requires_grad_()
    tokens = args.batch * args.seq
    rows = []
    reference = bench(lambda *x: ref.chunk_kimi_delta_attention(*x, chunk_size=64, use_qk_l2norm_in_kernel=True), (q, k, v, g, beta), 1)
    rows.append(("transformers reference, chunk 64", reference * tokens))
    reference16 = bench(lambda *x: ref.chunk_kimi_delta_attention(*x, chunk_size=16, use_qk_l2norm_in_kernel=True), (q, k, v, g, beta), 1)
    rows.append(("transformers reference, chunk 16", reference16 * tokens))
    for chunk in (16, 32):
        rows.append((f"ling-surgery chunk_kda, chunk {chunk}", bench(lambda *x: chunk_kda(*x, chunk_size=chunk), (q, k, v, g, beta), args.repeats) * tokens))
    base = rows[1][1]
    print(f"KDA forward+backward, one layer, B={args.batch} T={args.seq} H={args.heads} dk={args.head_dim}, {torch.get_num_threads()} threads")
    for name, speed in rows:
        print(f"  {name:36s} {speed:10,.0f} tokens/s   {speed / base:5.1f}x vs reference chunk 16")


if __name__ == "__main__":
    main()
