"""wkv7.cu on a CUDA GPU against a float64 sequential reference (run: pytest -m gpu tests/test_wkv7_gpu.py).

Every output of the kernel ops is filled with NaN before the call, so an element the kernel forgot to write fails the
test. Errors are max|x - ref| / max|ref|; bf16 outputs carry up to 2^-8 of rounding, hence the bound 4e-3.
"""
import pytest
import torch

import model
from helpers import assert_matches_reference, random_model, rel_err, wkv7_inputs, wkv7_reference
from model import wkv7_kernel, wkv7_sequential

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")]
TOL = 4e-3


def inputs(B, T, H, N=64, w_range=(-8.0, 8.0), seed=0):
    return wkv7_inputs(B, T, H, N, w_range, seed, device="cuda")


def run_ops(xs, s0, dy, dsT, rows_per_block=0):
    """The two kernel ops called directly, every output poisoned with NaN first."""
    B, T, H, N = xs[0].shape
    nan = lambda *s, dtype=torch.float32: torch.full(s, float("nan"), device="cuda", dtype=dtype)  # noqa: E731
    fwd, bwd, L = model.wkv7_ops(N)
    y, sT, ckpt = nan(B, T, H, N, dtype=torch.bfloat16), nan(B, H, N, N), nan(B, H, (T + L - 1) // L + 1, N, N)
    fwd(*xs, s0, y, sT, ckpt, rows_per_block)
    grads = [nan(B, T, H, N, dtype=torch.bfloat16) for _ in range(6)] + [nan(B, H, N, N)]
    bwd(*xs, ckpt, dy.bfloat16(), dsT, *grads, rows_per_block)
    torch.cuda.synchronize()
    return y, sT, grads


def check(B, T, H, with_state=True, w_range=(-8.0, 8.0), rows_per_block=0, seed=0, N=64):
    xs, s0 = inputs(B, T, H, N, w_range=w_range, seed=seed)
    if not with_state:
        s0 = torch.zeros_like(s0)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    dy = torch.randn(B, T, H, N, generator=g, device="cuda").bfloat16()
    dsT = torch.randn(B, H, N, N, generator=g, device="cuda")
    y, sT, grads = run_ops(xs, s0, dy, dsT, rows_per_block)
    return assert_matches_reference(y, sT, grads, xs, s0, dy, dsT, TOL)


@pytest.mark.parametrize("T", [16, 17, 100, 512, 4096])
@pytest.mark.parametrize("with_state", [True, False])
def test_small_batch_heads(T, with_state):
    check(1, T, 2, with_state, seed=T)


@pytest.mark.parametrize("T", [16, 17, 100, 512])
@pytest.mark.parametrize("with_state", [True, False])
def test_large_batch_heads(T, with_state):
    check(4, T, 40, with_state, seed=T + 1)  # 160 heads: the forward splits heads in two, the backward does not


@pytest.mark.parametrize("rows_per_block", [16, 32, 64])
def test_rows_per_block(rows_per_block):
    check(3, 100, 5, rows_per_block=rows_per_block, seed=rows_per_block)


@pytest.mark.parametrize("T", [17, 512])
@pytest.mark.parametrize("rows_per_block", [0, 16, 32, 64])
def test_head_size_128(T, rows_per_block):
    """Head size 128 (Qwen3, Llama 3 teachers): at most 32 state rows per block (shared memory); 64 asked is 32."""
    check(2, T, 3, rows_per_block=rows_per_block, seed=T, N=128)


@pytest.mark.parametrize("w_range", [(-8.0, -7.0), (7.0, 8.0)])
@pytest.mark.parametrize("T", [100, 4096])
def test_decay_extremes(w_range, T):
    """Decay next to 1 (w_raw -8) and next to its floor 0.545 (w_raw 8)."""
    check(1, T, 2, w_range=w_range, seed=T)


def test_autograd_function():
    """wkv7_kernel: fp32 inputs in (cast to bf16 inside), y back in fp32, grads through state_in; None gradients."""
    xs, s0 = inputs(2, 70, 3)
    xs = [x.float().requires_grad_() for x in xs]
    s0.requires_grad_()
    dsT = torch.randn_like(s0)
    y, sT = wkv7_kernel(*xs, s0)
    assert y.dtype == torch.float32 and sT.dtype == torch.float32
    (y.sum() + (sT * dsT).sum()).backward()
    y_ref, sT_ref, grads_ref = wkv7_reference([x.detach().bfloat16() for x in xs], s0.detach(), torch.ones_like(y),
                                              dsT)
    errs = [rel_err(y, y_ref), rel_err(sT, sT_ref)] + [rel_err(x.grad, r) for x, r in zip(xs + [s0], grads_ref)]
    assert max(errs) <= TOL, errs
    for use_y in (True, False):  # y alone (d state_out is None), then state_out alone (dy is None); no state_in
        xs2 = [x.detach().bfloat16().requires_grad_() for x in xs]
        y2, sT2 = wkv7_kernel(*xs2)
        (y2.float().sum() if use_y else sT2.sum()).backward()
        xr = [x.detach().double().requires_grad_() for x in xs2]
        yr, sTr = wkv7_sequential(*xr)
        (yr.sum() if use_y else sTr.sum()).backward()
        for x, ref in zip(xs2, xr):  # r has no gradient through state_out alone
            assert rel_err(x.grad, ref.grad) <= TOL if ref.grad is not None else not x.grad.any()


def test_torch_compile_fullgraph():
    xs, s0 = inputs(2, 50, 2)
    leaves = [x.requires_grad_() for x in xs] + [s0.requires_grad_()]
    wkv7_kernel(*leaves)  # build and load outside the compiled region

    def run(fn):
        for x in leaves:
            x.grad = None
        y, sT = fn(*leaves)
        (y.float().sum() + sT.sum()).backward()
        return [y, sT] + [x.grad for x in leaves]

    compiled = run(torch.compile(lambda *a: wkv7_kernel(*a), fullgraph=True))
    eager = run(wkv7_kernel)
    for a, b in zip(compiled, eager):  # heads split over blocks sum with atomics: equal up to rounding
        assert rel_err(a, b) <= TOL


def test_training_kernel_vs_torch():
    """20 AdamW steps of a tiny RWKV on the same data and init: the kernel and the PyTorch path give the same losses."""
    losses = {}
    for impl in ("kernel", "torch"):
        torch.manual_seed(0)
        net = model.RWKV(model.RWKVConfig(n_layer=2, n_embd=128, vocab_size=256, wkv_impl=impl)).cuda()
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
        g = torch.Generator(device="cuda").manual_seed(0)
        losses[impl] = []
        for _ in range(20):
            idx = torch.randint(0, 256, (4, 65), device="cuda", generator=g)
            _, loss, _ = net(idx[:, :-1], idx[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[impl].append(loss.item())
    diff = max(abs(a - b) for a, b in zip(losses["kernel"], losses["torch"]))
    assert diff <= 1e-2, (diff, losses)


def test_compiled_training_step(monkeypatch):
    """The L12 pretraining step's path on a small model: blocks compiled with Inductor before the kernel is loaded
    (compile_in_place loads it first; a load met while tracing was a graph break that torch 2.11 then failed in,
    with garbage view sizes), bf16 autocast, backward: the eager loss and gradients, up to bf16 rounding."""
    loaded = model.wkv7_ops(64)
    monkeypatch.setattr(model, "_WKV7_OPS", {})  # as in a fresh process, where the load is a dynamo-disabled call
    monkeypatch.setattr(model, "_wkv7_build", torch.compiler.disable(lambda N: loaded))
    nets = []
    for compiled in (True, False):
        nets.append(random_model(n_layer=2, n_embd=128, vocab_size=256).cuda().train())
        if compiled:
            nets[-1].compile_blocks()
    idx = torch.randint(0, 256, (4, 129), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    losses = []
    for net in nets:
        with torch.autocast("cuda", torch.bfloat16):
            losses.append(net(idx[:, :-1], idx[:, 1:])[1])
        losses[-1].backward()
    assert abs(losses[0].item() - losses[1].item()) <= 1e-2
    grads = dict(nets[1].named_parameters())
    for name, p in nets[0].named_parameters():
        assert rel_err(p.grad, grads[name].grad) <= 5e-2, name
