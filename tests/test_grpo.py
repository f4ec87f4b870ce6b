"""GRPO (train_grpo.py): the objective against hand-computed numbers, rollouts from cloned recurrent states, log-probs
of the parallel forward vs sampling time (RWKV and a hybrid), rewards, bad input, and the CPU demo: a tiny RWKV-7
trained supervised on 1-2 digit addition, then GRPO raises its held-out greedy accuracy by >= 15 points."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from data.grpo.sft import sft
from data.grpo.tasks import (arith_prompts, arith_reward, digits_reward, extract_answer, format_reward, gsm8k_prompts,
                             gsm8k_reward, is_heldout, parse_rewards)
from helpers import random_model
from model import Hybrid
from train_grpo import (completion_text, group_advantages, grpo_loss, pack_rollouts, rollout, token_logprobs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- the objective -------------------------------------------------------------------------------------------

def test_clipping_on_both_sides_hand_computed():
    # row 0: A = +1, ratios 1.5 (above 1 + eps_high = 1.28: clipped, no gradient) and 0.5 (below 0.8 but A > 0:
    # the unclipped term is the min, gradient A * ratio = 0.5). row 1: A = -1, ratio 0.5 (clipped at 0.8: no
    # gradient) and 1.5 (above 1.28 but A < 0: unclipped, gradient -1.5).
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5], [0.5, 1.5]])).requires_grad_()
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 2)
    loss, st = grpo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, loss_type="token")
    # per-token loss = -min(r A, clip(r) A): [-1.28, -0.5], [0.8, 1.5]; mean over 4 tokens
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 0.8 + 1.5) / 4, abs=1e-6)
    loss.backward()
    expected = torch.tensor([[0.0, -0.5], [0.0, 1.5]]) / 4
    assert torch.allclose(logp.grad, expected, atol=1e-6)
    assert (st["clip_low"], st["clip_high"], st["tokens"]) == (1.0, 1.0, 4.0)
    # inside the trust region nothing is clipped: loss = -mean(r A), gradient -A r / n
    logp2 = torch.log(torch.tensor([[1.1, 0.9], [0.9, 1.1]])).requires_grad_()
    loss2, st2 = grpo_loss(logp2, old, adv, mask, eps_low=0.2, eps_high=0.28)
    loss2.backward()
    assert loss2.item() == pytest.approx(-(1.1 + 0.9 - 0.9 - 1.1) / 4, abs=1e-6)
    assert torch.allclose(logp2.grad, torch.tensor([[-1.1, -0.9], [0.9, 1.1]]) / 4, atol=1e-6)
    assert st2["clip_low"] == st2["clip_high"] == 0


def test_token_vs_sequence_normalisation_hand_computed():
    # ratio 1 everywhere: per-token loss = -A. Row 0 (A = 1) has 3 tokens, row 1 (A = -2) has 1 token.
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    adv = torch.tensor([1.0, -2.0])
    tok, _ = grpo_loss(logp, logp.detach(), adv, mask, loss_type="token")
    seq, _ = grpo_loss(logp, logp.detach(), adv, mask, loss_type="sequence")
    dr, _ = grpo_loss(logp, logp.detach(), adv, mask, loss_type="dr_grpo", normaliser=2 * 4)
    assert tok.item() == pytest.approx((-1 - 1 - 1 + 2) / 4)  # over the batch's 4 tokens
    assert seq.item() == pytest.approx((-1 + 2) / 2)  # per-sequence means, then their mean
    assert dr.item() == pytest.approx((-1 - 1 - 1 + 2) / 8)  # constant: 2 completions x max length 4
    g_tok = torch.autograd.grad(tok, logp)[0]
    g_seq = torch.autograd.grad(seq, logp)[0]
    assert torch.allclose(g_tok, torch.tensor([[-1, -1, -1], [2, 0, 0]]) / 4)
    assert torch.allclose(g_seq, torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [1, 0, 0]]))  # (1/2) d(mean)
    # a micro-batch's share with the global normaliser: the parts add up to the whole
    parts = sum(grpo_loss(logp[i:i + 1], logp[i:i + 1].detach(), adv[i:i + 1], mask[i:i + 1], loss_type=t,
                          normaliser=n)[0] for i in range(2) for t, n in [("token", 4)])
    assert parts.item() == pytest.approx(tok.item())


def test_k3_kl_value_and_gradient():
    # ref - logp = d: k3 = e^d - d - 1; d = ln 2 -> 1 - ln 2; d = 0 -> 0. d k3 / d logp = 1 - e^d.
    logp = torch.tensor([[0.0, math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(2.0), math.log(0.5)]])
    adv, mask = torch.zeros(1), torch.ones(1, 2)  # A = 0: only the KL term remains
    loss, st = grpo_loss(logp, logp.detach(), adv, mask, ref_logp=ref, beta=0.5)
    assert st["kl"] == pytest.approx(1 - math.log(2), abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * (1 - math.log(2)) / 2, abs=1e-6)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.5 * (1 - 2.0) / 2, 0.0]]), atol=1e-6)


def test_advantages_are_per_group_not_per_batch():
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0])
    adv = group_advantages(rewards, 4, scale=True, eps=0.0)
    # group 0: mean 0.25, unbiased std 0.5; group 1: mean 0.75, std 0.5
    assert torch.allclose(adv, torch.tensor([1.5, -0.5, -0.5, -0.5, 0.5, 0.5, 0.5, -1.5]))
    assert torch.allclose(group_advantages(rewards, 4, scale=False),
                          torch.tensor([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75]))
    # a whole-batch baseline (mean 0.5) would give the first completion 0.5, not 0.75
    assert group_advantages(torch.ones(4), 4).abs().max() == 0  # an all-equal group carries no signal


def test_one_step_moves_log_probs_the_right_way():
    model = random_model(0, n_layer=2, n_embd=64, head_size=16, vocab_size=20, wkv_impl="torch").train()
    prompt = [1, 2, 3]
    rows = [dict(prompt=prompt, ids=[5, 6, 7], logps=[0.0] * 3), dict(prompt=prompt, ids=[8, 9], logps=[0.0] * 2)]
    ids, mask, _ = pack_rollouts(rows, "cpu")

    def seq_logp():
        with torch.no_grad():
            return (token_logprobs(model, ids)[0] * mask).sum(1)
    before = seq_logp()
    adv = group_advantages(torch.tensor([1.0, 0.0]), 2)  # +0.707, -0.707
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logp, _ = token_logprobs(model, ids)
    loss, _ = grpo_loss(logp, logp.detach(), adv, mask, eps_low=0.2, eps_high=0.28)
    loss.backward()
    opt.step()
    after = seq_logp()
    assert after[0] > before[0] + 1e-3 and after[1] < before[1] - 1e-3, (before, after)


# --- rollouts ------------------------------------------------------------------------------------------------

class NumTok:
    """A stand-in tokenizer: id i decodes to the letter chr(97 + i % 26); ids 0 and 1 end a reply (end-of-text and
    end-of-turn)."""
    eot_id, end_ids = 0, {0, 1}

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def check_rollouts(model, prompts, G, stop=()):
    tok = NumTok()
    seeds = [[torch.Generator().manual_seed(100 + p * G + g) for g in range(G)] for p in range(len(prompts))]
    rows = rollout(model, prompts, G, 12, [g for gs in seeds for g in gs], tok, temperature=1.0, top_p=0.9, stop=stop)
    # the same seeds, one prompt and one sample at a time, give the same completions
    for p, prompt in enumerate(prompts):
        for g in range(G):
            single = rollout(model, [prompt], 1, 12, [torch.Generator().manual_seed(100 + p * G + g)], tok, 1.0, 0.9,
                             stop)[0]
            assert single["ids"] == rows[p * G + g]["ids"]
    assert len({tuple(r["ids"]) for r in rows}) > len(prompts)  # the samples differ
    # the parallel forward over prompt + completion reproduces the sampling-time log-probs
    ids, mask, samp = pack_rollouts(rows, "cpu")
    with torch.no_grad():
        logp, _ = token_logprobs(model, ids)
    assert mask.sum() > 0 and ((logp - samp).abs() * mask).max() <= 1e-4
    return rows


def test_rollouts_rwkv_cloned_state_and_logprobs():
    model = random_model(1, n_layer=2, n_embd=64, head_size=16, vocab_size=40, wkv_impl="torch")
    rows = check_rollouts(model, [[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13, 14, 15]], G=4)
    assert any(r["truncated"] for r in rows)
    # a row ends at the first of either end token (end-of-text or end-of-turn), which the reward never sees
    assert {r["ids"][-1] for r in rows if not r["truncated"]} == NumTok.end_ids
    assert all(t not in NumTok.end_ids for r in rows for t in r["ids"][:-1])
    assert all(completion_text(NumTok(), r["ids"]) == NumTok().decode(r["ids"][:-1]) for r in rows if not r["truncated"])
    # stop strings: a row ends with the token that completes one; the reward text is cut before it
    rows = check_rollouts(model, [[3, 4, 5, 6]], G=6, stop=("c",))
    for r in rows:
        if not r["truncated"] and r["ids"][-1] not in NumTok.end_ids:
            assert NumTok().decode(r["ids"]).endswith("c") and "c" not in completion_text(NumTok(), r["ids"], ["c"])


def test_rollouts_hybrid_with_kv_cache_and_logprobs():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=40, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                   max_position_embeddings=256, initializer_range=0.2)
    hybrid = Hybrid(transformers.AutoModelForCausalLM.from_config(cfg), [0, 2]).eval()  # layers 1, 3 keep attention
    with torch.no_grad():
        for p in hybrid.student_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    # prompts of different lengths share one batch (their KV caches left-padded to a common length)
    check_rollouts(hybrid, [[3, 4, 5], [6, 7, 8], [9, 10, 11, 12, 13]], G=3)


# --- rewards and tasks -----------------------------------------------------------------------------------------

def test_rewards_on_hand_written_strings():
    assert extract_answer("so 3 + 4 = 7 apples.\n#### 1,234") == "1,234"
    assert extract_answer("The answer is \\boxed{\\frac{3}{4}} and 5 more") == "\\frac{3}{4}"
    assert extract_answer("First 12, then 15.5 in total.") == "15.5"
    assert extract_answer("no digits") is None
    assert gsm8k_reward("Natalia sold 48/2 = 24 clips... 48+24 = 72\n#### 72", "72") == 1.0
    assert gsm8k_reward("#### 72.0", "72") == 1.0 and gsm8k_reward("#### $1,000", "1000") == 1.0
    assert gsm8k_reward("It is \\boxed{0.75}", "3/4") == 1.0
    assert gsm8k_reward("I think 71.", "72") == 0.0 and gsm8k_reward("", "72") == 0.0
    assert gsm8k_reward("#### 7 then 72", "72") == 0.0  # the number right after #### counts, not the last one
    assert format_reward("work... #### 12", "x") == 1.0 and format_reward("\\boxed{12}", "x") == 1.0
    assert format_reward("the answer is 12", "x") == 0.0 and format_reward("\\boxed{twelve}", "x") == 0.0
    assert arith_reward("46", "46") == 1.0 and arith_reward(" 46\n", "46") == 1.0
    assert arith_reward("46 7", "46") == 0.0 and arith_reward("47", "46") == 0.0 and arith_reward("", "46") == 0
    assert arith_reward("-5", "-5") == 1.0
    assert digits_reward("83 + 13 = 96", "96") == 1.0 and digits_reward("96 + 79 = 165", "175") == 2 / 3
    assert digits_reward("#### 1175", "175") == 3 / 4 and digits_reward("#### 75", "175") == 2 / 3
    assert digits_reward("#### -96", "96") == 0.0 and digits_reward("no number", "96") == 0.0
    assert [(n, w) for n, _, w in parse_rewards("gsm8k:1.0, format:0.2")] == [("gsm8k", 1.0), ("format", 0.2)]
    with pytest.raises(ValueError, match="unknown reward 'acc'"):
        parse_rewards("acc")


def test_arith_task_deterministic_and_split(data_dir):
    a = arith_prompts(300, "train", digits=(2, 3), ops="+-*", seed=5)
    assert a == arith_prompts(300, "train", digits=(2, 3), ops="+-*", seed=5)
    assert a != arith_prompts(300, "train", digits=(2, 3), ops="+-*", seed=6)
    test = arith_prompts(100, "test", digits=(2, 3), ops="+-*", seed=5)
    assert not {r["prompt"] for r in a} & {r["prompt"] for r in test}
    for r in a[:50] + test[:50]:
        assert eval(r["prompt"][:-1]) == int(r["answer"])  # noqa: S307 (our own generated arithmetic)
        digits = [len(x) for x in re.findall(r"\d+", r["prompt"])]
        assert all(2 <= d <= 3 for d in digits)
    assert all(is_heldout(r["prompt"][:-1], 10) for r in test)
    q = arith_prompts(3, "test", digits=(2, 2), style="question")[0]
    assert q["prompt"].startswith("What is ") and "####" in q["prompt"]
    g = gsm8k_prompts(os.path.join(data_dir, "gsm8k", "test.jsonl"), limit=3)
    assert len(g) == 3 and g[0]["answer"] == "18" and "ducks" in g[0]["prompt"]


# --- the script: bad input, the CPU demo, exact resume, DDP ------------------------------------------------------

def grpo(*args, torchrun=0, timeout=600):
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", "--standalone"]
           if torchrun else [sys.executable]) + ["train_grpo.py", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
    """Prompt files for 1-2 digit addition and the supervised start (fixed seed): low but non-zero accuracy."""
    d = tmp_path_factory.mktemp("arith")
    subprocess.run([sys.executable, "data/grpo/prepare.py", "--task=arith", "--digits=1,2", f"--out={d}"], cwd=ROOT,
                   check=True, capture_output=True)
    from data.grpo.tasks import load_prompts
    torch.set_num_threads(1)
    sft(load_prompts(str(d / "train.jsonl")), str(d / "sft"), **SFT)
    return d


SFT = dict(n_layer=2, n_embd=64, head_size=16, steps=450, batch_size=64, lr=3e-3, seed=0)


def test_bad_input_is_one_line(arith, tmp_path):
    base = ["config/grpo_arith_tiny.py", f"--init_from={arith}/sft", f"--train_prompts={arith}/train.jsonl",
            f"--out_dir={tmp_path}", "--eval_prompts="]
    cases = [(["--rewards=arith,corect"], "unknown reward 'corect'"),
             ([f"--train_prompts={tmp_path}/nope.jsonl"], "prompt file not found"),
             (["--loss_type=seq"], "loss_type must be"),
             (["--group_size=1"], "group_size must be >= 2"),
             ([f"--init_from={tmp_path}/missing.pth"], "cannot load init_from"),
             (["--learnig_rate=1"], "unknown config key 'learnig_rate'")]
    for extra, message in cases:
        r = grpo(*base, *extra)
        assert r.returncode != 0 and message in r.stderr, (extra, r.stderr[-2000:])
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def eval_accuracies(stdout):
    return [float(m) for m in re.findall(r"eval arith accuracy ([\d.]+)", stdout)]


@pytest.mark.slow
def test_grpo_raises_heldout_greedy_accuracy(arith, tmp_path):
    """The CPU demo's first 50 steps (its lr is constant, so they are the demo's): held-out greedy accuracy rises by
    at least 0.15 (measured: 0.395 -> 0.650 at step 50, 0.765 at step 100)."""
    r = grpo("config/grpo_arith_tiny.py", f"--init_from={arith}/sft", f"--train_prompts={arith}/train.jsonl",
             f"--eval_prompts={arith}/test.jsonl", f"--out_dir={tmp_path}", "--max_steps=50", "--save_interval=50")
    assert r.returncode == 0, r.stderr[-3000:]
    acc = eval_accuracies(r.stdout)
    print(r.stdout)
    assert len(acc) == 2 and 0 < acc[0] < 0.5, acc  # the supervised start: low but not zero
    assert acc[-1] >= acc[0] + 0.15, acc
    lines = [json.loads(line) for line in open(tmp_path / "completions.jsonl")]
    assert lines and {"prompt", "completion", "reward", "advantage"} <= set(lines[0])
    # the saved policy loads with sample.load_model and is the one that was evaluated
    from sample import load_model
    model, spec = load_model(str(tmp_path))
    assert spec.startswith("char:") and isinstance(model.config.vocab_size, int)


def test_eval_only_and_max_minutes(arith, tmp_path):
    """max_steps=0 evaluates the start and writes no checkpoint; max_minutes stops training early, then the final
    eval and the save run as at max_steps."""
    common = ["config/grpo_arith_tiny.py", f"--init_from={arith}/sft", f"--train_prompts={arith}/train.jsonl",
              f"--eval_prompts={arith}/test.jsonl", "--eval_max_prompts=16", "--prompts_per_step=4"]
    r = grpo(*common, "--max_steps=0", f"--out_dir={tmp_path}/a")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(eval_accuracies(r.stdout)) == 1 and not (tmp_path / "a" / "ckpt.pt").exists()
    shown = [json.loads(line) for line in open(tmp_path / "a" / "eval_completions.jsonl")]
    assert len(shown) == 4 and {"step", "prompt", "completion", "answer"} <= set(shown[0])
    r = grpo(*common, "--max_steps=50", "--max_minutes=0.0001", f"--out_dir={tmp_path}/b")
    assert r.returncode == 0 and "max_minutes=0.0001 reached at step 1" in r.stdout, r.stdout[-2000:]
    assert len(eval_accuracies(r.stdout)) == 2
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 1


def test_exact_resume(arith, tmp_path):
    common = ["config/grpo_arith_tiny.py", f"--init_from={arith}/sft", f"--train_prompts={arith}/train.jsonl",
              "--eval_prompts=", "--max_steps=4", "--prompts_per_step=4", "--mu=2", "--beta=0.05"]
    full = grpo(*common, f"--out_dir={tmp_path}/full")
    part = grpo(*common, f"--out_dir={tmp_path}/part", "--exit_step=2")
    resumed = grpo(common[0], *common[2:], f"--out_dir={tmp_path}/part", "--init_from=resume")
    for r in (full, part, resumed):
        assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_ddp_equals_one_process(arith, tmp_path):
    common = ["config/grpo_arith_tiny.py", f"--init_from={arith}/sft", f"--train_prompts={arith}/train.jsonl",
              "--eval_prompts=", "--max_steps=2", "--prompts_per_step=4", "--micro_batch=8"]
    one = grpo(*common, f"--out_dir={tmp_path}/one")
    two = grpo(*common, f"--out_dir={tmp_path}/two", torchrun=2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-3000:])
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=False)["model"]
    worst = max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)).item() for k in a)
    assert worst <= 1e-5, worst
    moved = max((a[k] - torch.load(f"{arith}/sft/ckpt.pt", weights_only=False)["model"][k]).abs().max().item()
                for k in a)
    assert moved > 0  # the steps did train


def test_ctrl_c_saves(arith, tmp_path):
    import signal
    import time
    cmd = [sys.executable, "train_grpo.py", "config/grpo_arith_tiny.py", f"--init_from={arith}/sft",
           f"--train_prompts={arith}/train.jsonl", "--eval_prompts=", "--max_steps=10000", "--log_interval=1",
           "--prompts_per_step=4", f"--out_dir={tmp_path}"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the third logged step
        line = p.stdout.readline()
        if line.startswith("step 3/"):
            break
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert "stopped at step" in out and 3 <= ckpt["step"] < 10000
