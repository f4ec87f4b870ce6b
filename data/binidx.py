"""
Megatron "binidx" token files (what RWKV-LM trains on) and RWKV's "magic prime" sampler.

x.bin = raw concatenated token ids. x.idx (little-endian) = a 34-byte header:
    magic b"MMIDIDX\\x00\\x00" (9) | version uint64 = 1 | dtype code uint8 | len uint64 | doc_count uint64
then int32 sizes[len], int64 pointers[len] (byte offsets into .bin), int64 doc_idx[doc_count].
Like RWKV's make_data.py we write one item per document, with the eot id appended to it, and
doc_idx = [0, 1, ..., len]. A dataset dir holds train.{bin,idx}, val.{bin,idx} and meta.json.
"""
import json, math, os, struct
import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
# Megatron's dtype codes. Code 7 ("double") reads as float64 too. uint32 has no code in the format,
# so vocabularies over 65536 ids (Qwen: 151k) are written as int32 (code 4), as Megatron does.
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float64, 8: np.uint16}
CODES = {np.dtype(v): k for k, v in sorted(DTYPES.items(), reverse=True)}  # float64 -> 6

def token_dtype(vocab_size):
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.int32)

class BinIdxWriter:
    """Streams documents to prefix.bin; close() (or leaving a `with` block) writes prefix.idx."""
    def __init__(self, prefix, dtype, eot_id=0):
        self.prefix, self.dtype, self.eot_id = prefix, np.dtype(dtype), eot_id
        self.f, self.sizes = open(prefix + '.bin', 'wb'), []

    def add_document(self, ids):
        ids = list(ids) + ([] if self.eot_id is None else [self.eot_id])
        a = np.asarray(ids, dtype=np.int64)
        info = np.iinfo(self.dtype)
        if len(a) and (a.min() < info.min or a.max() > info.max):  # never wrap ids around silently
            raise ValueError(f"token id {a.max()} does not fit {self.dtype.name}; use int32 for vocab > 65536")
        self.f.write(a.astype(self.dtype).tobytes())
        self.sizes.append(len(a))

    def close(self):
        self.f.close()
        sizes = np.array(self.sizes, dtype=np.int32)
        pointers = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)[:-1]]) * self.dtype.itemsize
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
        with open(self.prefix + '.idx', 'wb') as f:
            f.write(MAGIC + struct.pack('<QBQQ', 1, CODES[self.dtype], len(sizes), len(doc_idx)))
            f.write(sizes.tobytes() + pointers.astype(np.int64).tobytes() + doc_idx.tobytes())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

def write_binidx(prefix, docs, dtype, eot_id=0):
    """Write an iterable of token-id lists; returns the number of tokens written (eot included)."""
    with BinIdxWriter(prefix, dtype, eot_id) as w:
        for ids in docs:
            w.add_document(ids)
    return int(sum(w.sizes))

class BinIdx:
    """Reads prefix.{bin,idx}. Training ignores documents and reads windows of the flat token stream."""
    def __init__(self, prefix):
        self.prefix = prefix[:-4] if prefix.endswith(('.bin', '.idx')) else prefix
        with open(self.prefix + '.idx', 'rb') as f:
            head = f.read(34)
            if head[:9] != MAGIC:
                raise ValueError(f"{self.prefix}.idx is not a binidx index (bad magic {head[:9]!r})")
            version, code, n, n_doc = struct.unpack('<QBQQ', head[9:])
            assert version == 1, f"{self.prefix}.idx: unknown binidx version {version}"
            self.dtype = np.dtype(DTYPES[code])
            self.sizes = np.frombuffer(f.read(4 * n), dtype=np.int32)
            self.pointers = np.frombuffer(f.read(8 * n), dtype=np.int64)
            self.doc_idx = np.frombuffer(f.read(8 * n_doc), dtype=np.int64)
        nbytes = os.path.getsize(self.prefix + '.bin')
        self.num_tokens = nbytes // self.dtype.itemsize  # RWKV's data_size
        self.tokens = (np.memmap(self.prefix + '.bin', dtype=self.dtype, mode='r') if nbytes
                       else np.empty(0, dtype=self.dtype))  # mmap cannot map an empty file

    def __len__(self):
        return len(self.sizes)  # number of items (= documents for files we and RWKV write)

    def get(self, offset, length):
        """`length` tokens of the flat stream from token `offset`, across document boundaries."""
        assert 0 <= offset and offset + length <= self.num_tokens, f"window {offset}+{length} > {self.num_tokens}"
        return self.tokens[offset:offset + length]

    def doc(self, i):
        """Item i (one document, with its trailing eot)."""
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sizes[i])]

# ----------------------------------------------------------------------------------------------
# Dataset dirs: train/val binidx + meta.json {vocab_size, dtype, tokenizer, eot_id, ...}

def load_meta(data_dir):
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run the dataset's prepare.py first")
    with open(path) as f:
        meta = json.load(f)
    kind, _, arg = meta['tokenizer'].partition(':')
    if kind == 'char' and not os.path.isabs(arg):  # char tables live in the dataset dir itself
        meta['tokenizer'] = 'char:' + os.path.join(data_dir, arg)
    return meta

def open_dataset(data_dir, split, vocab_size=None):
    """Open data_dir/{split}.{bin,idx}, checked against meta.json and (if given) the model's vocab_size."""
    meta, prefix = load_meta(data_dir), os.path.join(data_dir, split)
    if not os.path.isfile(prefix + '.idx'):
        raise FileNotFoundError(f"{prefix}.idx not found: re-run prepare.py for {data_dir}")
    ds = BinIdx(prefix)
    if ds.dtype != np.dtype(meta['dtype']):
        raise ValueError(f"{prefix}.idx holds {ds.dtype.name} but meta.json says {meta['dtype']}: re-run prepare.py")
    if vocab_size is not None and vocab_size < meta['vocab_size']:
        raise ValueError(f"model vocab_size {vocab_size} < data vocab_size {meta['vocab_size']} "
                         f"({meta['tokenizer']}): raise vocab_size or re-run prepare.py with a matching tokenizer")
    return ds

# ----------------------------------------------------------------------------------------------
# Magic-prime sampling (RWKV-LM dataset.py): sample ii starts at token ((factor * ii^3) mod p) * ctx_len.
# p prime with p % 3 == 2 makes x -> x^3 a permutation of Z_p, so each of the p slots of ctx_len tokens is
# visited once per p samples, in a scrambled order, with no stored permutation. ii is a global counter:
# ii = 1 + epoch * 40320 + idx * world_size + rank (a mini-epoch is 40320 samples).

def is_prime(n):
    if n < 2 or n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))

def check_magic_prime(p, data_size, ctx_len):
    slots = data_size // ctx_len
    if not is_prime(p):
        raise ValueError(f"magic_prime {p} is not prime")
    if p % 3 != 2:
        raise ValueError(f"magic_prime {p} % 3 = {p % 3}, must be 2 (so that x^3 mod p is a permutation)")
    if not 0.9 < p / max(slots, 1) <= 1:
        raise ValueError(f"magic_prime {p} must be in (0.9, 1] x {slots} (= {data_size} tokens // ctx_len {ctx_len})")
    if p * ctx_len + 1 > data_size:  # the last slot reads ctx_len + 1 tokens
        raise ValueError(f"magic_prime {p} too large: windows would run past the {data_size} tokens")

def magic_prime(data_size, ctx_len):
    """RWKV's rule: the largest prime p = 3n+2 smaller than data_size / ctx_len - 1 (real division:
    1498226207 / 512 - 1 = 2926222.06 -> 2926181 for MiniPile at ctx_len 512)."""
    p = (data_size - 1) // ctx_len - 1  # the largest integer < data_size / ctx_len - 1
    while p > 1 and not (p % 3 == 2 and is_prime(p)):
        p -= 1
    try:
        check_magic_prime(p, data_size, ctx_len)
    except ValueError as e:  # tiny data: no 3n+2 prime close enough below the window count
        raise ValueError(f"no usable magic prime for {data_size} tokens at ctx_len {ctx_len} ({e})") from None
    return p

def sample_offset(ii, p, ctx_len):
    """Token offset of sample ii (read ctx_len + 1 tokens from there). Python ints: ii^3 needs no care."""
    factor = int(p * ((math.sqrt(5) - 1) / 2))  # same float expression as RWKV-LM, so same factor
    return ((factor * ii ** 3) % p) * ctx_len
