"""sample.py: recurrent decoding vs full recompute and vs the `rwkv` package, cloned-state sampling, the stream
printer, chat through stdin, LAMBADA, loading and error messages."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.tokenizers import get_tokenizer
from helpers import random_model
from model import Hybrid
from sample import (Stream, cat_states, decodable, eval_lambada, expand_state, generate, load_model,
                    penalty_weight, prefill, sample)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors on a shared 2-core machine: intra-op threads only add contention (10x slower when busy)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(args, stdin=None):
    """sample.py in a subprocess -> (returncode, stdout, stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")  # 1 thread: fast on a busy 2-core box
    p = subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, input=stdin, capture_output=True,
                       text=True, encoding="utf-8", errors="replace", env=env, timeout=120)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def pipeline():
    """The `rwkv` package's PIPELINE (its own tokenizer, generate with penalties); tests set .model."""
    with pytest.MonkeyPatch.context() as mp:
        for k in ("RWKV_V7_ON", "RWKV_JIT_ON"):
            mp.setenv(k, "1")  # read when rwkv.model is imported
        mp.setenv("RWKV_CUDA_ON", "0")
        from rwkv.utils import PIPELINE
        yield PIPELINE(None, "rwkv_vocab_v20230424")


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    """A small random model with the World vocabulary, as an official-layout .pth."""
    model = random_model(seed=3, n_layer=2, n_embd=64, vocab_size=65536)
    with torch.no_grad():
        for block in model.blocks:
            block.att.w0 -= 4  # decay near 1: a long memory, so what came turns before still shows in a reply
    path = tmp_path_factory.mktemp("world") / "model.pth"
    model.save_pretrained(path, dtype=torch.float32)
    return model, str(path)


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory):
    """A directory like our trainer's out_dir: ckpt.pt with 'model' and 'config' (data_dir with a char meta.json)."""
    d = tmp_path_factory.mktemp("char")
    chars = "\n !',.:?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    (d / "data").mkdir()
    (d / "data" / "meta.json").write_text(json.dumps(dict(vocab_size=len(chars), dtype="uint16",
                                                          tokenizer="char:meta.json", eot_id=None, chars=chars)))
    model = random_model(seed=4, n_layer=2, n_embd=64, vocab_size=len(chars))
    torch.save(dict(model=model.state_dict(), config=dict(data_dir=str(d / "data"), n_layer=2),
                    rng=dict(numpy=np.random.get_state())), d / "ckpt.pt")  # like train_pretrain.py's
    return d


# --- decoding ---------------------------------------------------------------------------------------------------

def test_greedy_recurrent_equals_full_recompute():
    model = random_model(seed=1, n_layer=3, n_embd=128, vocab_size=300)
    prompt = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    logits, state = prefill(model, prompt)
    out, _ = generate(model, logits, state, 64, [torch.Generator()], temperature=0)
    tokens = out[0]
    with torch.no_grad():
        full = model(torch.tensor([prompt + tokens]))[0][0]  # every position recomputed in the parallel form
    assert full.std() > 0.5 and len(set(tokens)) > 5  # a degenerate model would make this meaningless
    assert full[len(prompt) - 1:-1].argmax(dim=-1).tolist() == tokens


def test_prefill_in_pieces(monkeypatch):
    """A long prompt goes through the parallel form in PREFILL_CHUNK pieces, the state carried between them."""
    import sample as sample_py
    model = random_model(seed=1, n_layer=2, n_embd=64, vocab_size=300)
    prompt = list(range(1, 40))
    whole_logits, whole_state = prefill(model, prompt)
    monkeypatch.setattr(sample_py, "PREFILL_CHUNK", 16)
    logits, state = prefill(model, prompt)
    assert torch.allclose(logits, whole_logits, atol=1e-5) and torch.allclose(state[1][1], whole_state[1][1], atol=1e-5)


def test_greedy_matches_rwkv_package(tmp_path, monkeypatch):
    monkeypatch.setenv("RWKV_V7_ON", "1")
    monkeypatch.setenv("RWKV_JIT_ON", "1")
    monkeypatch.setenv("RWKV_CUDA_ON", "0")
    from rwkv.model import RWKV as ReferenceRWKV  # reads the variables above at import time

    path = tmp_path / "model.pth"
    random_model(seed=2, n_layer=2, n_embd=128, vocab_size=400).save_pretrained(path, dtype=torch.float32)
    model, spec = load_model(str(path))
    assert spec is None  # not a World-vocabulary model: the tokenizer must be given
    prompt = torch.randint(0, 400, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    logits, state = prefill(model, prompt)
    ours = generate(model, logits, state, 64, [torch.Generator()], temperature=0)[0][0]

    ref = ReferenceRWKV(str(path)[:-4], "cpu fp32")
    out, ref_state = ref.forward(prompt, None)
    theirs = []
    for _ in range(64):
        theirs.append(int(out.argmax()))
        out, ref_state = ref.forward([theirs[-1]], ref_state)
    assert len(set(theirs)) > 5
    assert ours == theirs


def record_tokens(pipeline, monkeypatch):
    """The tokens PIPELINE.generate draws."""
    tokens, draw = [], pipeline.sample_logits
    monkeypatch.setattr(pipeline, "sample_logits", lambda *a, **k: tokens.append(draw(*a, **k)) or tokens[-1])
    return tokens


def test_penalties_match_rwkv_pipeline(world_model, world, pipeline, monkeypatch):
    """Greedy with the authors' penalties (0.2, 0.2, decay 0.996, whitespace/digits weight 0) = PIPELINE.generate
    at temperature 0 on the same weights."""
    from rwkv.model import RWKV as ReferenceRWKV
    from rwkv.utils import PIPELINE_ARGS

    model, path = world_model
    ctx = "\nThe quick brown fox, 12 of them"
    monkeypatch.setattr(pipeline, "model", ReferenceRWKV(path[:-4], "cpu fp32"))
    theirs = record_tokens(pipeline, monkeypatch)
    pipeline.generate(ctx, token_count=40, args=PIPELINE_ARGS(temperature=0, alpha_presence=0.2, alpha_frequency=0.2,
                                                               alpha_decay=0.996))
    logits, state = prefill(model, world.encode(ctx))
    pen = dict(presence_penalty=0.2, frequency_penalty=0.2, penalty_decay=0.996, token_weight=penalty_weight(world))
    ours = generate(model, logits, state, 40, [torch.Generator()], temperature=0, **pen)[0][0]
    plain = generate(model, logits, state, 40, [torch.Generator()], temperature=0)[0][0]
    assert ours == theirs
    assert ours != plain  # the penalties changed the text


class Constant(torch.nn.Module):
    """A stand-in model with the same logits at every position: the sequence depends on the penalties alone."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, idx, targets=None, state=None, last_only=False):
        return self.logits.expand(idx.shape[0], 1 if last_only else idx.shape[1], -1), None, state


def test_penalty_rule_matches_rwkv_pipeline(world, pipeline, monkeypatch):
    """100 greedy steps over 45 near-tied tokens (whitespace and digit ones among them) with strong penalties:
    every detail of the rule (what counts, when counts decay) decides which token comes next."""
    from rwkv.utils import PIPELINE_ARGS

    logits = torch.full((65536,), -30.0)
    cand = [33, 10, 56, 632, 264] + list(range(1000, 1040))  # ' ', '\t', '7', '12', ' \t', then ordinary tokens
    logits[cand] = torch.randn(len(cand), generator=torch.Generator().manual_seed(0)) * 0.3
    logits[cand[:5]] = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1])  # high enough to come; their counts never grow

    class Fake:  # what PIPELINE needs of a model
        def forward(self, tokens, state):
            return logits.clone(), state
    monkeypatch.setattr(pipeline, "model", Fake())
    theirs = record_tokens(pipeline, monkeypatch)
    pipeline.generate("x", token_count=100, args=PIPELINE_ARGS(temperature=0, alpha_presence=0.3, alpha_frequency=0.5,
                                                               alpha_decay=0.95))
    ours = generate(Constant(logits), logits[None].clone(), None, 100, [torch.Generator()], temperature=0,
                    presence_penalty=0.3, frequency_penalty=0.5, penalty_decay=0.95,
                    token_weight=penalty_weight(world))[0][0]
    assert ours == theirs
    assert {33, 10, 56, 632, 264} <= set(ours) and len(set(ours)) > 20


def test_penalty_weight(world):
    w = penalty_weight(world)
    assert [w(world.encode(s)[0]) for s in (" ", "\t", "7", "12", " \t")] == [0.0] * 5
    assert w(world.encode("Hello")[0]) == 1.0 and w(world.encode("\n")[0]) == 1.0
    assert decodable(world, 65536) == 65530  # World's padding ids are never sampled


def test_samples_from_cloned_state_equal_separate_runs():
    model = random_model(seed=5, n_layer=2, n_embd=64, vocab_size=1000)
    prompt, opts = [3, 14, 15, 92, 65, 35], dict(temperature=1.0, top_p=0.9, top_k=200, presence_penalty=0.2,
                                                 frequency_penalty=0.2, penalty_decay=0.996)
    logits, state = prefill(model, prompt)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(8)]
    batch, _ = generate(model, logits.expand(8, -1), expand_state(state, 8), 32, gens, **opts)
    assert len({tuple(row) for row in batch}) == 8  # really sampled
    for i in range(8):
        logits, state = prefill(model, prompt)  # a separate run from scratch
        alone, _ = generate(model, logits, state, 32, [torch.Generator().manual_seed(100 + i)], **opts)
        assert alone[0] == batch[i], f"sample {i}"


def test_batched_prompts_equal_separate_runs():
    """Different prompts prefilled one by one, states stacked, decoded as one batch (2 samples each)."""
    model = random_model(seed=6, n_layer=2, n_embd=64, vocab_size=1000)
    prompts = [[1, 2, 3], list(range(10, 50)), [999]]
    prefilled = [prefill(model, p) for p in prompts]
    logits = torch.cat([l for l, _ in prefilled]).repeat_interleave(2, dim=0)
    state = expand_state(cat_states([s for _, s in prefilled]), 2)
    gens = [torch.Generator().manual_seed(7 + r) for r in range(6)]
    batch, final = generate(model, logits, state, 24, gens, temperature=0.8, top_p=0.95)
    for r in range(6):
        lg, st = prefill(model, prompts[r // 2])
        alone, alone_final = generate(model, lg, st, 24, [torch.Generator().manual_seed(7 + r)], temperature=0.8,
                                      top_p=0.95)
        assert alone[0] == batch[r]
        assert torch.allclose(alone_final[1][1][0], final[1][1][r], atol=1e-5)  # the WKV state of layer 1


def test_sampler_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [0.0, 0.1, 5.0, 4.9]])
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    assert sample(logits, gens, temperature=0).tolist() == [1, 2]
    for _ in range(20):
        assert sample(logits, gens, top_k=1).tolist() == [1, 2]
        assert sample(logits, gens, top_p=0.01).tolist() == [1, 2]  # only the most likely token survives
        assert set(sample(logits, gens, top_k=2).tolist()) <= {1, 2, 3}
    draws = torch.stack([sample(logits, gens) for _ in range(400)])
    assert set(draws[:, 0].tolist()) == {0, 1, 2, 3}  # top_p=1: every token can come


def test_hybrid_directory(tmp_path):
    """A hybrid (attention in layers 0 and 2, RWKV in 1 and 3) loads through the same entry point and decodes
    recurrently (its state has a KV cache) like the full recompute; samples come from its expanded state; prompts of
    equal and of different lengths batch."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                   initializer_range=0.2)
    Hybrid(transformers.AutoModelForCausalLM.from_config(cfg), [1, 3]).save_pretrained(tmp_path)
    model, spec = load_model(str(tmp_path))
    assert isinstance(model, Hybrid) and spec is None  # no tokenizer files in the directory
    model.eval()
    prompt = list(range(20, 40))
    logits, state = prefill(model, prompt)
    tokens = generate(model, logits, state, 24, [torch.Generator()], temperature=0)[0][0]
    with torch.no_grad():
        full = model(torch.tensor([prompt + tokens]))[0][0]
    assert len(set(tokens)) > 3 and full[len(prompt) - 1:-1].argmax(dim=-1).tolist() == tokens
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    batch = generate(model, logits.expand(3, -1), expand_state(state, 3), 12, gens)[0]
    for i in range(3):
        assert generate(model, logits, state, 12, [torch.Generator().manual_seed(i)])[0][0] == batch[i]
    two = cat_states([state, state])  # prompts of equal length stack: their KV caches match
    assert generate(model, torch.cat([logits, logits]), two, 8, [torch.Generator()] * 2, temperature=0)[0] == \
        [tokens[:8]] * 2
    # prompts of different lengths stack too (left-padded KV caches): each row decodes as it does alone
    lg_longer, longer = prefill(model, prompt + [5])
    alone = generate(model, lg_longer, longer, 8, [torch.Generator()], temperature=0)[0][0]
    mixed = cat_states([state, longer])
    assert mixed.pad.tolist() == [1, 0] and mixed.length == len(prompt) + 1
    assert generate(model, torch.cat([logits, lg_longer]), mixed, 8, [torch.Generator()] * 2, temperature=0)[0] == \
        [tokens[:8], alone]


# --- streaming text -----------------------------------------------------------------------------------------------

def test_stream_utf8_and_stop_strings(world):
    s = Stream(world)
    assert [s.push(b + 1) for b in "中".encode()] == ["", "", "中"]  # ids 1..256 are single bytes
    s = Stream(world, ["\n\n", "User:"])
    pieces = [s.push(t) for t in world.encode("Hi there.\n")]
    assert "".join(pieces) == "Hi there."  # the "\n" could begin "\n\n": held back
    assert s.push(world.encode("Ok")[0]) == "\nOk"
    assert s.push(world.encode("\n")[0]) == "" and s.push(world.encode("\n")[0]) == ""
    assert s.done and s.reply == "Hi there.\nOk" and s.flush() == ""
    s = Stream(world, ["User:"])
    out = "".join(s.push(t) for t in world.encode("Yes. Us")) + s.flush()
    assert out == "Yes. Us"  # no stop came: the held-back "Us" is printed at the end


# --- chat -----------------------------------------------------------------------------------------------------------

def test_chat_two_turns_and_reset(world_model, vocab):
    _, path = world_model
    rc, out, err = run([f"--init_from={path}", f"--tokenizer=world:{vocab}", "--chat=True", "--temperature=0",
                        "--max_new_tokens=16", "--start=System: a preamble kept by /reset.\\n\\n"],
                       stdin="Hello, who are you?\nHello, who are you?\n/reset\nHello, who are you?\n")
    assert rc == 0, err
    replies = re.findall(r"Assistant:(.*?)\n\nUser: ", out, re.S)
    assert len(replies) == 3, out
    assert out.count("User: Hello, who are you?\nAssistant:") == 3 and "(conversation reset)" in out
    assert replies[0] == replies[2]  # after /reset the state (the preamble's) and the sampler are the initial ones
    assert replies[1] != replies[0]  # the second turn saw the first one
    assert "throughput:" in out


# --- loading, completion, errors -------------------------------------------------------------------------------------

def test_checkpoint_dir_completion(char_dir):
    rc, out, err = run([f"--init_from={char_dir}", "--start=To be", "--num_samples=3", "--max_new_tokens=20",
                        "--temperature=0.9", "--top_p=1.0"])
    assert rc == 0, err
    out = "".join(line for line in out.splitlines(keepends=True) if not line.startswith("override "))
    samples = out.split("---------------\n")
    assert len(samples) == 4 and all(s.startswith("To be") for s in samples[:3])  # the tokenizer came from meta.json
    assert len(set(samples[:3])) > 1 and "throughput: prefill 5 tokens" in samples[3]


def test_benchmark_runs(char_dir):
    rc, out, err = run([f"--init_from={char_dir}", "--benchmark=True", "--num_samples=4", "--max_new_tokens=6"])
    assert rc == 0, err
    assert "benchmark: batch 4, 6 steps" in out and "decode 24 tokens" in out


def test_loading_errors(char_dir, tmp_path):
    """Files that are not RWKV-7 checkpoints: one ValueError each, naming the problem."""
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    (tmp_path / "run").mkdir()
    torch.save({"step": 3}, tmp_path / "run" / "ckpt.pt")
    for path, expect in [(tmp_path / "junk.pth", "is not a loadable RWKV-7 .pth file"),
                         (tmp_path / "other.pth", "not an RWKV-7 (x070) checkpoint"),
                         (tmp_path / "run", "not a training checkpoint"), (tmp_path / "nothing", "not found")]:
        with pytest.raises(ValueError, match=re.escape(expect)):
            load_model(str(path))
    ckpt = torch.load(char_dir / "ckpt.pt", weights_only=False)
    torch.save(dict(model=ckpt["model"], config={}), tmp_path / "run" / "ckpt.pt")
    model, spec = load_model(str(tmp_path / "run"))  # loads, but does not know its tokenizer
    chars = json.loads((char_dir / "data" / "meta.json").read_text())["chars"]
    assert spec is None and model.config.vocab_size == len(chars)
    assert load_model(str(char_dir))[1] == f"char:{char_dir / 'data' / 'meta.json'}"


@pytest.mark.parametrize("case", ["not_rwkv7", "unencodable", "empty"])
def test_clear_errors(case, char_dir, tmp_path):
    """On the command line: one line on stderr, exit code 2."""
    if case == "not_rwkv7":
        torch.save({"weight": torch.zeros(3)}, tmp_path / "x.pth")
        args, expect = [f"--init_from={tmp_path / 'x.pth'}"], "not an RWKV-7 (x070) checkpoint"
    elif case == "unencodable":
        args, expect = [f"--init_from={char_dir}", "--start=Caf\u00e9"], "cannot encode the character '\u00e9' (U+00E9)"
    else:
        args, expect = [f"--init_from={char_dir}", "--start="], "empty prompt"
    rc, out, err = run(args)
    assert rc == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert expect in err


# --- LAMBADA ---------------------------------------------------------------------------------------------------------

class Bigram(torch.nn.Module):
    """A stand-in model whose next-token logits depend on the current token only: hand-checkable."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, idx, targets=None, state=None, last_only=False):
        logits = self.table[idx]
        return (logits[:, -1:] if last_only else logits), None, None


def test_lambada_by_hand(tmp_path):
    chars = " abc"
    (tmp_path / "meta.json").write_text(json.dumps(dict(chars=chars)))
    tok = get_tokenizer(f"char:{tmp_path / 'meta.json'}")
    table = torch.tensor([[0.0, 0.0, 2.0, 0.0],   # after ' ': 'b' is likeliest
                          [1.0, 0.0, 0.0, 0.0],   # after 'a': ' '
                          [0.0, 0.0, 0.0, 3.0],   # after 'b': 'c'
                          [0.5, 0.0, 0.0, 0.0]])  # after 'c': ' '
    docs = ["a b", "a c", "ab c", "cab b"]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(dict(text=d)) + "\n" for d in docs))
    lp = table.log_softmax(dim=-1)
    sp, a, b, c = 0, 1, 2, 3
    by_hand = [lp[a, sp] + lp[sp, b], lp[a, sp] + lp[sp, c], lp[b, sp] + lp[sp, c], lp[b, sp] + lp[sp, b]]
    ppl, acc, n = eval_lambada(Bigram(table), tok, tmp_path / "l.jsonl", batch_size=2)
    assert n == 4 and acc == 0.25  # only "a b": ' ' after 'a' and 'b' after ' ' are both argmax
    assert ppl == pytest.approx(math.exp(-sum(by_hand).item() / 4), rel=1e-6)


def test_lambada_first_lines(world_model, world, vocab, data_dir, tmp_path):
    """The command line on 20 LAMBADA documents, against the recipe computed from full-sequence logits."""
    model, path = world_model
    with open(os.path.join(data_dir, "rwkv", "lambada_test.jsonl"), encoding="utf-8") as f:
        lines = [next(f) for _ in range(20)]
    (tmp_path / "l.jsonl").write_text("".join(lines), encoding="utf-8")
    rc, out, err = run([f"--init_from={path}", f"--tokenizer=world:{vocab}", "--eval=lambada",
                        f"--eval_file={tmp_path / 'l.jsonl'}", "--eval_batch_size=4"])
    assert rc == 0, err
    m = re.search(r"lambada: ppl (\S+) acc (\S+) \((\d+) docs, (\S+) docs/s\)", out)
    assert m, out
    ppl, acc, n = float(m[1]), float(m[2]), int(m[3])
    assert n == 20 and math.isfinite(ppl) and 0 <= acc <= 1

    total, hits = 0.0, 0
    with torch.no_grad():
        for line in lines:
            context, word = json.loads(line)["text"].rsplit(" ", 1)
            src, dst = [0] + world.encode(context), world.encode(" " + word)
            logits = model(torch.tensor([src + dst]))[0][0, len(src) - 1:-1].float()
            total += F.log_softmax(logits, dim=-1)[torch.arange(len(dst)), dst].sum().item()
            hits += logits.argmax(dim=-1).tolist() == dst
    assert ppl == pytest.approx(math.exp(-total / 20), rel=1e-4)
    assert acc == hits / 20


def test_chat_with_a_hybrids_own_template(data_dir, tmp_path, monkeypatch, capsys):
    """A hybrid of a chat model chats in its own template: everything fed to the state, plus the replies, decodes to
    the template's rendering of the whole conversation."""
    import io
    import sample
    import transformers
    from data.chat import load_tokenizer
    hf_tok = load_tokenizer(os.path.join(data_dir, "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=1, num_key_value_heads=1, initializer_range=0.2,
                                   eos_token_id=hf_tok.eos_token_id)
    Hybrid(transformers.AutoModelForCausalLM.from_config(cfg), [1]).save_pretrained(tmp_path)
    hf_tok.save_pretrained(tmp_path)
    model, spec = load_model(str(tmp_path))
    tok = get_tokenizer(spec)
    fed = []
    real_prefill = sample.prefill
    monkeypatch.setattr(sample, "prefill", lambda m, ids, state=None: (fed.append(list(ids)), real_prefill(m, ids, state))[1])
    monkeypatch.setattr(sample, "max_new_tokens", 8)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi there\nWhat next?\n"))
    sample.chat_loop(model.eval(), tok, [], dict(temperature=0, top_p=1.0, top_k=0, presence_penalty=0,
                                                  frequency_penalty=0, penalty_decay=1.0, n_valid=len(hf_tok)))
    replies = re.findall(r"Assistant:(.*?)\n\n", capsys.readouterr().out, re.S)
    assert len(fed) == 2 and len(replies) == 2
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": replies[0]},
                {"role": "user", "content": "What next?"}]
    expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.decode(fed[0]) + replies[0] + tok.decode(fed[1]) == expected
