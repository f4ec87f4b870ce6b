"""data/: World tokenizer vs the rwkv package, binidx format, magic-prime sampler, prepare scripts."""
import json, os, struct, subprocess, sys
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # plain `pytest` does not put the repo root on sys.path

from data.tokenizers import get_tokenizer, is_partial
from data.binidx import (BinIdx, write_binidx, token_dtype, open_dataset, load_meta,
                         magic_prime, check_magic_prime, sample_offset, is_prime)


# ---------------------------------------------------------------- tokenizers

def test_world_matches_rwkv_package_on_lambada(data_dir, vocab, world):
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    ref = TRIE_TOKENIZER(vocab)
    with open(os.path.join(data_dir, "rwkv", "lambada_test.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    assert len(texts) == 5153
    n_tok = 0
    for i, text in enumerate(texts):
        ids = world.encode(text)
        assert ids == ref.encode(text), f"line {i}"
        assert world.decode(ids) == text, f"line {i}"
        n_tok += len(ids)
    assert n_tok > 300_000  # LAMBADA is ~400k World tokens: the loop really ran

def test_world_basics(world):
    assert (world.eot_id, world.vocab_size) == (0, 65536)
    assert world.encode("a") == [ord("a") + 1]  # ids 1..256 are the single bytes
    assert world.encode("\n\n") == [261]
    assert world.decode([0]) == ""
    ids = world.encode("中文 😀")
    assert len(world.id2bytes) == 65530 and max(world.id2bytes) == 65529
    # the emoji is split into byte tokens: a prefix of it decodes with U+FFFD, streamers wait
    assert any(is_partial(world.decode(ids[:k])) for k in range(len(ids)))
    assert not is_partial(world.decode(ids))

def test_world_from_pip_package_and_bad_spec(world):
    tok = get_tokenizer("world")  # vocab shipped inside the rwkv package
    assert tok.name == "world" and tok.id2bytes == world.id2bytes
    assert tok.encode("Hello world") == world.encode("Hello world") == [33155, 40213]
    with pytest.raises(ValueError, match="unknown tokenizer spec 'bpe:x'"):
        get_tokenizer("bpe:x")
    with pytest.raises(ValueError, match="unknown tokenizer spec"):
        get_tokenizer("hf")

def test_tiktoken_wrapper(monkeypatch):
    # tiktoken's named encodings need a download; a tiny hand-made Encoding exercises the same wrapper
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {bytes([i]): i for i in range(256)} | {b"he": 256, b"ll": 257}
    enc = tiktoken.Encoding("tiny", pat_str=r"""'s|'t| ?\w+| ?[^\s\w]+|\s+""", mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 258})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: enc)
    tok = get_tokenizer("tiktoken:tiny")
    assert (tok.name, tok.eot_id, tok.vocab_size) == ("tiktoken:tiny", 258, 259)
    assert tok.encode("hello") == [256, 257, ord("o")]
    assert 258 not in tok.encode("a <|endoftext|> b")  # special text inside a document stays text
    assert tok.decode(tok.encode("hé <|endoftext|>")) == "hé <|endoftext|>"

def test_hf_tokenizer(tmp_path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello world, héllo wörld 中文"] * 20, vocab_size=300,
                            special_tokens=["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>").save_pretrained(tmp_path)
    tok = get_tokenizer(f"hf:{tmp_path}")
    text = "hello wörld 中文, unseen text!"
    ids = tok.encode(text)
    assert tok.eot_id == 0 and tok.eot_id not in ids and tok.vocab_size == len(bpe.get_vocab())
    assert tok.decode(ids) == text
    assert tok.end_ids == {0}  # no chat template: replies end at eos only


def test_hf_tokenizer_chat_turn_end(tmp_path, data_dir):
    # eos is <|endoftext|>, but the template closes a turn with <|im_end|>: a reply ends at either
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello world"] * 20, vocab_size=280, special_tokens=["<|endoftext|>", "<|im_end|>"])
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}<|im_end|>\n{% endfor %}"
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                            additional_special_tokens=["<|im_end|>"], chat_template=template).save_pretrained(tmp_path)
    tok = get_tokenizer(f"hf:{tmp_path}")
    assert tok.eot_id == 0 and tok.end_ids == {0, 1}
    smol = get_tokenizer(f"hf:{os.path.join(data_dir, 'smollm2-135m-instruct', 'SmolLM2-135M-Instruct.Q4_1.gguf')}")
    assert smol.tok.convert_ids_to_tokens(sorted(smol.end_ids)) in (["<|im_end|>"], ["<|endoftext|>", "<|im_end|>"])

# ---------------------------------------------------------------- binidx

@pytest.mark.parametrize("vocab_size", [65536, 151_936])
def test_binidx_round_trip(tmp_path, vocab_size):
    dtype = token_dtype(vocab_size)
    assert dtype == (np.uint16 if vocab_size == 65536 else np.int32)
    docs = [[5, 6, 7], [], [vocab_size - 1, 1]]
    prefix = str(tmp_path / "d")
    assert write_binidx(prefix, docs, dtype, eot_id=0) == 8
    ds = BinIdx(prefix + ".bin")  # a path with extension works too
    assert ds.dtype == dtype and ds.num_tokens == 8 and len(ds) == 3
    assert ds.sizes.tolist() == [4, 1, 3]
    assert ds.pointers.tolist() == [0, 4 * dtype.itemsize, 5 * dtype.itemsize]
    assert ds.doc_idx.tolist() == [0, 1, 2, 3]
    assert [ds.doc(i).tolist() for i in range(3)] == [[5, 6, 7, 0], [0], [vocab_size - 1, 1, 0]]
    assert ds.get(2, 4).tolist() == [7, 0, 0, vocab_size - 1]  # windows cross document boundaries
    assert os.path.getsize(prefix + ".bin") == 8 * dtype.itemsize
    with pytest.raises(AssertionError):
        ds.get(5, 4)

def test_binidx_header_bytes(tmp_path):
    prefix = str(tmp_path / "h")
    write_binidx(prefix, [[1, 2], [3]], np.uint16)
    raw = open(prefix + ".idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<Q", raw[9:17]) == (1,)       # version
    assert raw[17] == 8                                 # uint16
    assert struct.unpack("<QQ", raw[18:34]) == (2, 3)   # len, doc_count
    assert len(raw) == 34 + 2 * 4 + 2 * 8 + 3 * 8
    assert np.frombuffer(raw[34:42], np.int32).tolist() == [3, 2]
    assert np.frombuffer(raw[42:58], np.int64).tolist() == [0, 6]
    assert open(prefix + ".bin", "rb").read() == np.array([1, 2, 0, 3, 0], np.uint16).tobytes()
    write_binidx(prefix, [[1]], np.int32)
    assert open(prefix + ".idx", "rb").read()[17] == 4  # int32: uint32 has no code

def test_binidx_rejects_overflow_and_bad_magic(tmp_path):
    with pytest.raises(ValueError, match="does not fit uint16"):
        write_binidx(str(tmp_path / "o"), [[70000]], np.uint16)
    (tmp_path / "bad.idx").write_bytes(b"NOTANIDX" + bytes(40))
    (tmp_path / "bad.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="bad magic"):
        BinIdx(str(tmp_path / "bad"))

def test_open_dataset_checks(tmp_path):
    write_binidx(str(tmp_path / "train"), [[1, 2, 3]], np.uint16)
    meta = dict(vocab_size=65536, dtype="uint16", tokenizer="world", eot_id=0)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert open_dataset(str(tmp_path), "train", vocab_size=65536).get(0, 4).tolist() == [1, 2, 3, 0]
    with pytest.raises(ValueError, match="model vocab_size 50304 < data vocab_size 65536"):
        open_dataset(str(tmp_path), "train", vocab_size=50304)
    with pytest.raises(FileNotFoundError, match="re-run prepare.py"):
        open_dataset(str(tmp_path), "val")
    (tmp_path / "meta.json").write_text(json.dumps(meta | {"dtype": "int32"}))
    with pytest.raises(ValueError, match="holds uint16 but meta.json says int32"):
        open_dataset(str(tmp_path), "train")

# ---------------------------------------------------------------- magic-prime sampler

def test_sampler_vectors():
    p, ctx = 2926181, 512
    got = [sample_offset(ii, p, ctx) for ii in (1, 2, 3, 4, 40320)]
    assert got == [925941248, 1414711296, 1029138944, 830257664, 679373824]
    assert magic_prime(1_498_226_207, 512) == 2926181  # MiniPile at ctx 512
    assert magic_prime(1_498_226_207, 4096) == 365759  # RWKV-LM README's ctx 4096 example
    # 1013 = 3*337+2 is prime: allowed when smaller than data_size / ctx_len - 1 (real division), else 983
    assert magic_prime(1014 * 16, 16) == 983
    assert magic_prime(1014 * 16 + 1, 16) == 1013
    check_magic_prime(2926181, 1_498_226_207, 512)

def test_sampler_is_a_permutation_and_validation():
    data_size, ctx = 10_000, 16
    p = magic_prime(data_size, ctx)  # 625 windows -> largest 3n+2 prime below 624
    assert p == 617 and is_prime(p) and p % 3 == 2
    offsets = [sample_offset(ii, p, ctx) for ii in range(p)]
    assert sorted(offsets) == [i * ctx for i in range(p)]  # every window exactly once per p samples
    assert max(offsets) + ctx + 1 <= data_size
    with pytest.raises(ValueError, match="not prime"):
        check_magic_prime(621, data_size, ctx)
    with pytest.raises(ValueError, match="must be 2"):
        check_magic_prime(613, data_size, ctx)  # 613 % 3 == 1
    with pytest.raises(ValueError, match=r"\(0.9, 1\]"):
        check_magic_prime(557, data_size, ctx)
    with pytest.raises(ValueError, match="no usable magic prime"):
        magic_prime(5000, 512)  # 9 windows: the best 3n+2 prime is 5

# ---------------------------------------------------------------- prepare scripts

def test_shakespeare_char_prepare(data_dir, tmp_path):
    script = os.path.join(ROOT, "data", "shakespeare_char", "prepare.py")
    inp = os.path.join(data_dir, "tinyshakespeare", "input.txt")
    out = subprocess.run([sys.executable, script, f"--input={inp}", f"--out={tmp_path}"],
                         capture_output=True, text=True, check=True).stdout
    assert "train has 1,003,854 tokens" in out and "val has 111,540 tokens" in out
    meta = load_meta(str(tmp_path))
    assert meta["vocab_size"] == 65 and meta["dtype"] == "uint16" and meta["eot_id"] is None
    assert meta["chars"] == "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    tok = get_tokenizer(meta["tokenizer"])
    train, val = open_dataset(str(tmp_path), "train", 65), open_dataset(str(tmp_path), "val", 65)
    assert (train.num_tokens, val.num_tokens) == (1_003_854, 111_540)
    text = open(inp, encoding="utf-8").read()
    assert tok.decode(train.get(0, train.num_tokens)) + tok.decode(val.get(0, val.num_tokens)) == text

def test_generic_prepare_jsonl(data_dir, vocab, world, tmp_path):
    from data.prepare import main
    src = os.path.join(data_dir, "rwkv", "demo.jsonl")
    texts = [json.loads(line)["text"] for line in open(src, encoding="utf-8")]
    main([src, f"--tokenizer=world:{vocab}", f"--out={tmp_path}", "--val_frac=0.05", "--workers=2"])
    meta = load_meta(str(tmp_path))
    assert meta == dict(vocab_size=65536, dtype="uint16", tokenizer=f"world:{vocab}", eot_id=0)
    train, val = open_dataset(str(tmp_path), "train"), open_dataset(str(tmp_path), "val")
    assert (len(train), len(val)) == (173, 9)
    docs = [ds.doc(i) for ds in (val, train) for i in range(len(ds))]
    assert all(d[-1] == 0 and 0 not in d[:-1] for d in docs)  # exactly one eot, at the end
    decoded = [world.decode(d[:-1]) for d in docs]
    assert sorted(decoded) == sorted(texts)  # every document once, nothing lost
    assert decoded != texts  # and shuffled
    assert train.num_tokens == sum(len(world.encode(t)) + 1 for t in decoded[9:])


def test_load_examples_cache(data_dir, tmp_path):
    """Tokenised data comes back from the cache equal to a fresh tokenisation; a changed file is tokenised again."""
    from data.chat import load_examples, load_tokenizer
    tok = load_tokenizer(os.path.join(data_dir, "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    path = tmp_path / "mix.jsonl"
    records = [{"question": "What is 2+3?", "answer": "2+3 = 5\n#### 5"}, {"text": "Plain text trains on every token."},
               {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    fresh = load_examples(str(path), tok)
    first = load_examples(str(path), tok, tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1
    cached = load_examples(str(path), tok, tmp_path / "cache")
    for a, b, c in zip(fresh, first, cached):
        assert list(a[0]) == list(b[0]) == list(c[0]) and list(a[1]) == list(b[1]) == list(c[1])
    assert list(fresh[1][0]) == tok.encode(records[1]["text"], add_special_tokens=False) + [tok.eos_token_id]
    assert fresh[1][1].all() and 0 < fresh[0][1].sum() < len(fresh[0][1])  # text: all tokens; chat: the answer
    path.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n")
    assert len(load_examples(str(path), tok, tmp_path / "cache")) == 2


def test_prepare_local_text_split_and_holdout(tmp_path):
    """data/distill/prepare.py on a folder of text files: long files cut at blank lines, a hashed file subset held
    out whole, excluded paths skipped."""
    src = tmp_path / "docs"
    src.mkdir()
    for i in range(20):
        (src / f"doc{i}.txt").write_text("\n\n".join(f"paragraph {j} of file {i} " + "word " * 60 for j in range(12)))
    (src / "skip_me.txt").write_text("x " * 500)
    out = tmp_path / "train.jsonl"
    subprocess.run([sys.executable, "data/distill/prepare.py", f"--source={src}", f"--out={out}", "--exclude=skip_me",
                    "--split_chars=1000", "--holdout=0.3", f"--holdout_out={tmp_path / 'held.jsonl'}"],
                   check=True, cwd=ROOT)
    train = [json.loads(line)["text"] for line in out.open()]
    held = [json.loads(line)["text"] for line in (tmp_path / "held.jsonl").open()]
    file_of = lambda t: t.split(" of file ")[1].split()[0]  # noqa: E731
    assert held and train and not {file_of(t) for t in train} & {file_of(t) for t in held}
    assert all(len(t) < 1000 + 400 for t in train + held) and len(train) + len(held) >= 20 * 3
    assert not any("x x x" in t for t in train + held)


def test_distillation_reads_binidx(data_dir, tmp_path):
    """A binidx file written with the teacher's tokenizer loads as documents trained on every token; one written
    with a larger vocabulary is refused with a message naming the fix."""
    from data.chat import load_examples, load_tokenizer, pack
    tok = load_tokenizer(os.path.join(data_dir, "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    docs = [tok.encode(t, add_special_tokens=False) for t in ("First document.", "The second one, a bit longer.")]
    write_binidx(str(tmp_path / "d"), docs, np.uint16, tok.eos_token_id)
    examples = load_examples(str(tmp_path / "d.bin"), tok)
    assert [list(e[0]) for e in examples] == [d + [tok.eos_token_id] for d in docs]
    assert all(e[1].all() for e in examples)
    x, y = pack(examples, 4)
    n = sum(len(d) + 1 for d in docs)
    assert (y >= 0).all() and x.shape == ((n - 1) // 4, 4)
    write_binidx(str(tmp_path / "w"), [[60000, 1]], np.uint16, 0)
    with pytest.raises(ValueError, match="another tokenizer"):
        load_examples(str(tmp_path / "w.idx"), tok)
