"""The hybrid wrapper: a tiny random Qwen2 (q/k/v biases, GQA, tied embeddings) with attention layers replaced."""
import copy
import os
import subprocess
import sys

import pytest
import torch

from helpers import rel_err
from model import Hybrid, HybridState

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import repeat_kv  # noqa: E402


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   max_position_embeddings=512, initializer_range=0.2)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    assert model.model.layers[0].self_attn.head_dim == 64 and model.model.layers[0].self_attn.q_proj.bias is not None
    return model


def test_zero_layers_is_the_teacher(teacher):
    idx = torch.randint(0, 300, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(Hybrid(copy.deepcopy(teacher), "none")(idx)[0], teacher(idx).logits)


def test_student_heads_are_the_teachers_repeat_kv_heads(teacher):
    hybrid = Hybrid(copy.deepcopy(teacher), [1, 3])
    x = torch.randn(2, 7, 256)
    for i in (1, 3):
        attn, student = teacher.model.layers[i].self_attn, hybrid.hf.model.layers[i].self_attn.student
        with torch.no_grad():
            for proj, mine in [(attn.k_proj, student.key), (attn.v_proj, student.value)]:
                theirs = repeat_kv(proj(x).view(2, 7, 2, 64).transpose(1, 2), 2)  # (B, H, T, N)
                assert torch.equal(mine(x).view(2, 7, 4, 64).transpose(1, 2), theirs)
            assert torch.equal(student.receptance(x), attn.q_proj(x))
            assert torch.equal(student.output.weight, attn.o_proj.weight)
    assert hybrid.hf.model.layers[1].self_attn.student.is_first and not hasattr(
        hybrid.hf.model.layers[1].self_attn.student, "v0")


def test_align_mode_is_teacher_forced(teacher):
    """Stage 1: every layer gets and passes on the teacher's residual stream (its inputs and outputs equal the
    teacher's layer by layer, students far from their teachers), nothing after the last RWKV layer runs, only
    students get gradients."""
    hybrid = Hybrid(copy.deepcopy(teacher), [0, 2], keep_teacher_attention=True)
    hybrid.set_trainable("student")
    with torch.no_grad():
        for p in hybrid.student_parameters():
            p.add_(torch.randn_like(p) * 0.5)
    idx = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(1))
    seen = {}  # (model, layer) -> (input, output) hidden states
    hooks = [layer.register_forward_hook(lambda m, args, out, key=(name, i): seen.__setitem__(key, (args[0], out)))
             for name, model in (("hybrid", hybrid.hf), ("teacher", teacher))
             for i, layer in enumerate(model.model.layers)]
    hooks.append(hybrid.hf.lm_head.register_forward_hook(lambda *_: seen.__setitem__("head", True)))
    logits, loss, _ = hybrid(idx, align=True)
    with torch.no_grad():
        teacher(idx)
    for h in hooks:
        h.remove()
    assert logits is None and loss.item() > 0.1 and "head" not in seen and ("hybrid", 3) not in seen
    for i in range(3):
        for mine, theirs in zip(seen["hybrid", i], seen["teacher", i]):
            mine, theirs = (o[0] if isinstance(o, tuple) else o for o in (mine, theirs))
            assert rel_err(mine, theirs) <= 1e-6, i
    loss.backward()
    trained = {n for n, p in hybrid.named_parameters() if p.grad is not None}
    assert trained and all(".student." in n for n in trained)
    assert len(trained) == len(hybrid.student_parameters())


@pytest.mark.parametrize("layers", ["all", [0, 2]], ids=["all-rwkv", "two-attention-kept"])
def test_generation_with_state_equals_full_recompute(teacher, layers):
    hybrid = Hybrid(copy.deepcopy(teacher), layers).eval()
    with torch.no_grad():  # make the students non-trivial
        for p in hybrid.student_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    prompt = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, _, state = hybrid(prompt, last_only=True)
        cached = [logits[0, -1].argmax().item()]
        for _ in range(31):
            logits, _, state = hybrid(torch.tensor([[cached[-1]]]), state=state)
            cached.append(logits[0, -1].argmax().item())
        seq, recomputed = prompt, []
        for _ in range(32):
            nxt = hybrid(seq)[0][0, -1].argmax().item()
            recomputed.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
        assert cached == recomputed and len(set(cached)) > 1
        # a multi-token continuation after a cache equals the whole sequence at once
        full = hybrid(seq)[0]
        a, _, s = hybrid(seq[:, :20])
        b, _, _ = hybrid(seq[:, 20:], state=s)
        assert rel_err(torch.cat([a, b], 1), full) <= 1e-5
        # one state seeds several samples without being modified
        many = state.map(lambda t: t.repeat_interleave(3, 0))
        out = hybrid(torch.tensor([[5], [5], [5]]), state=many)[0]
        assert rel_err(out[1], out[0]) <= 1e-6 and state.length == many.length


def test_prompts_of_different_lengths_batch(teacher):
    """Prompts of 3, 7 and 12 tokens prefilled apart, stacked (KV caches left-padded to 12 slots) and each row
    copied twice, then fed the same 10 tokens: each row's logits are those of its prompt decoded alone, and of one
    parallel forward over prompt + tokens; greedy generation on the batch is each prompt's own."""
    from sample import cat_states, expand_state, generate, prefill
    hybrid = Hybrid(copy.deepcopy(teacher), [0, 2]).eval()  # layers 1 and 3 keep attention
    with torch.no_grad():
        for p in hybrid.student_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (3, 7, 12)]
    nxt = torch.randint(0, 300, (3, 10), generator=g)
    prefilled = [prefill(hybrid, p) for p in prompts]
    stacked = cat_states([s for _, s in prefilled])
    assert stacked.pad.tolist() == [9, 5, 0] and stacked.length == 12
    state, tokens = expand_state(stacked, 2), nxt.repeat_interleave(2, 0)
    assert state.pad.tolist() == [9, 9, 5, 5, 0, 0]
    with torch.no_grad():
        steps = []
        for t in range(10):
            logits, _, state = hybrid(tokens[:, t:t + 1], state=state)
            steps.append(logits[:, 0])
        batched = torch.stack(steps, 1)  # (6, 10, V)
        chunk = hybrid(tokens, state=expand_state(stacked, 2))[0]  # the 10 tokens in one call after the padded cache
        assert rel_err(chunk, batched) <= 1e-5
        for i, (p, (_, s)) in enumerate(zip(prompts, prefilled)):
            alone = []
            for t in range(10):
                logits, _, s = hybrid(nxt[i:i + 1, t:t + 1], state=s)
                alone.append(logits[0, 0])
            alone = torch.stack(alone)
            full = hybrid(torch.tensor([p + nxt[i].tolist()]))[0][0, len(p):]
            for row in (2 * i, 2 * i + 1):
                assert rel_err(batched[row], alone) <= 1e-5 and rel_err(batched[row], full) <= 1e-5
    logits = torch.cat([lg for lg, _ in prefilled])
    batch = generate(hybrid, logits, stacked, 12, [torch.Generator()] * 3, temperature=0)[0]
    for (lg, s), row in zip(prefilled, batch):
        assert generate(hybrid, lg, s, 12, [torch.Generator()], temperature=0)[0][0] == row
    assert len({tuple(row) for row in batch}) == 3


def test_save_load_identical(teacher, tmp_path):
    hybrid = Hybrid(copy.deepcopy(teacher), [1, 2, 3]).eval()
    hybrid.untie_embeddings()
    with torch.no_grad():
        hybrid.hf.lm_head.weight.mul_(1.5)  # untied: the head differs from the embedding now
    hybrid.save_pretrained(tmp_path / "h")
    loaded = Hybrid.from_pretrained(tmp_path / "h").eval()
    idx = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], hybrid(idx)[0])
    assert loaded.rwkv_layers == [1, 2, 3]
    with pytest.raises(ValueError, match="not a hybrid directory"):
        Hybrid.from_pretrained(tmp_path)
    assert isinstance(hybrid(idx)[2], HybridState)
    # the directory carries its own model.py: it loads in a fresh interpreter outside this repository
    torch.save(idx, tmp_path / "idx.pt")
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from model import Hybrid; "
            "m = Hybrid.from_pretrained(sys.argv[1]).eval(); idx = torch.load(sys.argv[2]); "
            "torch.save(m(idx)[0].detach(), sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "h"), str(tmp_path / "idx.pt"),
                    str(tmp_path / "out.pt")], check=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt"), hybrid(idx)[0])
