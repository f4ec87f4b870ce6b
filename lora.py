"""
LoRA for RWKV-7 (seed (d), RWKV-LM-LoRA): train a low-rank update of chosen matrices plus, optionally, whole small
tensors; save only what trains; merge into a full official-layout .pth.

    model = RWKV.from_pretrained("base.pth")
    add_lora(model, r=16, alpha=32, dropout=0.01, parts="att,ffn,time,ln", layers="0-3 20-23")
    ... train the parameters with requires_grad ...
    save_lora(model, "lora.pth")                          # the trainable subset and the LoRA settings only
    python lora.py base.pth lora.pth merged.pth           # W += alpha/r * B @ A, loadable by RWKV.from_pretrained

parts: 'att' LoRA on receptance/key/value/output, 'ffn' LoRA on key/value, 'time' trains the token-shift mixes,
w0/a0/v0/k_k/k_a/r_k and the built-in decay/a/v/gate low-rank matrices in full, 'ln' trains ln0/ln1/ln2 and ln_x
in full (not ln_out). Embedding, head and ln_out stay frozen. add_lora_hybrid does the same on the RWKV layers of a
model.Hybrid (train_distill.py).
"""
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

PARTS = ("att", "ffn", "time", "ln")


class LoraLinear(nn.Linear):
    """nn.Linear plus (alpha/r) * B(A(dropout(x))); A kaiming-uniform, B zero, so training starts from the base."""

    def forward(self, x):
        return super().forward(x) + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.lora_scale


def parse_layers(spec, n_layer):
    """'0-3 25-31' (or '0,5', or a list) -> a set of layer indices; '' or None = all layers."""
    if spec in ("", None):
        return set(range(n_layer))
    items = spec if isinstance(spec, (list, tuple)) else str(spec).replace(",", " ").split()
    layers = set()
    for item in map(str, items):
        lo, _, hi = item.partition("-")
        layers.update(range(int(lo), int(hi or lo) + 1))
    if not layers <= set(range(n_layer)):
        raise ValueError(f"lora_layers {spec!r} out of range for a model with {n_layer} layers")
    return layers


def lora_linear(lin, r, alpha, dropout):
    """Give an nn.Linear a trainable zero update B @ A, in place (its module, names and weight stay)."""
    w = lin.weight
    lin.lora_A = nn.Parameter(torch.empty(r, w.shape[1], device=w.device, dtype=w.dtype))
    lin.lora_B = nn.Parameter(torch.zeros(w.shape[0], r, device=w.device, dtype=w.dtype))
    nn.init.kaiming_uniform_(lin.lora_A, a=math.sqrt(5))
    lin.lora_scale, lin.lora_dropout = alpha / r, nn.Dropout(dropout)
    lin.__class__ = LoraLinear


def start_lora(model, r, alpha, dropout, parts, layers):
    """Check the settings, freeze the model and record them as model.lora_config. -> the list of parts."""
    parts = [p.strip() for p in parts.split(",")] if isinstance(parts, str) else list(parts)
    if r <= 0 or not set(parts) <= set(PARTS):
        raise ValueError(f"need lora r > 0 and parts among {PARTS}, got r={r}, parts={parts}")
    model.requires_grad_(False)
    model.lora_config = dict(r=r, alpha=alpha, dropout=dropout, parts=",".join(parts), layers=layers)
    return parts


def add_lora_hybrid(hybrid, r, alpha, dropout=0.0, parts="att,time,ln", layers=""):
    """add_lora for a model.Hybrid, on its RWKV layers (those in `layers`) only: 'att' LoRA on the time-mixer's
    receptance/key/value/output, 'ffn' LoRA on the decoder layer's MLP projections, 'time' the time-mixer's own
    tensors in full, 'ln' its ln_x and the decoder layer's norms in full. Everything else is frozen."""
    parts = start_lora(hybrid, r, alpha, dropout, parts, layers)
    decoder_layers = hybrid.hf.model.layers
    for i in sorted(parse_layers(layers, len(decoder_layers)) & set(hybrid.rwkv_layers)):
        layer = decoder_layers[i]
        att = layer.self_attn.student
        linears = ([att.receptance, att.key, att.value, att.output] if "att" in parts else []) + \
                  ([m for m in layer.mlp.modules() if isinstance(m, nn.Linear)] if "ffn" in parts else [])
        for lin in linears:
            lora_linear(lin, r, alpha, dropout)
        if "time" in parts:
            for p in att.parameters(recurse=False):
                p.requires_grad_(True)
        if "ln" in parts:
            att.ln_x.requires_grad_(True)
            for name, child in layer.named_children():
                if "norm" in name:
                    child.requires_grad_(True)
    return hybrid


def add_lora(model, r, alpha, dropout=0.0, parts="att,ffn,time,ln", layers=""):
    """Freeze `model` (an RWKV) and make the chosen subset trainable. Linears keep their module, names and weight
    (the class is swapped in place), so the state dict stays the official one plus `*.lora_A` / `*.lora_B`."""
    parts = start_lora(model, r, alpha, dropout, parts, layers)
    for i in sorted(parse_layers(layers, len(model.blocks))):
        block = model.blocks[i]
        att, ffn = block.att, block.ffn
        linears = ([att.receptance, att.key, att.value, att.output] if "att" in parts else []) + \
                  ([ffn.key, ffn.value] if "ffn" in parts else [])
        for lin in linears:
            lora_linear(lin, r, alpha, dropout)
        if "time" in parts:  # everything of att/ffn that is not an r/k/v/o/key/value Linear
            for mod in (att, ffn):
                for p in mod.parameters(recurse=False):
                    p.requires_grad_(True)
        if "ln" in parts:
            for norm in [m for m in block.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))]:
                norm.requires_grad_(True)
    return model


def lora_state_dict(model):
    """The trainable subset only (LoRA matrices, and time/ln tensors when they train), on the CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_lora(model, path):
    torch.save(dict(lora_config=model.lora_config, weights=lora_state_dict(model)), f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def load_lora(model, path_or_ckpt):
    """Resume: add the LoRA described in a save_lora file to a base model, then load its tensors (all must match)."""
    ckpt = torch.load(path_or_ckpt, map_location="cpu", weights_only=True) if isinstance(path_or_ckpt, str) \
        else path_or_ckpt
    add_lora(model, **ckpt["lora_config"])
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = params.keys() - ckpt["weights"].keys(), ckpt["weights"].keys() - params.keys()
    if missing or unexpected:
        raise ValueError(f"LoRA checkpoint does not match the model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(ckpt["weights"][n])
    return model


@torch.no_grad()
def merge_state_dict(sd, scale, dtype=torch.bfloat16):
    """A full state dict with LoRA tensors -> the official layout: every W with a W.lora_A/B pair becomes
    W + scale * B @ A (computed in fp32, scale = alpha / r); lora_* dropped. Works on a gathered FSDP state dict."""
    out = {}
    for name, t in sd.items():
        if ".lora_" in name:
            continue
        prefix = name[:-len("weight")]
        if name.endswith(".weight") and prefix + "lora_A" in sd:
            t = t.float() + (sd[prefix + "lora_B"].float() @ sd[prefix + "lora_A"].float()) * scale
        out[name] = t.detach().to("cpu", dtype).contiguous()
    return out


def merged_state_dict(model, dtype=torch.bfloat16):
    """The merged official layout of a model that has add_lora's LoRA."""
    return merge_state_dict(model.state_dict(), model.lora_config["alpha"] / model.lora_config["r"], dtype)


def merge_files(base_path, lora_path, out_path, dtype=torch.bfloat16):
    from model import RWKV
    model = load_lora(RWKV.from_pretrained(base_path), lora_path)
    torch.save(merged_state_dict(model, dtype), f"{out_path}.tmp")
    os.replace(f"{out_path}.tmp", out_path)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python lora.py BASE.pth LORA.pth OUT.pth   (writes the merged model in bf16)")
    merge_files(*sys.argv[1:])
