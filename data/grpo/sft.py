"""
A tiny character-level RWKV-7 trained supervised on a prompt file: the starting point of the CPU GRPO demo.

    python data/grpo/sft.py --prompts=data/grpo/arith12/train.jsonl --out_dir=out-arith-sft --steps=300

Each example is prompt + answer + '\\n'; the loss is on the answer and the newline only. Writes out_dir/meta.json
(the character table) and out_dir/ckpt.pt ({'model': official-layout weights, 'config': {'tokenizer': ...}}), which
train_grpo.py and sample.py load as init_from=out_dir.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.grpo.tasks import load_prompts  # noqa: E402
from model import RWKV, RWKVConfig  # noqa: E402

CHARS = "\n*+-0123456789="  # every character of the arithmetic task


def sft(records, out_dir, n_layer=2, n_embd=64, head_size=16, steps=300, batch_size=64, lr=3e-3, seed=0,
        log_every=0):
    """Train from the authors' init on `records` ({'prompt', 'answer'}), save to out_dir; -> the model."""
    os.makedirs(out_dir, exist_ok=True)
    meta = os.path.join(out_dir, "meta.json")
    with open(meta, "w") as f:
        json.dump({"chars": CHARS, "vocab_size": len(CHARS)}, f)
    stoi = {c: i for i, c in enumerate(CHARS)}
    bad = {c for r in records for c in r["prompt"] + r["answer"] if c not in stoi}
    if bad:
        raise ValueError(f"characters {sorted(bad)} are not in the arithmetic character table {CHARS!r}")
    torch.manual_seed(seed)
    model = RWKV(RWKVConfig(n_layer=n_layer, n_embd=n_embd, head_size=head_size, vocab_size=len(CHARS),
                            wkv_impl="torch"))
    opt = model.configure_optimizer(0.0, lr)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        batch = [records[i] for i in torch.randint(len(records), (batch_size,), generator=g).tolist()]
        seqs = [[stoi[c] for c in r["prompt"] + r["answer"] + "\n"] for r in batch]
        T = max(len(s) for s in seqs)
        x = torch.zeros(batch_size, T - 1, dtype=torch.long)
        y = torch.full((batch_size, T - 1), -1, dtype=torch.long)
        for i, (s, r) in enumerate(zip(seqs, batch)):
            x[i, :len(s) - 1] = torch.tensor(s[:-1])
            n = len(r["prompt"])
            y[i, n - 1:len(s) - 1] = torch.tensor(s[n:])  # answer + newline only
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0) * min(1.0, (step + 1) / 20)
        _, loss, _ = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"sft step {step} | loss {loss.item():.4f} | {time.time() - t0:.1f}s", flush=True)
    torch.save(dict(model=model.state_dict(), config={"tokenizer": f"char:{os.path.abspath(meta)}"}),
               os.path.join(out_dir, "ckpt.pt"))
    return model.eval()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True)
    p.add_argument("--out_dir", required=True)
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--n_embd", type=int, default=64)
    p.add_argument("--head_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    try:
        sft(load_prompts(a.prompts), a.out_dir, a.n_layer, a.n_embd, a.head_size, a.steps, a.batch_size, a.lr,
            a.seed, log_every=50)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"saved {a.out_dir}/ckpt.pt")
