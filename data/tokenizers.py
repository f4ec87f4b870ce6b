"""
Tokenizers behind one small interface: encode(text) -> list[int], decode(ids) -> str, vocab_size, eot_id, name,
and end_ids: the ids that end a generated reply (eot, plus a chat template's end-of-turn token).
get_tokenizer(spec) builds one from a spec string:
    world[:path/to/rwkv_vocab_v20230424.txt]   RWKV World (plain 'world' uses the copy in the `rwkv` pip package)
    tiktoken:<encoding>                        e.g. tiktoken:gpt2
    hf:<local dir or hub id>                   transformers.AutoTokenizer
    char:<meta.json>                           character level, vocab = the "chars" string in that file
"""
import ast, json, os

def is_partial(text):
    """True if decoded text ends in a cut UTF-8 sequence (U+FFFD): streaming printers wait for more tokens."""
    return '\ufffd' in text

class WorldTokenizer:
    """RWKV World: greedy longest match on UTF-8 bytes over a fixed vocab, no merges, no normalisation.
    id 0 is end-of-document and is not in the vocab file; ids 65530..65535 are unused padding, so
    vocab_size is 65536 like the official models."""
    def __init__(self, vocab_file, name=None):
        self.name, self.eot_id, self.vocab_size = name or f"world:{vocab_file}", 0, 65536
        self.end_ids = {0}
        self.id2bytes = {0: b''}  # eot decodes to nothing; callers stop on eot_id themselves
        with open(vocab_file, encoding='utf-8') as f:
            for line in f:  # "<id> <python str or bytes literal> <byte length>"
                i, rest = line.split(' ', 1)
                lit, n = rest.rstrip('\n').rsplit(' ', 1)
                tok = ast.literal_eval(lit)
                tok = tok.encode('utf-8') if isinstance(tok, str) else tok
                assert len(tok) == int(n), f"bad vocab line: {line!r}"
                self.id2bytes[int(i)] = tok
        self.bytes2id = {b: i for i, b in self.id2bytes.items() if i != 0}
        # For each 2-byte prefix, the token lengths that start with it, longest first. Encoding then
        # tries a handful of dict lookups per position (the table-by-first-bytes idea of RWKV's demo).
        lens = {}
        for b in self.bytes2id:
            if len(b) >= 2:
                lens.setdefault(b[:2], set()).add(len(b))
        self.lens = {k: sorted(v | {1}, reverse=True) for k, v in lens.items()}

    def encode_bytes(self, src):
        ids, i, n, b2i, lens = [], 0, len(src), self.bytes2id, self.lens
        while i < n:
            for L in lens.get(src[i:i + 2], (1,)):  # every single byte is a token, so L=1 always matches
                tok = b2i.get(src[i:i + L])
                if tok is not None:
                    ids.append(tok)
                    i += L
                    break
        return ids

    def encode(self, text):
        return self.encode_bytes(text.encode('utf-8'))

    def decode_bytes(self, ids):
        return b''.join(self.id2bytes[int(i)] for i in ids)

    def decode(self, ids):
        # a token can end mid-character (bytes tokens such as b'\xe4'), so partial UTF-8 is expected
        return self.decode_bytes(ids).decode('utf-8', errors='replace')

class TiktokenTokenizer:
    def __init__(self, encoding):
        import tiktoken
        self.enc = tiktoken.get_encoding(encoding)
        self.name, self.eot_id, self.vocab_size = f"tiktoken:{encoding}", self.enc.eot_token, self.enc.n_vocab
        self.end_ids = {self.eot_id}

    def encode(self, text):
        return self.enc.encode_ordinary(text)  # '<|endoftext|>' inside a document is plain text, not eot

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids], errors='replace')

class HFTokenizer:
    def __init__(self, path):  # a hub id, a directory or a .gguf file
        from data.chat import load_tokenizer, turn_end_id
        self.tok = load_tokenizer(path)
        self.name, self.eot_id, self.vocab_size = f"hf:{path}", self.tok.eos_token_id, len(self.tok)
        self.end_ids = {i for i in (self.eot_id, turn_end_id(self.tok)) if i is not None}

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)  # no BOS: documents are joined by eot

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids])

class CharTokenizer:
    """Character level; ids are positions in the sorted "chars" string of a meta.json. No eot token."""
    def __init__(self, meta_file):
        with open(meta_file, encoding='utf-8') as f:
            self.chars = json.load(f)['chars']
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.name, self.eot_id, self.vocab_size = f"char:{meta_file}", None, len(self.chars)
        self.end_ids = set()

    def encode(self, text):
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return ''.join(self.chars[int(i)] for i in ids)

def get_tokenizer(spec):
    kind, _, arg = spec.partition(':')
    if kind == 'world':
        if not arg:  # fall back to the vocab shipped inside the `rwkv` pip package
            try:
                import rwkv
            except ImportError:
                raise ValueError("tokenizer 'world' needs a vocab path (world:path/to/rwkv_vocab_v20230424.txt) "
                                 "or `pip install rwkv`") from None
            return WorldTokenizer(os.path.join(os.path.dirname(rwkv.__file__), 'rwkv_vocab_v20230424.txt'), 'world')
        return WorldTokenizer(arg)
    if kind in ('tiktoken', 'hf', 'char') and arg:
        return {'tiktoken': TiktokenTokenizer, 'hf': HFTokenizer, 'char': CharTokenizer}[kind](arg)
    raise ValueError(f"unknown tokenizer spec {spec!r}: use world[:vocab.txt], tiktoken:<encoding>, "
                     f"hf:<dir or hub id> or char:<meta.json>")
