"""
RWKV-7 "Goose" (x070) in one file, following the authors' reference implementation
(BlinkDL/RWKV-LM, RWKV-v7/train_temp/src/model.py) and their inference code (the `rwkv` pip package).

Contents, in the order they run:
  1. RWKVConfig                      sizes; LoRA ranks default to the authors' current formula
  2. WKV7                            the recurrence: sequential reference, chunked PyTorch form, GPU kernel hook
  3. TimeMix, ChannelMix, Block      one RWKV-7 layer (parameter names are the official ones)
  4. RWKV                            the model: forward with state, init, optimizer groups, official .pth I/O
  5. L2Wrap                          the authors' gradient-only logit penalty

A note on state. Each layer carries (att_shift [B, C], wkv [B, H, N, N] fp32, ffn_shift [B, C]): the previous
token's ln1 output, the WKV state in the authors' [value, key] layout, and the previous token's ln2 output.
`model(idx, state=s)` continues a sequence from `s` and returns the new state, so a text processed in two pieces
gives the same logits as the text processed at once, and decoding is `model(next_token[:, None], state=s)`.
"""

import inspect
import json
import math
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. Config


def lora_dim(scale, n_embd):
    # The authors' rule since 2025-07 (train_temp): max(32, round(scale * sqrt(C) / 32) * 32).
    # Python's round() is banker's rounding; that is what they use too.
    return max(32, int(round(scale * math.sqrt(n_embd) / 32) * 32))


@dataclass
class RWKVConfig:
    n_layer: int = 12
    n_embd: int = 768
    vocab_size: int = 65536
    head_size: int = 64
    dim_w: int = 0  # LoRA rank of the decay; 0 = lora_dim(2.5, C)
    dim_a: int = 0  # LoRA rank of the in-context learning rate a; 0 = lora_dim(2.5, C)
    dim_v: int = 0  # LoRA rank of the value-residual gate; 0 = lora_dim(1.7, C)
    dim_g: int = 0  # LoRA rank of the output gate; 0 = lora_dim(5, C)
    dim_att: int = 0  # width of r/k/v and the WKV heads; 0 = n_embd (differs only in hybrids, e.g. Qwen3)
    att_bias: bool = False  # biases on r/k/v (hybrids copying a Qwen2 teacher's q/k/v biases)
    wkv_impl: str = "auto"  # 'auto' (GPU kernel on CUDA/ROCm, PyTorch elsewhere), 'kernel' or 'torch'
    dropout: float = 0.0  # on both residual branches of every block while training (the authors' recipe has none)

    def __post_init__(self):
        self.dim_att = self.dim_att or self.n_embd
        if self.dim_att % self.head_size:
            raise ValueError(f"dim_att={self.dim_att} is not a multiple of head_size={self.head_size}")
        if self.wkv_impl not in ("auto", "kernel", "torch"):
            raise ValueError(f"wkv_impl must be 'auto', 'kernel' or 'torch', got {self.wkv_impl!r}")
        self.dim_w = self.dim_w or lora_dim(2.5, self.n_embd)
        self.dim_a = self.dim_a or lora_dim(2.5, self.n_embd)
        self.dim_v = self.dim_v or lora_dim(1.7, self.n_embd)
        self.dim_g = self.dim_g or lora_dim(5, self.n_embd)

    @property
    def n_head(self):
        return self.dim_att // self.head_size


# -----------------------------------------------------------------------------
# 2. WKV7: the recurrence, per batch b and head h, with state S [value i, key j]:
#
#     sa_i   = sum_j a_j S[i, j]                        (uses the old state)
#     S[i,j] = S[i, j] * decay_j + sa_i * b_j + v_i * k_j
#     y_i    = sum_j S[i, j] * r_j                      (after the update, no 1/sqrt(N) scale)
#
# with decay = exp(-exp(-0.5) * sigmoid(w)): `w` is the raw decay (w0 + tanh(xw @ w1) @ w2), and the -0.5
# soft-clamps decay into (0.545, 1), which the authors' backstepping kernel relies on. Decay is always fp32.
# All functions take (B, T, H, N) tensors and an optional fp32 state (B, H, N, N), and return (y, state_out).

LOG_DECAY_SCALE = -math.exp(-0.5)  # log(decay) = LOG_DECAY_SCALE * sigmoid(w), in (-0.6065, 0)


def wkv7_sequential(r, w, k, v, a, b, state=None):
    """Reference: one step at a time, computed in fp32 (or fp64 if the inputs are fp64). Slow but obvious."""
    B, T, H, N = r.shape
    dtype = torch.promote_types(r.dtype, torch.float32)
    r, w, k, v, a, b = (x.to(dtype) for x in (r, w, k, v, a, b))
    decay = torch.exp(LOG_DECAY_SCALE * torch.sigmoid(w))
    S = r.new_zeros(B, H, N, N) if state is None else state.to(dtype)
    ys = []
    for t in range(T):
        sa = S @ a[:, t, :, :, None]  # (B, H, N, 1)
        S = S * decay[:, t, :, None, :] + sa @ b[:, t, :, None, :] + v[:, t, :, :, None] @ k[:, t, :, None, :]
        ys.append((S @ r[:, t, :, :, None]).squeeze(-1))
    return torch.stack(ys, dim=1), S


def wkv7_chunked(r, w, k, v, a, b, state=None, chunk_len=32):
    """The same recurrence in chunks: matrix products inside a chunk, the exact fp32 state between chunks.

    Inside a chunk, write G_t for the cumulative decay (prod of decay_1..decay_t) and sa_t = S_{t-1} a_t. Then
        S_t  = S_0 G_t + sum_{s<=t} (sa_s b_s^T + v_s k_s^T) diag(G_t / G_s)
        sa_t = S_0 (a_t G_{t-1}) + sum_{s<t} [sa_s (b_s/G_s . a_t G_{t-1}) + v_s (k_s/G_s . a_t G_{t-1})]
    The sa_t of a whole chunk solve one unit-lower-triangular system, shared by all value rows, so each chunk
    reduces to  S <- S @ transition + injection  and  y = Q @ S^T + y_intra  (all terms built with batched
    matmuls). Ratios G_t/G_s are formed as products of exp(+-cumulative log decay); with chunk_len 32 these stay
    within e^(+-19.4), far from fp32 overflow (measured error vs float64: < 1e-6 for any decay). Differentiable end to end (gradients reach `state` too).
    """
    B, T, H, N = r.shape
    L = chunk_len
    dtype = torch.promote_types(r.dtype, torch.float32)
    n_chunks = -(-T // L)
    pad = n_chunks * L - T

    def to_chunks(x):  # (B, T, H, N) -> (n_chunks, B*H, L, N), contiguous; padded steps are zeros
        x = F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad)) if pad else x.to(dtype)
        return x.view(B, n_chunks, L, H, N).permute(1, 0, 3, 2, 4).reshape(n_chunks, B * H, L, N)

    # padded steps have log decay 0 (decay 1) and zero k, v, a, b, so they leave the state unchanged
    log_decay = to_chunks(LOG_DECAY_SCALE * torch.sigmoid(w.to(dtype)))
    r, k, v, a, b = (to_chunks(x) for x in (r, k, v, a, b))

    cum = log_decay.cumsum(dim=-2)  # log G_t, inclusive of step t
    cum_last = cum[..., -1:, :]  # log G_L
    inv_g = (-cum).exp()
    ar = torch.cat([a * (cum - log_decay).exp(), r * cum.exp()], dim=-2)  # rows: a_t G_{t-1}, then r_t G_t
    bk = torch.cat([b * inv_g, k * inv_g], dim=-2)  # rows: b_s / G_s, then k_s / G_s
    # one matmul gives all four pairings [[a.b, a.k], [r.b, r.k]]; a pairs with earlier steps only (s < t),
    # r with steps up to its own (s <= t)
    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    keep = torch.cat([strict.repeat(1, 2), strict.logical_not().T.repeat(1, 2)])
    M = (ar @ bk.mT).masked_fill_(~keep, 0)
    M_ab, M_ak, M_rb = M[..., :L, :L], M[..., :L, L:], M[..., L:, :L]  # and M_rk = M[..., L:, L:]

    # sa (as rows t) = (I - M_ab)^-1 (a_dec S^T + M_ak v) = W1 S^T + U
    eye = torch.eye(L, dtype=dtype, device=r.device)
    inv = torch.linalg.solve_triangular(eye - M_ab, eye.expand_as(M_ab), upper=False, unitriangular=True)
    W1_U = inv @ torch.cat([ar[..., :L, :], M_ak @ v], dim=-1)  # (nc, B*H, L, 2N): [W1 | U]
    W1, U = W1_U[..., :N], W1_U[..., N:]
    Q = ar[..., L:, :] + M_rb @ W1  # y = Q S^T + y_intra
    y_intra = M[..., L:, :] @ torch.cat([U, v], dim=-2)  # M_rb U + M_rk v
    end = (cum_last - cum).exp()  # G_L / G_s
    transition = torch.diag_embed(cum_last.exp().squeeze(-2)) + W1.mT @ (b * end)  # (nc, B*H, N, N)
    injection = torch.cat([U, v], dim=-2).mT @ torch.cat([b * end, k * end], dim=-2)  # (nc, B*H, N_val, N_key)

    S = r.new_zeros(B * H, N, N) if state is None else state.to(dtype).reshape(B * H, N, N)
    S_before = []
    for c in range(n_chunks):  # the only sequential part: one fused matmul-add per chunk
        S_before.append(S)
        S = torch.baddbmm(injection[c], S, transition[c])
    y = Q @ torch.stack(S_before).mT + y_intra  # (nc, B*H, L, N)
    y = y.view(n_chunks, B, H, L, N).permute(1, 0, 3, 2, 4).reshape(B, n_chunks * L, H, N)[:, :T]
    return y, S.view(B, H, N, N)


# === WKV7 GPU kernels (wkv7.cu, wkv7_hip.cpp) ===
# Compiled at first use by torch.utils.cpp_extension.load (ninja) into TORCH_EXTENSIONS_DIR, one build per head size
# (wkv7_n64, ...), which is also the namespace of its ops: torch.ops.wkv7_n64.forward / backward. WKV7_CFLAGS adds
# compiler flags (e.g. "-DWKV7_TF32X=3"; such a build gets a name of its own). WKV7_VERBOSE=1 shows the build. If
# the first call hangs while loading, an interrupted build left a file named 'lock' in that folder: delete it.
_WKV7_OPS = {}  # head size -> (forward op, backward op, chunk length)
WKV7_ROWS_PER_BLOCK = 0  # state rows per thread block: 16, 32 or 64; 0 = chosen from B*H (tests and bench set it)


@torch.compiler.disable  # file and build work: dynamo must not trace it (it broke the first compiled block's graph)
def _wkv7_build(N):
    import zlib
    from torch.utils import cpp_extension

    extra = os.environ.get("WKV7_CFLAGS", "").split()
    name = f"wkv7_n{N}" + (f"_{zlib.crc32(' '.join(extra).encode()):08x}" if extra else "")
    here = os.path.dirname(os.path.abspath(__file__))
    flags = [f"-D_N_={N}", f"-DWKV7_NS={name}", "-O3"]
    if torch.version.hip:  # the device compiler takes only .hip/.cu files: hand it wkv7_hip.cpp under a .hip name
        src = os.path.join(cpp_extension._get_build_directory(name, False), "wkv7_hip.hip")
        with open(os.path.join(here, "wkv7_hip.cpp"), "rb") as f:
            text = f.read()
        if not os.path.exists(src) or open(src, "rb").read() != text:  # rewrite only on change (ninja reads mtimes)
            with open(src, "wb") as f:
                f.write(text)
        flags += ["-ffast-math"]
    else:
        src = os.path.join(here, "wkv7.cu")
        flags += ["--use_fast_math", "-Xptxas=-O3"]
    cpp_extension.load(name=name, sources=[src], extra_cflags=["-O3"], extra_cuda_cflags=flags + extra,
                       is_python_module=False, verbose=os.environ.get("WKV7_VERBOSE") == "1")
    ops = getattr(torch.ops, name)
    for op in ("forward", "backward"):  # both ops only write into their (a!) outputs: nothing to compute when faked
        torch.library.register_fake(f"{name}::{op}")(lambda *args: None)
    return ops.forward.default, ops.backward.default, ops.chunk_len()


def kernel_has_head_size(N):
    return N == 64 or not torch.version.hip  # wkv7.cu: any multiple of 16 up to 128; wkv7_hip.cpp: 64 only


def wkv7_ops(N):
    """The head-size-N kernel ops, built at first use. compile_in_place builds them before tracing: a build met
    while tracing is a graph break, and torch 2.11 then failed (garbage view sizes) in the partial graph's outputs."""
    if not kernel_has_head_size(N):
        raise ValueError(f"the ROCm kernel (wkv7_hip.cpp) has head size 64 only, not {N}: use wkv_impl='torch'")
    if N not in _WKV7_OPS:
        _WKV7_OPS[N] = _wkv7_build(N)
    return _WKV7_OPS[N]


class _WKV7Kernel(torch.autograd.Function):
    """bf16 contiguous (B, T, H, N) inputs, fp32 contiguous state; saves the state at each chunk start for backward."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0):
        B, T, H, N = r.shape
        y, sT = torch.empty_like(r), torch.empty_like(s0)
        L = _WKV7_OPS[N][2]
        ckpt = s0.new_empty(B, H, (T + L - 1) // L + 1, N, N)  # each chunk's start state, then the final one
        _WKV7_OPS[N][0](r, w, k, v, a, b, s0, y, sT, ckpt, WKV7_ROWS_PER_BLOCK)
        ctx.save_for_backward(r, w, k, v, a, b, ckpt)
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, w, k, v, a, b, ckpt = ctx.saved_tensors
        B, T, H, N = r.shape
        dy = torch.zeros_like(r) if dy is None else dy.to(r.dtype).contiguous()
        dsT = ckpt.new_zeros(B, H, N, N) if dsT is None else dsT.float().contiguous()
        grads = [torch.empty_like(r) for _ in range(6)]
        ds0 = torch.empty_like(dsT)
        _WKV7_OPS[N][1](r, w, k, v, a, b, ckpt, dy, dsT, *grads, ds0, WKV7_ROWS_PER_BLOCK)
        return (*grads, ds0)


def runs_kernel(impl, on_gpu, N):
    """Whether wkv7() takes the GPU kernel: always for 'kernel', on the GPU at a kernel head size for 'auto'."""
    return impl == "kernel" or (impl == "auto" and on_gpu and kernel_has_head_size(N))


def wkv7_kernel(r, w, k, v, a, b, state=None):
    """wkv7() on the GPU kernels (wkv7.cu on CUDA, wkv7_hip.cpp on ROCm): inputs go in as bf16, y comes back in
    r's dtype, the state is fp32. Differentiable in all seven inputs."""
    B, T, H, N = r.shape
    wkv7_ops(N)
    s0 = r.new_zeros(B, H, N, N, dtype=torch.float32) if state is None else state.float().contiguous()
    if T == 0:
        return r.new_empty(r.shape), s0.clone()
    xs = [x.to(torch.bfloat16).contiguous() for x in (r, w, k, v, a, b)]
    y, sT = _WKV7Kernel.apply(*xs, s0)
    return y.to(r.dtype), sT
# === end WKV7 GPU kernels ===


def wkv7(r, w, k, v, a, b, state=None, impl="auto", part_len=0):
    """y, state_out = wkv7(r, w, k, v, a, b, state_in). Inputs (B, T, H, N); state fp32 (B, H, N, N) or None.
    Returns y in r's dtype and the final state in fp32 (fp64 for fp64 inputs).
    part_len > 0 (ctx_parts): run consecutive parts of at most part_len steps, the state carried from one to the
    next, so the kernel's scratch (saved chunk states, gradient buffers) is that of one part; exact, gradients too."""
    if 0 < part_len < r.shape[1]:
        ys = []
        for t in range(0, r.shape[1], part_len):
            y, state = wkv7(*(x[:, t:t + part_len] for x in (r, w, k, v, a, b)), state, impl)
            ys.append(y)
        return torch.cat(ys, dim=1), state
    if runs_kernel(impl, r.is_cuda, r.shape[-1]):
        return wkv7_kernel(r, w, k, v, a, b, state)
    if r.shape[1] == 1:  # one-token decoding step
        y, state = wkv7_sequential(r, w, k, v, a, b, state)
    else:
        y, state = wkv7_chunked(r, w, k, v, a, b, state)
    return y.to(r.dtype), state


# -----------------------------------------------------------------------------
# 3. One RWKV-7 layer


def last_token(x):
    """x[:, -1], the next shift state: a copy when T > 1 (a view would keep all T tokens of x alive with the
    state), a view when decoding (one token: nothing to free, one kernel fewer)."""
    return x[:, -1] if x.shape[1] == 1 else x[:, -1].clone()


def token_shift(x, prev):
    """The previous token's vector for every position: (B, T, C) -> (B, T, C); `prev` (B, C) or None = zeros."""
    first = torch.zeros_like(x[:, :1]) if prev is None else prev[:, None].to(x.dtype)
    return first if x.shape[1] == 1 else torch.cat([first, x[:, :-1]], dim=1)  # (decoding: no copy)


class TimeMix(nn.Module):
    """RWKV_Tmix_x070: token shift, six mixes, r/k/v projections, LoRAs for decay/a/value-gate/gate, WKV, ln_x.

    The mixes act on the input width C; r/k/v, the LoRA outputs and the WKV heads have width A = dim_att (= C in
    RWKV-7 proper). The first RWKV layer of a model (is_first) produces v_first, the value every later layer
    blends towards; it has no v0/v1/v2."""

    def __init__(self, config, layer_id, is_first=None):
        super().__init__()
        self.layer_id = layer_id
        self.is_first = layer_id == 0 if is_first is None else is_first
        self.wkv_impl = config.wkv_impl
        self.wkv_part_len = 0  # > 0: the WKV runs in parts of this many tokens (ctx_parts; RWKV.set_wkv_part_len)
        C, A, H, N = config.n_embd, config.dim_att, config.n_head, config.head_size
        self.n_head, self.head_size = H, N
        vec = lambda n=A: nn.Parameter(torch.empty(1, 1, n))  # noqa: E731 (stored [1, 1, n] as in official files)
        mat = lambda i, o: nn.Parameter(torch.empty(i, o))  # noqa: E731 (LoRA stored [in, out], used as x @ w1)
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (vec(C) for _ in range(6))
        self.w0, self.w1, self.w2 = vec(), mat(C, config.dim_w), mat(config.dim_w, A)
        self.a0, self.a1, self.a2 = vec(), mat(C, config.dim_a), mat(config.dim_a, A)
        if not self.is_first:  # released files have no blocks.0.att.v0/v1/v2
            self.v0, self.v1, self.v2 = vec(), mat(C, config.dim_v), mat(config.dim_v, A)
        self.g1, self.g2 = mat(C, config.dim_g), mat(config.dim_g, A)
        self.k_k, self.k_a = vec(), vec()
        self.r_k = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, A, bias=config.att_bias)
        self.key = nn.Linear(C, A, bias=config.att_bias)
        self.value = nn.Linear(C, A, bias=config.att_bias)
        self.output = nn.Linear(A, C, bias=False)
        self.ln_x = nn.GroupNorm(H, A, eps=64e-5)  # per-head norm; eps = 1e-5 * head_size as the authors use

    @torch.no_grad()
    def init_weights(self, n_layer):
        """The authors' init for layer `layer_id` of `n_layer` (reference §2.2, generate_init_weight)."""
        C, A, N, i, L = self.x_r.shape[-1], self.w0.shape[-1], self.head_size, self.layer_id, n_layer
        n = torch.arange(max(C, A), dtype=torch.float64)
        ddd = n[:C] / C
        linear = n[:A] / (A - 1) - 0.5
        z = ((n[:A] % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = z * z.abs()  # per-head pattern in [-1, 1]
        r01 = i / (L - 1) if L > 1 else 0.0
        r1a0 = 1.0 - i / L
        for p, power in [(self.x_r, 0.2), (self.x_w, 0.9), (self.x_k, 0.7), (self.x_v, 0.7), (self.x_a, 0.9),
                         (self.x_g, 0.2)]:
            p.copy_((1 - ddd ** (power * r1a0)).view(1, 1, C))
        www = -6 + 6 * (n[:A] / (A - 1)) ** (1 + r01 ** 0.3)
        self.w0.copy_((www + 0.5 + 2.5 * zigzag).view(1, 1, A))  # +0.5 offsets the -0.5 soft-clamp of the decay
        self.a0.copy_((-0.19 + 0.3 * zigzag + 0.4 * linear).view(1, 1, A))
        self.k_k.copy_((0.71 - 0.1 * linear).view(1, 1, A))
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        lora = [(self.w1, self.w2), (self.a1, self.a2), (self.g1, self.g2)]
        if not self.is_first:
            self.v0.copy_((0.73 - 0.4 * linear).view(1, 1, A))
            lora.append((self.v1, self.v2))
        for first, second in lora:  # first LoRA matrix zero, second orthogonal with gain 0.1
            nn.init.zeros_(first)
            nn.init.orthogonal_(second, gain=0.1)
        nn.init.orthogonal_(self.receptance.weight, gain=1.0)
        nn.init.orthogonal_(self.key.weight, gain=0.1)
        nn.init.orthogonal_(self.value.weight, gain=1.0)
        for lin in (self.receptance, self.key, self.value):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.output.weight)  # every block starts as the identity
        self.ln_x.weight.fill_(((1 + i) / L) ** 0.7)
        nn.init.zeros_(self.ln_x.bias)

    def forward(self, x, v_first, shift=None, wkv_state=None):
        B, T, _ = x.shape
        H, N = self.n_head, self.head_size
        xx = token_shift(x, shift) - x
        mixes = torch.cat([self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g])  # (6, 1, C)
        xr, xw, xk, xv, xa, xg = torch.addcmul(x, xx, mixes[:, None]).unbind(0)  # x + xx * mix, all six at once

        r = self.receptance(xr)
        w = self.w0 + torch.tanh(xw @ self.w1) @ self.w2  # raw decay; wkv7 turns it into exp(-e^-0.5 sigmoid(w))
        k = self.key(xk)
        v = self.value(xv)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)  # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2  # output gate: sigmoid in the middle, nothing after

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0, eps=1e-12)  # from the unmodified k
        k = k * (1 + (a - 1) * self.k_a)  # (not torch.lerp: it does not promote bf16 and fp32 under autocast)
        if self.is_first:
            v_first = v
        else:  # value residual: lerp towards layer 0's value
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)

        shape = (B, T, H, N)
        y, wkv_state = wkv7(r.view(shape), w.view(shape), k.view(shape), v.view(shape),
                            -kk, kk * a.view(shape), wkv_state, self.wkv_impl, self.wkv_part_len)
        y = self.ln_x(y.reshape(B * T, H * N)).view(B, T, H * N)
        # "bonus": one scalar per (token, head), sum of r*k*r_k, times that head's value; added after ln_x
        bonus = (r.view(shape) * k.view(shape) * self.r_k).sum(dim=-1, keepdim=True)
        y = torch.addcmul(y.view(shape), bonus, v.view(shape)).view(B, T, H * N)
        return self.output(y * g), v_first, last_token(x), wkv_state


class ChannelMix(nn.Module):
    """RWKV_CMix_x070: token shift with one mix, then relu(key(x))^2 -> value. Hidden size 4C."""

    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.x_k = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, 4 * C, bias=False)
        self.value = nn.Linear(4 * C, C, bias=False)

    def forward(self, x, shift=None):
        xk = torch.addcmul(x, token_shift(x, shift) - x, self.x_k)
        return self.value(torch.relu(self.key(xk)) ** 2), last_token(x)


class Block(nn.Module):
    def __init__(self, config, layer_id):
        super().__init__()
        self.layer_id = layer_id
        C = config.n_embd
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)  # normalises the (tiny-initialised) embedding; block 0 only
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(config, layer_id)
        self.ffn = ChannelMix(config)
        self.drop = nn.Dropout(config.dropout)  # (no weights: official files are unchanged)

    def forward(self, x, v_first, state=None):
        att_shift, wkv_state, ffn_shift = (None, None, None) if state is None else state
        if self.layer_id == 0:
            x = self.ln0(x)
        dx, v_first, att_shift, wkv_state = self.att(self.ln1(x), v_first, att_shift, wkv_state)
        x = x + self.drop(dx)
        dx, ffn_shift = self.ffn(self.ln2(x), ffn_shift)
        x = x + self.drop(dx)
        return x, v_first, (att_shift, wkv_state, ffn_shift)


# -----------------------------------------------------------------------------
# 4. The model


def check_ids(idx, vocab_size):
    """A clear error for token ids outside the vocabulary (on the GPU they would be a device-side assert). Skipped
    while compiling or capturing a CUDA graph, which cannot read values back."""
    if torch.compiler.is_compiling() or (idx.is_cuda and torch.cuda.is_current_stream_capturing()) or not idx.numel():
        return
    low, high = idx.min().item(), idx.max().item()
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token id {high if high >= vocab_size else low} is outside the model's vocabulary "
                         f"[0, {vocab_size})")


def peak_bf16_flops(gpu_name):
    """Dense bf16 peak FLOP/s of a few GPUs, for MFU; None for the others."""
    table = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
    return next((flops for name, flops in table if name in gpu_name), None)


def compile_in_place(module, backend="inductor"):
    """module.compile(), without Inductor's mix-order reduction: on the GPU (torch 2.10, 2.11) it can fuse a
    LayerNorm's backward with the gradient sums of the [1, 1, C] mixes after it and return those gradients as [C],
    failing backward (pytorch/pytorch#178080: the likely cause of whole compiled blocks failing here); torch 2.12+
    fixed the shape but not every wrong-gradient case (pytorch/pytorch#193061)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config
    # blocks share one forward and differ in layer_id (a static int): one compilation each, and past the default
    # limit of 8 the rest silently ran eager (L12: 4 of 12 blocks)
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
    for mixer in module.modules():  # kernels first (see wkv7_ops)
        if isinstance(mixer, TimeMix) and runs_kernel(mixer.wkv_impl, mixer.x_r.is_cuda, mixer.head_size):
            wkv7_ops(mixer.head_size)
    off = backend == "inductor" and hasattr(inductor_config.triton, "mix_order_reduction")  # not in older torch
    module.compile(backend=backend, options={"triton.mix_order_reduction": False} if off else None)


def capture_cuda_graph(fn, warmup=1):
    """fn() run `warmup` times on a side stream (compilation, lazy inits, library handles: none of it may happen
    while capturing), then one call captured as a CUDA graph: (graph, what that call returned)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class CUDAGraphStep:
    """A training micro-step, forward + backward, captured once as a CUDA graph and then replayed: one launch instead
    of hundreds (the compiled L12-D768 step left the H200 idle for 20% of it between kernels). Calling it with
    (x, y) copies them into the captured inputs (same shapes and dtypes every time) and returns what micro_step
    returned at capture (detached tensors, e.g. the loss), which each replay overwrites.
    The graph adds into the .grad tensors that exist at capture, so after it never set them to None:
    zero_grad(set_to_none=False). The optimizer step runs outside, as before. Under autocast, micro_step must turn
    the cast cache off (cache_enabled=False), PyTorch's rule for autocast in CUDA graphs."""

    def __init__(self, micro_step, params, x, y, warmup=3):
        self.x, self.y = x.clone(), y.clone()
        params = [p for p in params if p.requires_grad]
        for p in params:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        self.graph, self.out = capture_cuda_graph(lambda: micro_step(self.x, self.y), warmup)
        for p in params:  # the warm-up's gradients
            p.grad.zero_()

    def __call__(self, x, y):
        self.x.copy_(x, non_blocking=True), self.y.copy_(y, non_blocking=True)
        self.graph.replay()
        return self.out


class RWKV(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_out = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # not tied to emb
        self.grad_checkpointing = False  # recompute each block in backward (set by the trainers)
        self.compile_loss = False  # compile_blocks() turns it on
        if not self.emb.weight.is_meta:
            self.init_weights()

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.emb.weight.numel() - self.head.weight.numel() if non_embedding else n

    def flops_per_token(self):
        """Training FLOPs per token, for MFU: 6 per weight of every matmul, head included, embedding lookup not. The
        WKV state update (~36 * L * C * head_size, ~3% at L12-D768) is left out, as attention often is."""
        return 6 * (self.num_params(non_embedding=False) - self.emb.weight.numel())

    def forward(self, idx, targets=None, state=None, last_only=False):
        """idx (B, T) token ids -> (logits (B, T, V), loss or None, new state).
        targets (B, T) with -1 = ignore gives the mean cross-entropy (L2Wrap added in backward only).
        state: a list with one (att_shift, wkv, ffn_shift) per layer from a previous call, or None for zeros.
        last_only: compute the head on the last position only (prefill for sampling)."""
        check_ids(idx, self.config.vocab_size)
        x = self.emb(idx)
        v_first, new_state = None, []
        for i, block in enumerate(self.blocks):
            s = None if state is None else state[i]
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, v_first, s = torch.utils.checkpoint.checkpoint(block, x, v_first, s, use_reentrant=False)
            else:
                x, v_first, s = block(x, v_first, s)
            new_state.append(s)
        x = self.ln_out(x)
        if targets is None:
            return self.head(x[:, -1:] if last_only else x), None, new_state
        logits = self.head(x)
        return logits, (compiled_lm_loss if self.compile_loss else lm_loss)(logits, targets), new_state

    # --- initialisation: the authors' generate_init_weight() and module inits (reference §2.2) ---

    @torch.no_grad()
    def init_weights(self):
        """The authors' generate_init_weight() and module inits (reference §2.2)."""
        cfg = self.config
        L, C, V = cfg.n_layer, cfg.n_embd, cfg.vocab_size
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)  # tiny: ln0 normalises it
        nn.init.orthogonal_(self.head.weight, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)
        for norm in [m for m in self.modules() if isinstance(m, nn.LayerNorm)]:
            nn.init.ones_(norm.weight), nn.init.zeros_(norm.bias)
        ddd = torch.arange(C, dtype=torch.float64) / C
        for i, block in enumerate(self.blocks):
            block.att.init_weights(L)
            block.ffn.x_k.copy_((1 - ddd ** ((1.0 - i / L) ** 4)).view(1, 1, C))
            nn.init.orthogonal_(block.ffn.key.weight, gain=1.0)
            nn.init.zeros_(block.ffn.value.weight)

    # --- optimizer: weight decay on the large matrices only, 2x lr on att.w0 (reference §3.2) ---

    def optim_groups(self, weight_decay):
        """Parameter groups as the authors build them. Each group has 'lr_scale'; trainers set
        group['lr'] = lr * group['lr_scale'] every step."""
        scaled, decayed, plain = [], [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if "att.w0" in name:
                scaled.append(p)
            elif weight_decay > 0 and sum(d > 1 for d in p.shape) >= 2 and ".weight" in name:  # (FSDP-safe squeeze)
                decayed.append(p)  # emb, head, r/k/v/o, ffn key/value; never LoRAs, r_k, mixes, norms
            else:
                plain.append(p)
        groups = [dict(params=plain, weight_decay=0.0, lr_scale=1.0),
                  dict(params=scaled, weight_decay=0.0, lr_scale=2.0),
                  dict(params=decayed, weight_decay=weight_decay, lr_scale=1.0)]
        return [g for g in groups if g["params"]]

    def configure_optimizer(self, weight_decay, learning_rate, betas=(0.9, 0.99), eps=1e-18, device_type="cpu"):
        groups = self.optim_groups(weight_decay)
        for g in groups:
            g["lr"] = learning_rate * g["lr_scale"]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=device_type == "cuda")

    # --- official .pth files (reference §4) ---

    # Files from the authors' current trainer also hold these; layer 0 never uses them (they are absent from
    # released checkpoints), so they are dropped on load and not written on save.
    UNUSED_KEYS = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")

    @staticmethod
    def config_from_state_dict(sd, **overrides):
        """Read the architecture off the tensor shapes: layers, width, head size, vocab, the four LoRA ranks."""
        for key in ("emb.weight", "blocks.0.att.r_k", "blocks.0.att.w1", "blocks.0.att.a1", "blocks.0.att.g1"):
            if key not in sd:
                raise ValueError(f"not an RWKV-7 (x070) checkpoint: it has no '{key}' "
                                 f"(RWKV-4/5/6 files have no att.r_k; hybrid models load with their own loader)")
        n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        vocab_size, n_embd = sd["emb.weight"].shape
        n_head, head_size = sd["blocks.0.att.r_k"].shape
        dim_v = sd["blocks.1.att.v1"].shape[1] if "blocks.1.att.v1" in sd else 0
        fields = dict(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, head_size=head_size,
                      dim_w=sd["blocks.0.att.w1"].shape[1], dim_a=sd["blocks.0.att.a1"].shape[1],
                      dim_v=dim_v, dim_g=sd["blocks.0.att.g1"].shape[1])
        fields.update(overrides)
        return RWKVConfig(**fields)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, **overrides):
        """Load an official RWKV-7 .pth (bf16, fp16 or fp32) or one written by save_pretrained.
        overrides: non-architecture config fields, e.g. wkv_impl='torch'."""
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # not a torch file, a pickle with code, a truncated download, ...
            raise ValueError(f"{path} is not a loadable RWKV-7 .pth file ({type(e).__name__}: {e})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{path} is not an RWKV-7 state dict (a flat dict of tensors): "
                             f"training checkpoints hold the weights under their 'model' key")
        config = cls.config_from_state_dict(sd, **overrides)
        with torch.device("meta"):
            model = cls(config)
        model.load_official_state_dict(sd, dtype)
        return model

    def load_official_state_dict(self, sd, dtype=torch.float32):
        """Strict load with one clear error naming the offending key (no silent strict=False)."""
        sd = {k: v for k, v in sd.items() if k not in self.UNUSED_KEYS}
        own = self.state_dict()
        for k in sd:
            if k not in own:
                raise ValueError(f"unexpected key '{k}' in the checkpoint: not part of RWKV-7 (x070) "
                                 f"L{self.config.n_layer}-D{self.config.n_embd}")
        for k, p in own.items():
            if k not in sd:
                raise ValueError(f"the checkpoint has no '{k}' (incomplete or not an RWKV-7 x070 file)")
            if sd[k].shape != p.shape:
                raise ValueError(f"'{k}' has shape {tuple(sd[k].shape)} in the checkpoint, "
                                 f"the model expects {tuple(p.shape)}")
        self.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)

    def save_pretrained(self, path, dtype=torch.bfloat16, state_dict=None):
        """Write the official layout (what the authors' tools and the `rwkv` package load), atomically.
        state_dict: the full state dict when the model is sharded (FSDP), else read from the model."""
        sd = self.state_dict() if state_dict is None else state_dict
        sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in sd.items()}
        tmp = f"{path}.tmp"
        torch.save(sd, tmp)
        os.replace(tmp, path)

    def compile_blocks(self, backend="inductor"):
        """torch.compile each block in place (parameter names get no _orig_mod. prefix), as train_pretrain does, and
        the loss: fused, it never holds the fp32 logits (L12-D768 on an H200: 4 GiB less, the same speed)."""
        for block in self.blocks:
            compile_in_place(block, backend)
        self.compile_loss = backend == "inductor"  # only Inductor fuses it

    # --- long context (seed (d): ctx_parts and state_cp / infctx) ---

    def set_wkv_part_len(self, part_len):
        """ctx_parts: every layer's WKV runs in parts of `part_len` tokens (0 = the whole sequence at once)."""
        for block in self.blocks:
            block.att.wkv_part_len = part_len

    def forward_segments(self, idx, targets, segment_len, state=None):
        """State checkpointing (infctx): the whole model runs segment by segment (the last one may be shorter),
        carrying every layer's state. Each segment but the last is recomputed in backward (torch.utils.checkpoint),
        so only segment-boundary states stay alive: activation memory grows with segment_len, not with T.
        Gradients flow into the previous segment's state (full backpropagation through time), and the loss and its
        gradient equal forward(idx, targets)'s: the token-weighted mean cross-entropy over the whole sequence, with
        L2Wrap's 1e-4 / (B*T) for the whole T. Returns (None, loss, new state): no logits are kept."""
        return None, *segmented_loss(self, idx, targets, segment_len, state, l2wrap=True)


def segmented_loss(model, idx, targets, segment_len, state, l2wrap):
    """State checkpointing for RWKV and Hybrid: model(idx_s, state=state) runs one segment; returns (loss, final
    state), the loss being the token-weighted mean cross-entropy over all of idx. Every segment's head and loss
    run inside its checkpoint, so no segment's logits outlive it."""
    B, T = idx.shape
    n_total = (targets != -1).sum()  # the mean's denominator, known before any segment runs

    def segment(idx_s, targets_s, state):
        logits, _, state = model(idx_s, state=state)
        ce_sum = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets_s.reshape(-1),
                                 ignore_index=-1, reduction="sum")
        if not l2wrap:
            return ce_sum / n_total, state
        # L2Wrap scales its push by 1 / (B * rows of the logits it sees); these logits have T_s of T rows, so
        # it wraps the loss scaled by T / T_s and the result is scaled back: the value and the CE gradient are
        # unchanged, and the push on these logits becomes the full call's 1e-4 / (B*T)
        ratio = T / idx_s.shape[1]
        return L2Wrap.apply(ce_sum / n_total * ratio, logits) / ratio, state

    loss = 0.0
    for t in range(0, T, segment_len):
        args = (idx[:, t:t + segment_len], targets[:, t:t + segment_len], state)
        if t + segment_len < T and torch.is_grad_enabled():  # the last segment's backward follows at once
            part, state = torch.utils.checkpoint.checkpoint(segment, *args, use_reentrant=False)
        else:
            part, state = segment(*args)
        loss = loss + part
    return loss, state


def ctx_warmup_len(step, initial_ctx_len, ctx_len, warmup_steps):
    """Context warm-up: the sample length at `step`, linear from initial_ctx_len to ctx_len over warmup_steps
    (0 = off). A pure function of the step, so a resumed run continues at the right length."""
    if initial_ctx_len <= 0 or step >= warmup_steps:
        return ctx_len
    return initial_ctx_len + (ctx_len - initial_ctx_len) * step // warmup_steps


def all_reduce_grads(params, group=None, average=True, bucket_numel=2 ** 25):
    """DDP's gradient average (or sum), by hand, for state_cp: forward_segments calls the model once per segment
    and recomputes segments inside backward, while DDP's reducer wants one DDP.forward and each gradient ready once.
    So the gradients accumulate locally and are reduced here, after the step's last backward (flat buckets).
    GRPO sums: each rank's loss is already its share of the global one."""
    import torch.distributed as dist
    grads = [p.grad for p in params if p.grad is not None]  # (the same set on every rank)
    while grads:
        n, size = 0, 0
        while n < len(grads) and (n == 0 or size + grads[n].numel() <= bucket_numel):
            size, n = size + grads[n].numel(), n + 1
        flat = torch.cat([g.flatten() for g in grads[:n]])
        dist.all_reduce(flat, group=group)  # a sum: gloo has no AVG
        if average:
            flat /= dist.get_world_size(group)
        for g, f in zip(grads[:n], flat.split([g.numel() for g in grads[:n]])):
            g.copy_(f.view_as(g))
        grads = grads[n:]


# -----------------------------------------------------------------------------
# 5. Losses. L2Wrap (reference §3.5): the loss value is unchanged; backward adds, for every token, a push of
# 1e-4 / (B*T) * max_logit on the largest logit, which keeps logits from drifting upwards.


class L2Wrap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss, logits):
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (logits,) = ctx.saved_tensors
        factor = 1e-4 / (logits.shape[0] * logits.shape[1])
        max_logit, ids = logits.max(dim=-1, keepdim=True)
        grad = torch.zeros_like(logits).scatter_(-1, ids, max_logit * factor)
        return grad_output, grad * grad_output


def lm_loss(logits, targets):
    """The training loss: mean cross-entropy over targets != -1, in fp32, with L2Wrap."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
    return L2Wrap.apply(loss, logits)


compiled_lm_loss = torch.compile(lm_loss)  # lazy: nothing is traced before the first call


def teacher_targets(teacher_logits, k, temperature):
    """What a teacher sends: log-probabilities at temperature, full (B, T, V), or the top-k (values, indices)."""
    logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return logp if k == 0 else logp.topk(min(k, logp.shape[-1]), dim=-1)


def kl_loss(student_logits, target, mask, temperature):
    """Forward KL(teacher || student) per token, masked mean, times temperature^2 (Hinton's scaling).
    target: teacher log-probs (B, T, V), or top-k (values, indices); then the teacher's remaining mass is one more
    'token' compared with the student's mass outside the top-k."""
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(target, torch.Tensor):
        kl = (target.exp() * (target - logq)).sum(-1)
    else:
        logp_k, idx = target
        logq_k = logq.gather(-1, idx)
        kl = (logp_k.exp() * (logp_k - logq_k)).sum(-1)
        rest_p = (1 - logp_k.exp().sum(-1)).clamp_min(0)
        rest_logq = logq.scatter(-1, idx, float("-inf")).logsumexp(-1)
        # when the top-k covers the whole vocabulary there is no rest: rest_p is rounding error only
        rest = torch.xlogy(rest_p, rest_p) - rest_p * rest_logq
        kl = kl + torch.where(torch.isfinite(rest_logq), rest, torch.zeros_like(rest))
    mask = mask.float()
    return (kl * mask).sum() / mask.sum().clamp_min(1) * temperature ** 2


# -----------------------------------------------------------------------------
# 6. Hybrids: a Hugging Face causal LM (Llama, Qwen2, Qwen3; SmolLM2 is Llama) whose self-attention is replaced,
# in chosen layers, by RWKV-7 time-mixers. We run the model's own embedding, decoder layers, norm and head in our
# loop, so kept attention layers are exactly the teacher's code; we own positions, masks and the state:
#   - each RWKV layer carries (att_shift, wkv) like a block of RWKV above; kept attention layers carry keys/values;
#   - v_first is the value of the first RWKV layer, shared with the later ones (as layer 0's is in RWKV-7).
# Stage 1 of distillation runs the frozen teacher attention beside each student ("align" mode): the residual
# stream continues with the teacher's output, and the loss is the distance between the two outputs.


def load_hf_model(spec, dtype=torch.float32):
    """A causal LM from a hub id, a local directory, or a .gguf file (transformers dequantizes it; needs gguf)."""
    from transformers import AutoModelForCausalLM
    spec = str(spec)
    if (spec.endswith(".gguf") or spec.startswith(("/", ".", "~"))) and not os.path.exists(spec):
        raise FileNotFoundError(f"{spec} does not exist (give a hub id, a local directory or a .gguf file)")
    if spec.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(spec) or ".", gguf_file=os.path.basename(spec),
                                                    dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)


def select_layers(spec, n_layer):
    """Which layers become RWKV: 'all', 'none', a list of indices (or its text, '[0, 5]' or '0,5'), or a Python
    slice string like '0:30:2'."""
    if spec in ("all", "none"):
        return list(range(n_layer)) if spec == "all" else []
    if isinstance(spec, str) and ":" in spec:
        return list(range(n_layer))[slice(*[int(x) if x.strip() else None for x in spec.split(":")])]
    if isinstance(spec, str):
        spec = [x for x in spec.strip("[]() ").split(",") if x.strip()]
    layers = sorted(set(int(i) for i in spec))
    if layers and not (0 <= layers[0] and layers[-1] < n_layer):
        raise ValueError(f"rwkv_layers {layers} out of range for a model with {n_layer} layers")
    return layers


class HybridState:
    """What a hybrid carries between calls: (att_shift, wkv) per RWKV layer, (keys, values) per attention layer,
    and the number of tokens seen. `update` is the one method of Hugging Face's Cache that attention layers call.
    A forward never modifies the state it was given (it builds a new one), so one state can seed many samples.
    Rows of different lengths (sample.cat_states) keep their KV caches left-padded to `length` slots: pad (B,)
    counts row b's empty leading slots (None = no padding), so a new token lands in the same slot in every row."""

    def __init__(self, length=0, rwkv=None, kv=None, pad=None):
        self.length, self.rwkv, self.kv, self.pad = length, dict(rwkv or {}), dict(kv or {}), pad
        self.v_first, self.align_losses = None, []  # scratch of one layer's call (Hybrid._layer)

    def update(self, key, value, layer_idx, *args, **kwargs):
        if layer_idx in self.kv:
            old_key, old_value = self.kv[layer_idx]
            key, value = torch.cat([old_key, key], dim=-2), torch.cat([old_value, value], dim=-2)
        self.kv[layer_idx] = (key, value)
        return key, value

    def map(self, fn):
        """A new state with fn applied to every tensor, e.g. lambda t: t.repeat_interleave(8, 0) for 8 samples
        (the per-row pad counts included)."""
        return HybridState(self.length, {i: tuple(fn(t) for t in s) for i, s in self.rwkv.items()},
                           {i: tuple(fn(t) for t in s) for i, s in self.kv.items()},
                           None if self.pad is None else fn(self.pad))


class RWKVAttention(nn.Module):
    """Stands in for a Hugging Face `self_attn`: same call, same (output, weights) return. The time-mixer is
    `student`; in stage 1 the frozen teacher attention is `teacher_attn`. The per-forward HybridState is reached
    through `slot`, a plain object shared by all layers of one hybrid (not a module, so nothing is saved)."""

    def __init__(self, student, slot, layer_idx, teacher_attn=None):
        super().__init__()
        self.student, self.slot, self.layer_idx = student, slot, layer_idx
        self.teacher_attn = teacher_attn

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
        state = self.slot.state
        shift, wkv = state.rwkv.get(self.layer_idx, (None, None))
        out, state.v_first, shift, wkv = self.student(hidden_states, state.v_first, shift, wkv)
        state.rwkv[self.layer_idx] = (shift, wkv)
        if self.slot.align:  # stage 1: compare with the teacher, continue with the teacher
            with torch.no_grad():
                kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}  # no cache here
                target, _ = self.teacher_attn(hidden_states, position_embeddings, attention_mask, **kwargs)
            # per-token L2 distance, divided by sqrt(width) so that it reads as an RMS and is size independent
            state.align_losses.append((out.float() - target.float()).norm(dim=-1).mean() / math.sqrt(out.shape[-1]))
            return target, None
        return out, None


class _Slot:
    state, align = None, False


class Hybrid(nn.Module):
    """hf_model (a *ForCausalLM) with the attention of `rwkv_layers` replaced by RWKV-7 TimeMix layers.

    init_from_teacher: copy q/k/v/o into receptance/key/value/output (key/value heads repeated in Hugging Face's
    repeat_kv order: query head h reads key/value head h // n_rep), the rest takes the authors' init.
    keep_teacher_attention: keep the replaced attention beside each student, frozen, for stage 1."""

    def __init__(self, hf_model, rwkv_layers="all", init_from_teacher=True, keep_teacher_attention=False,
                 wkv_impl="auto"):
        super().__init__()
        self.hf = hf_model
        cfg = hf_model.config
        layers = hf_model.model.layers
        self.rwkv_layers = select_layers(rwkv_layers, len(layers))
        attn0 = layers[0].self_attn
        if attn0.o_proj.bias is not None:
            raise ValueError("teachers with a bias on o_proj are not supported (RWKV-7's output has no bias)")
        head_dim = attn0.head_dim
        dtype = attn0.q_proj.weight.dtype
        self.rwkv_config = RWKVConfig(n_layer=len(layers), n_embd=cfg.hidden_size, vocab_size=cfg.vocab_size,
                                      head_size=head_dim, dim_att=cfg.num_attention_heads * head_dim,
                                      att_bias=attn0.q_proj.bias is not None, wkv_impl=wkv_impl)
        self.slot = _Slot()
        # the decoder layers' name for the KV cache argument: `cache` from transformers 5.24, `past_key_values` before
        self._cache_name = "cache" if "cache" in inspect.signature(type(layers[0]).forward).parameters \
            else "past_key_values"
        self.grad_checkpointing = False  # recompute each decoder layer in backward (HF's own would drop the state)
        for i in self.rwkv_layers:
            attn = layers[i].self_attn
            student = TimeMix(self.rwkv_config, i, is_first=i == self.rwkv_layers[0])
            student.to(device=attn.q_proj.weight.device)
            student.init_weights(len(layers))
            if init_from_teacher:
                copy_attention_into(student, attn)
            layers[i].self_attn = RWKVAttention(student.to(dtype), self.slot, i,
                                                attn.requires_grad_(False) if keep_teacher_attention else None)

    @property
    def config(self):
        return self.hf.config

    @property
    def fixed_size_state(self):
        """True when every layer is RWKV: no KV cache grows, so decoding can replay one CUDA graph."""
        return len(self.rwkv_layers) == len(self.hf.model.layers)

    def student_parameters(self):
        return [p for n, p in self.named_parameters() if ".student." in n]

    def set_trainable(self, which):
        """'student' (the RWKV layers only), 'all', or 'all_but_mlp'. The teacher attention is always frozen."""
        if which not in ("student", "all", "all_but_mlp"):
            raise ValueError(f"trainable must be 'student', 'all' or 'all_but_mlp', got {which!r}")
        for name, p in self.named_parameters():
            train = which == "all" or (which == "student" and ".student." in name) or (
                which == "all_but_mlp" and ".mlp." not in name)
            p.requires_grad_(train and ".teacher_attn." not in name)

    def set_wkv_part_len(self, part_len):
        """ctx_parts: every RWKV layer's WKV runs in parts of `part_len` tokens (0 = the whole sequence at once)."""
        for i in self.rwkv_layers:
            self.hf.model.layers[i].self_attn.student.wkv_part_len = part_len

    def forward_segments(self, idx, targets, segment_len, state=None):
        """State checkpointing, as RWKV.forward_segments: the loss of forward(idx, targets) (token-weighted mean
        cross-entropy, no L2Wrap here) and its exact gradients, each segment but the last recomputed in backward,
        carrying the state (RWKV layers: token shift and WKV state; v_first is per token, recomputed in each
        segment). Kept attention layers work too, through their KV cache: that part of the memory grows with T.
        Returns (None, loss, new state)."""
        return None, *segmented_loss(self, idx, targets, segment_len, state, l2wrap=False)

    def compile_time_mixers(self):
        """torch.compile each RWKV time-mixer in place (names keep no prefix): fuses its many small elementwise ops."""
        for i in self.rwkv_layers:
            compile_in_place(self.hf.model.layers[i].self_attn.student)

    def compile_blocks(self):
        """torch.compile every decoder layer in place, as RWKV.compile_blocks does (sample.py, with CUDA graphs)."""
        for layer in self.hf.model.layers:
            compile_in_place(layer)

    def drop_teacher_attention(self):
        for i in self.rwkv_layers:
            self.hf.model.layers[i].self_attn.teacher_attn = None

    def untie_embeddings(self):
        """Give the head its own copy of the embedding (RADLADS found tied embeddings distil badly)."""
        if self.hf.lm_head.weight is self.hf.model.embed_tokens.weight:
            self.hf.lm_head.weight = nn.Parameter(self.hf.model.embed_tokens.weight.detach().clone())
        self.hf.config.tie_word_embeddings = False

    def forward(self, idx, targets=None, state=None, last_only=False, align=False):
        """Same contract as RWKV.forward: (logits, loss, new state). With align=True (stage 1, needs the teacher
        attention) the residual stream is the teacher's and `loss` is the mean alignment loss over RWKV layers; the
        layers after the last RWKV one and the head cannot change it, so they do not run: (None, loss, None)."""
        B, T = idx.shape
        check_ids(idx, self.config.vocab_size)
        inner = self.hf.model
        past = 0 if state is None else state.length
        pad = None if state is None else state.pad
        new_state = HybridState(past + T) if state is None else HybridState(past + T, state.rwkv, state.kv, pad)
        x = inner.embed_tokens(idx)
        slots = torch.arange(past, past + T, device=idx.device)  # the cache slots the new tokens take
        positions = slots[None].expand(B, T)
        if pad is not None:  # a left-padded row counts its own tokens only (its cached keys were rotated so)
            positions = positions - pad[:, None]
        rope = inner.rotary_emb(x, positions)
        mask = None  # plain causal attention; continuing after a cache, or padded rows, need an explicit mask
        if pad is not None or (past and T > 1):
            allowed = torch.arange(past + T, device=idx.device)[None] <= slots[:, None]  # (T, past + T) causal
            if pad is not None:  # and no row sees its pad slots: (B, T, past + T)
                allowed = allowed & (torch.arange(past + T, device=idx.device) >= pad[:, None])[:, None]
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=idx.device)
            mask = mask.masked_fill(~allowed, torch.finfo(x.dtype).min)
            mask = mask.view(-1, 1, T, past + T).expand(B, 1, T, past + T)
        v_first, align_losses = None, []
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i in range(max(self.rwkv_layers, default=-1) + 1 if align else len(inner.layers)):
            own = new_state.rwkv if i in self.rwkv_layers else new_state.kv
            args = (i, x, own.get(i), v_first, past + T, mask, positions, rope, align)
            if checkpointing:
                x, own[i], v_first, losses = torch.utils.checkpoint.checkpoint(self._layer, *args, use_reentrant=False)
            else:
                x, own[i], v_first, losses = self._layer(*args)
            align_losses += losses
        if align:
            return None, torch.stack(align_losses).mean(), None
        x = inner.norm(x)
        logits = self.hf.lm_head(x[:, -1:] if last_only else x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T), ignore_index=-1)
        return logits, loss, new_state

    def _layer(self, i, x, layer_state, v_first, length, mask, positions, rope, align):
        """Decoder layer i. Its state (RWKV: shift and WKV; attention: keys and values) and v_first come in as
        arguments and the layer writes into a scratch HybridState of its own, so a second run (a checkpoint's
        recompute in backward) reads the same inputs. Returns (x, the layer's new state, v_first, align losses)."""
        own = {} if layer_state is None else {i: layer_state}
        rwkv = i in self.rwkv_layers
        scratch = HybridState(length, own if rwkv else {}, {} if rwkv else own)
        scratch.v_first = v_first
        self.slot.state, self.slot.align = scratch, align
        try:
            x = self.hf.model.layers[i](x, attention_mask=mask, position_ids=positions, position_embeddings=rope,
                                        **{self._cache_name: scratch})
        finally:
            self.slot.state, self.slot.align = None, False
        return x, (scratch.rwkv if rwkv else scratch.kv)[i], scratch.v_first, scratch.align_losses

    # --- a hybrid directory: the teacher's config.json, hybrid.json (which layers are RWKV), model.safetensors ---

    def save_pretrained(self, out_dir, state_dict=None):
        """state_dict: this module's full state dict when the model is sharded (FSDP), else read from the model."""
        from safetensors.torch import save_file
        os.makedirs(out_dir, exist_ok=True)
        self.hf.config.save_pretrained(out_dir)
        meta = dict(rwkv_layers=self.rwkv_layers, head_size=self.rwkv_config.head_size,
                    dim_w=self.rwkv_config.dim_w, dim_a=self.rwkv_config.dim_a, dim_v=self.rwkv_config.dim_v,
                    dim_g=self.rwkv_config.dim_g, format="nano-rwkv7 hybrid v1")
        with open(os.path.join(out_dir, "hybrid.json"), "w") as f:
            json.dump(meta, f, indent=1)
        sd = self.hf.state_dict() if state_dict is None else {k[3:]: v for k, v in state_dict.items() if k.startswith("hf.")}
        sd = {k: v.detach().cpu().contiguous() for k, v in sd.items() if ".teacher_attn." not in k}
        if self.hf.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)  # the same tensor as the embedding
        tmp = os.path.join(out_dir, "model.safetensors.tmp")
        save_file(sd, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
        # the code that reads the directory goes with it (this file needs only torch, transformers and safetensors),
        # so others load it without this repository: sys.path.insert(0, d); from model import Hybrid
        here = os.path.dirname(os.path.abspath(__file__))
        if os.path.abspath(out_dir) != here:
            for name in ("model.py", "wkv7.cu", "wkv7_hip.cpp"):
                shutil.copyfile(os.path.join(here, name), os.path.join(out_dir, name))

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, wkv_impl="auto"):
        """Load a directory written by save_pretrained."""
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM
        if not os.path.isfile(os.path.join(path, "hybrid.json")):
            raise ValueError(f"{path} is not a hybrid directory (no hybrid.json)")
        with open(os.path.join(path, "hybrid.json")) as f:
            meta = json.load(f)
        config = AutoConfig.from_pretrained(path)
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)  # random weights, replaced below
        model = cls(hf, meta["rwkv_layers"], init_from_teacher=False, wkv_impl=wkv_impl)
        sd = load_file(os.path.join(path, "model.safetensors"))
        if config.tie_word_embeddings:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        missing, unexpected = model.hf.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match the hybrid layout (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        return model


@torch.no_grad()
def copy_attention_into(student, attn):
    """Teacher q/k/v/o (and biases) -> student receptance/key/value/output."""
    N = student.head_size
    n_rep = student.n_head // (attn.k_proj.weight.shape[0] // N)

    def repeat_heads(t):  # [n_kv * N, ...] -> [n_kv * n_rep * N, ...], kv head j serves query heads j*n_rep ...
        return t.reshape(-1, N, *t.shape[1:]).repeat_interleave(n_rep, dim=0).reshape(-1, *t.shape[1:])

    student.receptance.weight.copy_(attn.q_proj.weight)
    student.key.weight.copy_(repeat_heads(attn.k_proj.weight))
    student.value.weight.copy_(repeat_heads(attn.v_proj.weight))
    student.output.weight.copy_(attn.o_proj.weight)
    if student.receptance.bias is not None:
        student.receptance.bias.copy_(attn.q_proj.bias)
        student.key.bias.copy_(repeat_heads(attn.k_proj.bias))
        student.value.bias.copy_(repeat_heads(attn.v_proj.bias))
