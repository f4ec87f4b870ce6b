"""Long-context training (seed (d)): state checkpointing (RWKV.forward_segments) and ctx_parts (wkv7's part_len)
give the plain full-sequence loss and gradients, also when the parts do not divide the sequence; in
train_pretrain.py they train like the plain run, also under torchrun (DDP, FSDP2), and the context warm-up is logged and
resumes at the right length."""
import re

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from helpers import random_model, rel_err
from test_pretrain import TINY, TORCHRUN, assert_same_state, ckpt, epoch_lines, train

T = 256


@pytest.fixture(scope="module")
def setup():
    model = random_model(n_layer=2, n_embd=64, vocab_size=97).train()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 97, (2, T), generator=g)
    targets = torch.randint(0, 97, (2, T), generator=g)
    targets[0, 10:40] = -1  # ignored tokens, unevenly spread: the mean must be token-weighted over the whole T
    targets[1, 200:] = -1
    loss, grads = run(model, lambda: model(idx, targets)[1])
    return model, idx, targets, loss, grads


def run(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def check(loss, grads, ref_loss, ref_grads):
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    worst = max(grads, key=lambda n: rel_err(grads[n], ref_grads[n]))
    assert rel_err(grads[worst], ref_grads[worst]) <= 1e-5, f"{worst}: {rel_err(grads[worst], ref_grads[worst]):.2e}"


@pytest.mark.parametrize("parts, block_cp", [(4, False), (7, False), (4, True)])
def test_state_checkpointing_equals_full_sequence(setup, parts, block_cp):
    """block_cp: with grad_checkpointing too (each block recomputed inside each recomputed segment)."""
    model, idx, targets, ref_loss, ref_grads = setup
    segment_len = -(-T // parts)  # 7 parts: six of 37 tokens and one of 34
    model.grad_checkpointing = block_cp
    try:
        loss, grads = run(model, lambda: model.forward_segments(idx, targets, segment_len)[1])
    finally:
        model.grad_checkpointing = False
    check(loss, grads, ref_loss, ref_grads)


def test_l2wrap_is_visible_at_this_tolerance(setup):
    """L2Wrap's push moves the gradients by far more than 1e-5, so a segment using its own 1e-4 / (B*T_s) (4x or
    7x the push) would fail the comparisons above."""
    model, idx, targets, _, ref_grads = setup

    def ce_only():
        logits = model(idx)[0]
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1), ignore_index=-1)
    _, grads = run(model, ce_only)
    assert rel_err(grads["head.weight"], ref_grads["head.weight"]) > 1e-4


@pytest.mark.parametrize("parts", [4, 7])
def test_ctx_parts_equals_full_sequence(setup, parts, monkeypatch):
    model, idx, targets, ref_loss, ref_grads = setup
    lengths, inner = [], model_module.wkv7_chunked  # record the WKV calls: the parts must really happen
    monkeypatch.setattr(model_module, "wkv7_chunked", lambda r, *a: lengths.append(r.shape[1]) or inner(r, *a))
    model.set_wkv_part_len(-(-T // parts))
    try:
        loss, grads = run(model, lambda: model(idx, targets)[1])
    finally:
        model.set_wkv_part_len(0)
    L = -(-T // parts)
    assert lengths == ([L] * (parts - 1) + [T - (parts - 1) * L]) * model.config.n_layer, lengths
    check(loss, grads, ref_loss, ref_grads)


def test_segments_carry_the_state(setup):
    """Without the carried state (each segment from zeros) the loss differs: the comparisons above can fail."""
    model, idx, targets, ref_loss, _ = setup
    with torch.no_grad():
        cut = sum(model(idx[:, t:t + 64], targets[:, t:t + 64])[1] * (targets[:, t:t + 64] != -1).sum()
                  for t in range(0, T, 64)) / (targets != -1).sum()
        carried = model.forward_segments(idx, targets, 64)[1]
    assert abs(carried.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    assert abs(cut.item() - ref_loss.item()) > 1e-3


# --- train_pretrain.py: ctx_parts, state_cp and the context warm-up -------------------------------------------

WARM = ["--ctx_len=32", "--initial_ctx_len=8", "--ctx_warmup_steps=4", "--max_iters=6", "--eval_interval=3"]


def ctx_lengths(text):
    return [int(n) for n in re.findall(r"step \d+/\d+ \|.*\| ctx (\d+)\n", text)]


def test_trainer_warmup_and_exact_long_context_options(shakespeare, tmp_path):
    """Context warm-up 8 -> 32 tokens over 4 steps, in the log. state_cp and ctx_parts=3 (parts of 11, 11, 10 tokens)
    train like the plain run (same losses within 1e-4), and a state_cp run stopped during the warm-up resumes at the
    right length."""
    common = [f"--data_dir={shakespeare}", *TINY, *WARM]
    ref = train(f"--out_dir={tmp_path / 'ref'}", *common)
    assert ctx_lengths(ref.stdout) == [8, 14, 20, 26, 32, 32]
    cp = [f"--out_dir={tmp_path / 'cp'}", *common, "--state_cp=True", "--ctx_parts=3"]
    first = train(*cp, "--exit_step=2")
    second = train(*cp, "--init_from=resume")
    assert "resumed from" in second.stdout and ctx_lengths(first.stdout + second.stdout) == ctx_lengths(ref.stdout)
    train(f"--out_dir={tmp_path / 'parts'}", *common, "--ctx_parts=3")
    want = epoch_lines(tmp_path / "ref")
    assert len(want) == 6 and float(want[-1][1]) < float(want[0][1]) - 0.3  # it trained
    for run in ("cp", "parts"):
        got = epoch_lines(tmp_path / run)
        assert [(e, lr) for e, _, lr in got] == [(e, lr) for e, _, lr in want], run
        assert max(abs(float(a) - float(b)) for (_, a, _), (_, b, _) in zip(got, want)) <= 1e-4, (run, got, want)


@pytest.fixture(scope="module")
def state_cp_single(shakespeare, tmp_path_factory):
    out = tmp_path_factory.mktemp("state_cp_single")
    train(f"--data_dir={shakespeare}", f"--out_dir={out}", *TINY, "--max_iters=5", "--eval_interval=5",
          "--state_cp=True", "--ctx_parts=3")
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_state_cp_under_torchrun_matches_single_process(shakespeare, state_cp_single, tmp_path, parallel):
    """state_cp with 2 processes x batch 4 (gloo) = 1 process x batch 8: the same losses (<= 1e-5) over 5 steps and
    the same weights (<= 1e-5). Under DDP the gradients are averaged by hand (without it the losses differ from
    step 1 by > 0.05); under FSDP2 every segment's forward and recomputation gathers the shards."""
    p = train(f"--data_dir={shakespeare}", f"--out_dir={tmp_path}", *TINY, "--max_iters=5", "--eval_interval=5",
              "--state_cp=True", "--ctx_parts=3", "--batch_size=4", f"--parallel={parallel}", launcher=TORCHRUN)
    assert f"2 x CPU, 1 threads, {parallel}" in p.stdout
    ours, ref = epoch_lines(tmp_path), epoch_lines(state_cp_single)
    assert len(ours) == len(ref) == 5 and float(ref[-1][1]) < float(ref[0][1]) - 0.5  # it trained
    assert max(abs(float(a) - float(b)) for (_, a, _), (_, b, _) in zip(ours, ref)) <= 1e-5, (ours, ref)
    assert_same_state(ckpt(tmp_path), ckpt(state_cp_single), atol=1e-5)


# --- the hybrid (train_distill.py stage 3): Hybrid.forward_segments and ctx_parts ---------------------------------

def tiny_hybrid(layers, keep_teacher_attention=False):
    """A tiny random Qwen2 (GQA, q/k/v biases, tied embeddings) with the attention of `layers` replaced by noisy
    RWKV-7 time-mixers."""
    import transformers
    from model import Hybrid
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                   max_position_embeddings=512, initializer_range=0.1)
    hybrid = Hybrid(transformers.AutoModelForCausalLM.from_config(cfg), layers, keep_teacher_attention=keep_teacher_attention)
    with torch.no_grad():  # students start as copies of the attention: make every tensor matter
        for p in hybrid.student_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hybrid.train()


@pytest.fixture(scope="module", params=["all", [0, 2]], ids=["all-rwkv", "two-attention-kept"])
def hybrid_setup(request):
    """A tiny hybrid with every attention layer, or layers 0 and 2, replaced; its plain full-sequence loss and
    gradients on T = 256."""
    hybrid = tiny_hybrid(request.param)
    hybrid.set_trainable("all")
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 300, (2, T), generator=g)
    targets = torch.randint(0, 300, (2, T), generator=g)
    targets[0, :50] = -1  # SFT: prompt tokens are not trained, unevenly over the rows
    targets[1, 120:160] = -1
    loss, grads = run(hybrid, lambda: hybrid(idx, targets)[1])
    return hybrid, idx, targets, loss, grads


@pytest.mark.parametrize("parts", [4, 7])
def test_hybrid_state_cp_and_ctx_parts_equal_full_sequence(hybrid_setup, parts, monkeypatch):
    hybrid, idx, targets, ref_loss, ref_grads = hybrid_setup
    L = -(-T // parts)
    loss, grads = run(hybrid, lambda: hybrid.forward_segments(idx, targets, L)[1])
    check(loss, grads, ref_loss, ref_grads)
    lengths, inner = [], model_module.wkv7_chunked  # record the WKV calls: the parts must really happen
    monkeypatch.setattr(model_module, "wkv7_chunked", lambda r, *a: lengths.append(r.shape[1]) or inner(r, *a))
    hybrid.set_wkv_part_len(L)
    try:
        loss, grads = run(hybrid, lambda: hybrid(idx, targets)[1])
    finally:
        hybrid.set_wkv_part_len(0)
    assert lengths == ([L] * (parts - 1) + [T - (parts - 1) * L]) * len(hybrid.rwkv_layers), lengths
    check(loss, grads, ref_loss, ref_grads)
    with torch.no_grad():  # cut segments (each from a zero state) give another loss: the comparison can fail
        cut = sum(hybrid(idx[:, t:t + L], targets[:, t:t + L])[1] * (targets[:, t:t + L] != -1).sum()
                  for t in range(0, T, L)) / (targets != -1).sum()
    assert abs(cut.item() - ref_loss.item()) > 1e-3


def test_state_holds_only_itself(setup):
    """What state_cp keeps between segments is the state alone: no state tensor is a view into its segment's
    activations (a token-shift state x[:, -1] as a view would keep the whole (B, T_s, C) tensor alive)."""
    model, idx, targets, _, _ = setup
    _, _, state = model(idx[:, :64], targets[:, :64])
    for layer in state:
        for t in layer:
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_hybrid_grad_checkpointing_is_exact(hybrid_setup):
    """The hybrid's per-layer checkpointing (each decoder layer recomputed in backward, its state and v_first passed
    in so that the recompute reads what the forward read) gives the plain gradients, alone and inside state_cp."""
    hybrid, idx, targets, ref_loss, ref_grads = hybrid_setup
    hybrid.grad_checkpointing = True
    try:
        check(*run(hybrid, lambda: hybrid(idx, targets)[1]), ref_loss, ref_grads)
        check(*run(hybrid, lambda: hybrid.forward_segments(idx, targets, 64)[1]), ref_loss, ref_grads)
    finally:
        hybrid.grad_checkpointing = False


def test_hybrid_grad_checkpointing_in_align_mode():
    """Stage 1 (align: the teacher attention beside each student) with per-layer checkpointing: the same gradients."""
    hybrid = tiny_hybrid([1, 3], keep_teacher_attention=True)
    hybrid.set_trainable("student")
    idx = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(2))
    ref_loss, ref_grads = run_trainable(hybrid, lambda: hybrid(idx, align=True)[1])
    hybrid.grad_checkpointing = True
    check(*run_trainable(hybrid, lambda: hybrid(idx, align=True)[1]), ref_loss, ref_grads)


def run_trainable(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
