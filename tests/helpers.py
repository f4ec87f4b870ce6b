"""Helpers shared by the tests (fixtures live in conftest.py)."""
import torch
import torch.nn.functional as F

from model import RWKV, RWKVConfig, wkv7_sequential


def rel_err(x, ref):
    """max |x - ref| / max |ref|, in float64."""
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def random_model(seed=0, **cfg):
    """The authors' init plus noise on every tensor: output and ffn.value start at zero, so without the noise no
    block would matter and every comparison would be trivially equal."""
    torch.manual_seed(seed)
    model = RWKV(RWKVConfig(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.02 if name == "emb.weight" else 0.1 if p.dim() < 2 or p.shape[0] != p.shape[1] else 0.05
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def wkv7_inputs(B, T, H, N=64, w_range=(-8.0, 8.0), seed=0, device="cpu"):
    """bf16 r, w, k, v, a, b as the model makes them (a = -kk, b = kk * a_gate, kk unit-norm), fp32 state."""
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    kk = F.normalize(rnd(B, T, H, N), dim=-1)
    w = w_range[0] + (w_range[1] - w_range[0]) * torch.rand(B, T, H, N, generator=g, device=device)
    xs = [rnd(B, T, H, N), w, rnd(B, T, H, N), rnd(B, T, H, N), -kk, kk * torch.sigmoid(rnd(B, T, H, N))]
    return [x.bfloat16() for x in xs], rnd(B, H, N, N)


def wkv7_reference(xs, s0, dy, dsT):
    """y, state_out and the gradients (r, w, k, v, a, b, state_in) of sum(y*dy) + sum(state_out*dsT), by autograd
    through the float64 loop."""
    xr = [x.double().requires_grad_() for x in xs]
    sr = s0.double().requires_grad_()
    y, sT = wkv7_sequential(*xr, sr)
    torch.autograd.backward([y, sT], [dy.double(), dsT.double()])
    return y, sT, [x.grad for x in xr] + [sr.grad]


def assert_matches_reference(y, sT, grads, xs, s0, dy, dsT, tol):
    """A kernel's y, state_out and 7 gradients: no NaN (outputs are poisoned before the run, so NaN = not written)
    and each within tol of wkv7_reference (rel_err). Returns the errors by name."""
    y_ref, sT_ref, grads_ref = wkv7_reference(xs, s0, dy, dsT)
    names = ["y", "state_out"] + ["d" + n for n in "rwkvab"] + ["d state_in"]
    errs = {}
    for name, x, ref in zip(names, [y, sT] + grads, [y_ref, sT_ref] + grads_ref):
        assert not x.isnan().any(), f"{name}: NaN (an element was not written)"
        errs[name] = rel_err(x, ref)
    assert max(errs.values()) <= tol, errs
    return errs
