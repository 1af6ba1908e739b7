#!/usr/bin/env python3
"""PyTorch's CPU figures for the engine's reference convolution, to set beside
`dotnet run -c Release --project benchmarks -- --filter '*ConvBenchmarks*'`:
3x3, N=32, 64->64 channels, 28x28, pad 1; forward, input gradient and weight gradient.

    /usr/bin/python3 scripts/torch_conv_bench.py [--threads 2] [--reps 20]

Prints one JSON line: milliseconds (median) and GFLOP/s for each, FLOPs = 2*N*K*C*9*H*W.
"""
import argparse, json, statistics, time

import torch
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, default=2)
p.add_argument("--reps", type=int, default=20)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
N, C, K, H, W = 32, 64, 64, 28, 28
flops = 2.0 * N * K * C * 9 * H * W
x = torch.randn(N, C, H, W)
w = torch.randn(K, C, 3, 3)
b = torch.randn(K)
dy = torch.randn(N, K, H, W)


def timed(fn):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


with torch.no_grad():
    fwd = timed(lambda: F.conv2d(x, w, b, padding=1))
    bi = timed(lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, padding=1))
    bw = timed(lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=1))
print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                  **{k: {"ms": round(v * 1e3, 2), "gflops": round(flops / v / 1e9, 1)}
                     for k, v in [("forward", fwd), ("backward_input", bi), ("backward_weight", bw)]}}))
