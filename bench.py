"""
Speed of the WKV7 implementations, measured by a script rather than by tests.

    python bench.py                 # the GPU table on a CUDA machine, the CPU comparison otherwise
    python bench.py --device=cpu    # chunked PyTorch WKV vs the sequential loop at B=2, T=1024, C=256

Every timing is the median of several runs after a warm-up; results go into the README with device and date.
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from model import wkv7_chunked, wkv7_sequential


def random_inputs(B, T, C, N=64, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    H = C // N
    rnd = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.float32)  # noqa: E731
    kk = F.normalize(rnd(B, T, H, N), dim=-1)
    x = [rnd(B, T, H, N), rnd(B, T, H, N) * 3, rnd(B, T, H, N), rnd(B, T, H, N), -kk, kk * torch.sigmoid(rnd(B, T, H, N))]
    return [t.to(dtype) for t in x] + [rnd(B, H, N, N)]


def time_cpu(fn, inputs, backward, repeats=5):
    times = []
    for _ in range(repeats + 1):  # the first run is a warm-up
        xs = [t.clone().requires_grad_(backward) for t in inputs]
        t0 = time.perf_counter()
        y, s = fn(*xs)
        if backward:
            (y.sum() + s.sum()).backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1000


def bench_cpu(B=2, T=1024, C=256):
    torch.manual_seed(0)
    x = random_inputs(B, T, C)
    print(f"CPU WKV7, B={B} T={T} C={C} head 64, fp32, {torch.get_num_threads()} threads, median ms")
    print(f"{'implementation':<28}{'fwd':>10}{'fwd+bwd':>10}")
    rows = {}
    for name, fn in [("chunked (wkv7_chunked)", wkv7_chunked), ("sequential (wkv7_sequential)", wkv7_sequential)]:
        rows[name] = (time_cpu(fn, x, False), time_cpu(fn, x, True, repeats=3))
        print(f"{name:<28}{rows[name][0]:>10.1f}{rows[name][1]:>10.1f}")
    (cf, cb), (sf, sb) = rows.values()
    print(f"speed-up of the chunked form: {sf / cf:.1f}x forward, {sb / cb:.1f}x forward+backward")


if __name__ == "__main__":
    device = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--device=")), None)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        bench_cpu()
    else:
        raise SystemExit("the GPU benchmark arrives with the CUDA kernel (wkv7.cu)")
