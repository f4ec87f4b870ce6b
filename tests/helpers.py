"""Helpers shared by the tests (fixtures live in conftest.py)."""
import torch

from model import RWKV, RWKVConfig


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
