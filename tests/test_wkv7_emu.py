"""wkv7.cu's and wkv7_hip.cpp's kernels on the CPU, against the float64 loop: y, state_out and all seven gradients.

tests/wkv7_emu.h stands in for CUDA and HIP (each thread a std::thread, __syncthreads a barrier, wmma tiles multiplied
in tf32 precision), so the kernel source itself is checked on machines without a GPU, including CI: indexing, padding,
split heads and the chunk algebra. It says nothing of speed or of GPU-only faults (shared-memory size, registers,
alignment): tests/test_wkv7_gpu.py on a GPU covers those. Errors as there: max|x - ref| / max|ref| <= 4e-3.
"""
import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from helpers import assert_matches_reference, wkv7_inputs

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 4e-3
BF16_NAN = 0x7FC0


@pytest.fixture(scope="module", params=[("wkv7.cu", 64, ""), ("wkv7.cu", 128, ""), ("wkv7_hip.cpp", 64, ""),
                                        ("wkv7.cu", 64, "-DWKV7_BWD_L=32")],
                ids=["wkv7.cu", "wkv7.cu-N128", "wkv7_hip.cpp", "wkv7.cu-BWD_L32"])
def lib(request, tmp_path_factory):
    """The kernel file built for the CPU, for head size N. wkv7_hip.cpp (8-step chunks, fp32 loops, 16 rows per
    backward block) has no AMD GPU to run on here, so this is where its logic is checked. Head size 128 runs here with
    64 rows per block too, which the GPU host code never picks (not enough shared memory): same logic, more cases.
    BWD_L32: the backward in 32-step chunks over a forward in 16-step chunks that saves every second state."""
    name, N, flags = request.param
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        pytest.fail("no C++ compiler (g++, C++20) to build tests/wkv7_emu.cpp; set CXX")
    out = str(tmp_path_factory.mktemp("emu") / "libwkv7emu.so")
    src = os.path.join(HERE, "..", name)
    subprocess.run([cxx, "-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-w", f'-DWKV7_SRC="{src}"',
                    f"-D_N_={N}", *flags.split(), *os.environ.get("WKV7_EMU_CFLAGS", "").split(),
                    os.path.join(HERE, "wkv7_emu.cpp"), "-o", out], check=True)
    emu = ctypes.CDLL(out)
    emu.hip, emu.N = name.endswith("hip.cpp"), N
    return emu


def run_kernels(lib, xs, s0, dy, dsT, nv):
    """The forward and backward kernels on the emulator; every output starts as NaN. The HIP backward always
    takes 16 rows per block, as its host code does."""
    B, T, H, N = xs[0].shape
    L, nv_bwd = lib.emu_chunk_len(), 16 if lib.hip else nv
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    u16 = lambda x: np.ascontiguousarray(x.view(torch.int16).numpy())  # noqa: E731
    ins = [u16(x) for x in xs]
    y = np.full((B, T, H, N), BF16_NAN, np.int16)
    sT, ds0 = np.full((B, H, N, N), np.nan, np.float32), np.full((B, H, N, N), np.nan, np.float32)
    ckpt = np.full((B, H, (T + L - 1) // L + 1, N, N), np.nan, np.float32)  # (room for a final state too)
    lib.emu_forward(B, T, H, nv, *map(ptr, ins), ptr(s0.numpy().copy()), ptr(y), ptr(sT), ptr(ckpt))
    grads = np.full((6, B, T, H, N), BF16_NAN, np.int16)
    gacc = np.zeros((5, B * T * H * N), np.float32)  # key-side sums when a head is split (nv < N)
    lib.emu_backward(B, T, H, nv_bwd, *map(ptr, ins), ptr(ckpt), ptr(u16(dy)), ptr(dsT.numpy().copy()), ptr(grads),
                     ptr(ds0), ptr(gacc))
    bf = lambda a: torch.from_numpy(np.ascontiguousarray(a)).view(torch.bfloat16).float()  # noqa: E731
    gr = [bf(grads[i]) for i in range(6)]
    if nv_bwd < N:  # as the host code does: dr, dw, dk, da, db from the fp32 sums
        for i, j in enumerate([0, 1, 2, 4, 5]):
            gr[j] = torch.from_numpy(gacc[i].reshape(B, T, H, N)).bfloat16().float()
    return bf(y), torch.from_numpy(sT), gr + [torch.from_numpy(ds0)]


@pytest.mark.parametrize("T,B,H,nv,w_range,with_state", [
    (16, 1, 2, 64, (-8.0, 8.0), True),   # one whole chunk
    (37, 1, 2, 64, (-8.0, 8.0), True),   # the last chunk padded
    (3, 1, 1, 64, (-8.0, 8.0), False),   # shorter than a chunk, no initial state
    (100, 2, 1, 32, (-8.0, 8.0), True),  # heads split over 2 blocks (key-side gradients summed)
    (37, 1, 1, 16, (-8.0, 8.0), True),   # over 4 blocks
    (50, 1, 1, 64, (-8.0, -7.0), True),  # decay next to 1
    (50, 1, 1, 64, (7.0, 8.0), True),    # decay next to its floor
])
def test_kernels_match_float64(lib, T, B, H, nv, w_range, with_state):
    N = lib.N
    xs, s0 = wkv7_inputs(B, T, H, N, w_range, seed=T)
    s0 = s0 * with_state
    g = torch.Generator().manual_seed(T + 1)
    dy, dsT = torch.randn(B, T, H, N, generator=g).bfloat16(), torch.randn(B, H, N, N, generator=g)
    y, sT, grads = run_kernels(lib, xs, s0, dy, dsT, nv)
    assert_matches_reference(y, sT, grads, xs, s0, dy, dsT, TOL)
