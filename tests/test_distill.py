"""train_distill.py and its pieces: chat masks, the KL loss, stage 1 on the real SmolLM2, stages 2-3, teacher ranks."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from data.chat import load_tokenizer, render_chat
from model import kl_loss, teacher_targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


def run(args, nproc=0, timeout=900):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc
           else [sys.executable]) + ["train_distill.py", "--device=cpu", "--progress_bar=False"] + args
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "1" if nproc else os.environ.get("OMP_NUM_THREADS", "2")})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def values(log, kind, key):
    """Numbers logged as '<key> <value>' on 'step ... | val ...' (kind='val') or training lines (kind='train')."""
    lines = [line for line in log.splitlines() if line.startswith("step ") and (" | val " in line) == (kind == "val")]
    return [float(re.search(rf"\b{key} ([-\d.e]+)", line).group(1)) for line in lines]


@pytest.fixture(scope="module")
def smol_tokenizer(data_dir):
    return load_tokenizer(os.path.join(data_dir, GGUF))


@pytest.fixture(scope="module")
def tiny_teacher(smol_tokenizer, tmp_path_factory):
    """A small random Llama with SmolLM2's vocabulary and chat template (a large init makes its logits peaked)."""
    import transformers
    torch.manual_seed(0)
    tok = smol_tokenizer
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                   initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp("tiny_teacher")
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def chat_data(data_dir, tmp_path_factory):
    with open(os.path.join(data_dir, "alpaca", "alpaca_5000.json")) as f:
        records = json.load(f)[:400]
    path = tmp_path_factory.mktemp("data") / "alpaca400.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_assistant_only_mask(smol_tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
                {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6, of course."}]
    ids, mask = render_chat(messages, smol_tokenizer)
    assert ids == smol_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    spans, current = [], []
    for t, m in zip(ids, mask):
        if m:
            current.append(t)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    assert [smol_tokenizer.decode(s) for s in spans] == ["It is 4.<|im_end|>\n", "6, of course.<|im_end|>\n"]


def test_topk_kl():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 100, generator=g) * 3, torch.randn(2, 5, 100, generator=g) * 3
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    for temperature in (1.0, 2.0):
        full = kl_loss(student, teacher_targets(teacher, 0, temperature), mask, temperature)
        p = torch.softmax(teacher / temperature, -1)
        direct = (p * (p.log() - torch.log_softmax(student / temperature, -1))).sum(-1)[mask].mean() * temperature ** 2
        assert torch.allclose(full, direct, rtol=1e-5)
        every = kl_loss(student, teacher_targets(teacher, 100, temperature), mask, temperature)
        assert torch.allclose(every, full, rtol=1e-5)  # top-k with k = vocab is the full KL
        top10 = kl_loss(student, teacher_targets(teacher, 10, temperature), mask, temperature)
        assert 0 < top10 < full  # merging the tail into one bucket can only lower the KL
    assert kl_loss(teacher, teacher_targets(teacher, 10, 1.0), mask, 1.0).abs() < 1e-5


def test_stage1_smollm2_two_layers(data_dir, chat_data, tmp_path):
    """The real teacher, two attention layers replaced: the alignment loss halves within 50 steps (measured: 0.572 ->
    0.259). Early layers, so that align mode runs 6 of the 30 layers."""
    log = run([f"--base={os.path.join(data_dir, GGUF)}", "--rwkv_layers=[2, 5]", f"--data={chat_data}",
               f"--out_dir={tmp_path}", "--ctx_len=64", "--batch_size=16", "--max_steps=50", "--warmup_steps=5",
               "--learning_rate=6e-3", "--lr_final=1e-3", "--eval_interval=1000", "--eval_batches=2",
               "--log_interval=10"])
    val = values(log, "val", "align")
    assert len(val) == 2 and val[1] <= 0.5 * val[0], log
    assert os.path.isfile(tmp_path / "hybrid" / "model.safetensors") and os.path.isfile(tmp_path / "ckpt.pt")


def test_stages_2_and_3(tiny_teacher, chat_data, tmp_path):
    common = [f"--data={chat_data}", "--ctx_len=64", "--batch_size=4", "--eval_batches=4", "--log_interval=5",
              "--warmup_steps=2"]
    run([f"--base={tiny_teacher}", f"--out_dir={tmp_path}/s1", "--max_steps=10", "--eval_interval=1000"] + common)
    log = run([f"--base={tiny_teacher}", "--stage=2", f"--init_from={tmp_path}/s1/hybrid", f"--out_dir={tmp_path}/s2",
               "--max_steps=30", "--learning_rate=3e-3", "--eval_interval=1000", "--topk=64"] + common)
    kl = values(log, "val", "kl")
    assert kl[1] < 0.9 * kl[0], log
    # eval_only on held-out data: the perplexities it prints are exp of the token-mean CE over the first rows
    log = run(["--stage=2", f"--init_from={tmp_path}/s2/hybrid", f"--base={tiny_teacher}", "--data=",
               f"--val_data={chat_data}", "--eval_only=True", "--eval_batches=2", "--batch_size=4", "--ctx_len=64"])
    got = [float(v) for v in re.search(r"student ppl ([\d.]+) \| teacher ppl ([\d.]+) \| ratio [\d.]+ \| top-1 "
                                       r"agreement ([\d.]+)", log).groups()]
    from data.chat import load_examples, pack
    from model import Hybrid, load_hf_model
    x, y = (t[:8] for t in pack(load_examples(chat_data, load_tokenizer(tiny_teacher)), 64))
    valid = y >= 0
    with torch.no_grad():
        ls = Hybrid.from_pretrained(f"{tmp_path}/s2/hybrid").eval()(x)[0]
        lt = load_hf_model(tiny_teacher).eval()(x).logits
    want = [F.cross_entropy(ls[valid], y[valid]).exp().item(), F.cross_entropy(lt[valid], y[valid]).exp().item(),
            (ls.argmax(-1) == lt.argmax(-1))[valid].float().mean().item()]
    assert all(abs(g - w) <= 1e-3 * max(1.0, w) for g, w in zip(got, want)), (got, want)
    log = run(["--stage=3", f"--init_from={tmp_path}/s2/hybrid", f"--out_dir={tmp_path}/s3", "--max_steps=15",
               "--learning_rate=3e-3", "--eval_interval=1000"] + common)
    ce = values(log, "val", "ce")
    assert ce[1] < ce[0], log


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_teacher_rank_equals_in_process_teacher(tiny_teacher, chat_data, tmp_path, parallel):
    """torchrun with two trainer ranks (DDP or FSDP2) and one teacher rank gives the losses of one process with the
    same global batch, and the same saved weights."""
    common = [f"--base={tiny_teacher}", "--stage=2", f"--data={chat_data}", "--ctx_len=64", "--max_steps=5",
              "--warmup_steps=2", "--learning_rate=3e-3", "--eval_interval=1000", "--eval_batches=2",
              "--log_interval=1", "--topk=32"]
    single = run(common + ["--batch_size=4", f"--out_dir={tmp_path}/one"])
    ranked = run(common + ["--batch_size=2", "--teacher_ranks=1", f"--out_dir={tmp_path}/ranks",
                           f"--parallel={parallel}"], nproc=3)
    a, b = values(single, "train", "kl"), values(ranked, "train", "kl")
    assert len(a) == len(b) == 5 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-4, (a, b)
    va, vb = values(single, "val", "ce"), values(ranked, "val", "ce")  # validation is token-weighted over ranks too
    assert len(va) == len(vb) == 2 and max(abs(x - y) for x, y in zip(va, vb)) <= 1e-4, (va, vb)
    w1 = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=False)["model"]
    w2 = torch.load(tmp_path / "ranks" / "ckpt.pt", weights_only=False)["model"]
    assert w1.keys() == w2.keys() and max((w1[k] - w2[k]).abs().max().item() for k in w1) <= 1e-4


def test_stage1_under_fsdp_equals_one_process(tiny_teacher, chat_data, tmp_path):
    """Stage 1 under torchrun with FSDP2 (2 ranks) logs one process's alignment losses. A layer's output there is the
    teacher's, so nothing brought the student's sharded weights back for backward until each student got its own
    fully_shard (it failed with 'setStorage ... storage of size 0'); layers after the last RWKV one do not run."""
    common = [f"--base={tiny_teacher}", "--stage=1", f"--data={chat_data}", "--ctx_len=64", "--max_steps=4",
              "--warmup_steps=2", "--learning_rate=3e-3", "--eval_interval=1000", "--eval_batches=2",
              "--log_interval=1", "--rwkv_layers=[0]"]
    single = run(common + ["--batch_size=4", f"--out_dir={tmp_path}/one"])
    sharded = run(common + ["--batch_size=2", f"--out_dir={tmp_path}/two", "--parallel=fsdp"], nproc=2)
    a, b = values(single, "train", "align"), values(sharded, "train", "align")
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-4, (a, b)


def test_compiled_stage2_equals_eager(tiny_teacher, chat_data, tmp_path):
    """--compile=True (time-mixers, kl_loss and teacher_targets through Inductor) logs the eager run's top-k KL at
    every step, to the 4 decimals logged."""
    common = [f"--base={tiny_teacher}", "--stage=2", f"--data={chat_data}", "--ctx_len=32", "--batch_size=2",
              "--eval_batches=1", "--log_interval=1", "--max_steps=3", "--eval_interval=1000", "--save_interval=1000",
              "--learning_rate=1e-3", "--warmup_steps=1", "--topk=8"]
    compiled = values(run(common + [f"--out_dir={tmp_path}/compiled", "--compile=True"]), "train", "kl")
    eager = values(run(common + [f"--out_dir={tmp_path}/eager"]), "train", "kl")
    assert len(compiled) == 3 and max(abs(a - b) for a, b in zip(compiled, eager)) <= 2e-4, (compiled, eager)


def test_exact_resume(tiny_teacher, chat_data, tmp_path):
    """Stopping at step 3 and resuming gives the weights of an uninterrupted 6-step run, bit for bit (CPU)."""
    common = [f"--base={tiny_teacher}", "--stage=2", f"--data={chat_data}", "--ctx_len=64", "--batch_size=2",
              "--max_steps=6", "--warmup_steps=2", "--learning_rate=3e-3", "--eval_interval=1000",
              "--eval_batches=1", "--log_interval=1", "--save_interval=1000"]
    run(common + [f"--out_dir={tmp_path}/straight"])
    run(common + [f"--out_dir={tmp_path}/split", "--exit_step=3"])
    run(common + [f"--out_dir={tmp_path}/split", "--init_from=resume"])
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("args, message", [
    (["--base=/nonexistent/teacher"], "error: cannot load the tokenizer (/nonexistent/teacher does not exist"),
    (["--learning_rat=1"], "error: unknown config key 'learning_rat' in --learning_rat=1 (did you mean 'learning_rate'?)"),
    (["--data=/nonexistent.jsonl"], "error: data file not found: '/nonexistent.jsonl'"),
    (["--stage=1", "--init_from=out/hybrid"], "error: stage 1 starts from the teacher"),
    (["--cuda_graph=True", "--device=cpu"], "error: cuda_graph=True needs one CUDA process (no torchrun)"),
])
def test_bad_input_is_one_line(tiny_teacher, chat_data, args, message):
    out = subprocess.run([sys.executable, "train_distill.py", "--device=cpu", f"--base={tiny_teacher}",
                          f"--data={chat_data}", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode != 0 and len(lines) == 1 and lines[0].startswith(message), out.stderr[-2000:]


def test_stage3_long_context_options(tiny_teacher, chat_data, tmp_path):
    """Stage 3 of an all-RWKV hybrid with state_cp (parts of 22, 22, 20 tokens) and a context warm-up 16 -> 64 over
    6 steps, stopped at step 5 and resumed: the loss falls, the warm-up is in the log and resumes at the right
    length, and every step's loss equals that of an uninterrupted run with ctx_parts=3 and per-layer gradient
    checkpointing instead (all three are exact)."""
    common = [f"--base={tiny_teacher}", "--stage=3", f"--data={chat_data}", "--ctx_len=64", "--batch_size=4",
              "--eval_batches=4", "--log_interval=1", "--warmup_steps=2", "--max_steps=12", "--learning_rate=3e-3",
              "--eval_interval=1000", "--save_interval=1000", "--initial_ctx_len=16", "--ctx_warmup_steps=6",
              "--ctx_parts=3"]
    parts = run(common + [f"--out_dir={tmp_path}/parts", "--grad_checkpointing=True"])
    cp = common + [f"--out_dir={tmp_path}/cp", "--state_cp=True"]
    cp_log = run(cp + ["--exit_step=5"]) + run(cp + ["--init_from=resume"])
    ctx = [int(n) for n in re.findall(r"\| ctx (\d+)", cp_log)]
    assert ctx == [16, 24, 32, 40, 48, 56, 64, 64, 64, 64, 64, 64] == [int(n) for n in re.findall(r"\| ctx (\d+)", parts)]
    val = values(cp_log, "val", "ce")
    assert val[-1] < val[0] - 0.3, cp_log
    got, want = values(cp_log, "train", "ce"), values(parts, "train", "ce")
    assert len(got) == len(want) == 12 and max(abs(a - b) for a, b in zip(got, want)) <= 2e-4, (got, want)


def test_state_cp_outside_stage_3_is_one_line(tiny_teacher, chat_data):
    out = subprocess.run([sys.executable, "train_distill.py", "--device=cpu", f"--base={tiny_teacher}",
                          f"--data={chat_data}", "--stage=2", "--state_cp=True"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0 and out.stderr.strip().startswith("error: state_cp is for stage 3 (SFT), not stage 2")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_stage3_lora(tiny_teacher, chat_data, tmp_path):
    """LoRA on the RWKV layers of a hybrid in stage 3, with state_cp: the loss falls; ckpt.pt holds only the trainable
    subset; stopped at step 4 and resumed it equals the uninterrupted run bit for bit; out_dir/hybrid is the merged
    model, whose logits equal the unmerged LoRA model's (fp32, <= 1e-4)."""
    import transformers
    from helpers import rel_err
    from lora import add_lora_hybrid
    from model import Hybrid
    hybrid = Hybrid(transformers.AutoModelForCausalLM.from_pretrained(tiny_teacher), "all")
    hybrid.save_pretrained(tmp_path / "base")
    transformers.AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(tmp_path / "base")
    lora = dict(r=4, alpha=8, dropout=0.0, parts="att,ffn,time,ln", layers="1-2")
    common = ["--stage=3", f"--init_from={tmp_path}/base", f"--data={chat_data}", "--ctx_len=64", "--batch_size=4",
              "--eval_batches=4", "--log_interval=1", "--warmup_steps=2", "--max_steps=8", "--learning_rate=1e-2",
              "--eval_interval=1000", "--save_interval=1000", "--state_cp=True", "--ctx_parts=2",
              *(f"--lora_{k}={v}" for k, v in lora.items())]
    straight = run(common + [f"--out_dir={tmp_path}/straight"])
    assert "training a LoRA (r=4, att,ffn,time,ln)" in straight
    val = values(straight, "val", "ce")
    assert val[-1] < val[0] - 0.1, straight  # deterministic validation: the same rows every time
    run(common + [f"--out_dir={tmp_path}/split", "--exit_step=4"])
    run(["--init_from=resume", f"--data={chat_data}", "--stage=3", "--ctx_len=64", "--batch_size=4",
         "--eval_batches=4", "--warmup_steps=2", "--max_steps=8", "--learning_rate=1e-2", "--eval_interval=1000",
         "--save_interval=1000", "--state_cp=True", "--ctx_parts=2", f"--out_dir={tmp_path}/split"])
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in ("straight", "split"))
    assert a["step"] == b["step"] == 8 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    model = add_lora_hybrid(Hybrid.from_pretrained(tmp_path / "base"), **lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(a["model"]) == trainable and "hf.model.layers.1.mlp.up_proj.lora_B" in trainable
    assert not any(".layers.0." in n or ".layers.3." in n for n in trainable)
    model.load_state_dict(a["model"], strict=False)
    merged, base = Hybrid.from_pretrained(tmp_path / "straight" / "hybrid"), Hybrid.from_pretrained(tmp_path / "base")
    idx = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.eval()(idx)[0]
        assert rel_err(merged.eval()(idx)[0], logits) <= 1e-4
        assert rel_err(base.eval()(idx)[0], logits) > 1e-3  # the LoRA changed the model


def test_stage3_state_cp_under_torchrun(tiny_teacher, chat_data, tmp_path):
    """Stage 3 with state_cp on 2 trainer ranks x batch 2 (DDP: gradients averaged by hand; FSDP2) gives the losses
    and weights of one process with batch 4 (<= 1e-4 on the 4-decimal log and on the weights)."""
    common = [f"--base={tiny_teacher}", "--stage=3", f"--data={chat_data}", "--ctx_len=64", "--eval_batches=2",
              "--log_interval=1", "--warmup_steps=2", "--max_steps=4", "--learning_rate=3e-3", "--eval_interval=1000",
              "--save_interval=1000", "--state_cp=True", "--ctx_parts=3"]
    want = values(run(common + ["--batch_size=4", f"--out_dir={tmp_path}/one"]), "train", "ce")
    w1 = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=False)["model"]
    for parallel in ("ddp", "fsdp"):
        got = values(run(common + ["--batch_size=2", f"--out_dir={tmp_path}/{parallel}", f"--parallel={parallel}"],
                         nproc=2), "train", "ce")
        assert len(got) == len(want) == 4 and max(abs(a - b) for a, b in zip(got, want)) <= 1e-4, (parallel, got, want)
        w2 = torch.load(tmp_path / parallel / "ckpt.pt", weights_only=False)["model"]
        # 1e-4: Adam divides by sqrt(v), so an embedding row with a near-zero gradient turns summation-order noise
        # into ~2e-5 of movement; a wrong gradient (a rank's share lost or doubled) moves weights by ~lr = 3e-3
        assert w1.keys() == w2.keys() and max((w1[k] - w2[k]).abs().max().item() for k in w1) <= 1e-4, parallel


def _worker_pid(root_pid, rank):
    """The pid of torchrun worker `rank` among root_pid's descendants (Linux /proc), or None."""
    parent, env = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env[int(pid)] = f.read().split(b"\0")
        except OSError:
            continue
    def descends(pid):
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == root_pid:
                return True
        return False
    found = [p for p in env if f"RANK={rank}".encode() in env[p] and descends(p)]
    return min(found) if found else None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the teacher worker through /proc")
@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])  # the teacher dies / hangs past teacher_timeout
def test_teacher_rank_failure_stops_training_with_checkpoint_intact(tiny_teacher, chat_data, tmp_path, how):
    """A teacher rank that dies or hangs mid-run stops the trainer with a one-line error naming the teacher rank, and
    the last checkpoint loads."""
    import signal
    import time
    out_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_distill.py",
           "--device=cpu", "--progress_bar=False", f"--base={tiny_teacher}", "--stage=2", f"--data={chat_data}",
           "--ctx_len=64", "--batch_size=2", "--max_steps=100000", "--eval_interval=100000", "--log_interval=1",
           "--save_interval=2", "--teacher_ranks=1", "--teacher_timeout=10", f"--out_dir={out_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 300
        while not (out_dir / "ckpt.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert (out_dir / "ckpt.pt").exists(), "no checkpoint was written"
        teacher = _worker_pid(proc.pid, 1)
        assert teacher is not None
        os.kill(teacher, getattr(signal, how))
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, log[-3000:]
    assert "error: lost teacher rank 1" in log, log[-3000:]
    assert how == "SIGKILL" or "no answer in 10s" in log or "imed out" in log, log[-3000:]
    ckpt = torch.load(out_dir / "ckpt.pt", weights_only=False)
    assert ckpt["step"] >= 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
