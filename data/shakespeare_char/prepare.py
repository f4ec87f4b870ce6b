"""
Tiny Shakespeare, character level (nanoGPT's shakespeare_char): 65 characters, ids in sorted-char order,
first 90% train / last 10% val, written as train/val binidx (uint16) + meta.json next to this script.

    python data/shakespeare_char/prepare.py [path/to/input.txt | --input=path] [--out=dir]

Without a path it reads $RWKV7_DATA_DIR/tinyshakespeare/input.txt.
"""
import json, os, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))  # run as a script
from data.binidx import write_binidx

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"

def main(argv):
    out_dir, path = os.path.dirname(os.path.abspath(__file__)), None
    for a in argv:
        if a.startswith('--out='):
            out_dir = a[len('--out='):]
        else:
            path = a[len('--input='):] if a.startswith('--input=') else a
    if path is None and os.environ.get('RWKV7_DATA_DIR'):
        path = os.path.join(os.environ['RWKV7_DATA_DIR'], 'tinyshakespeare', 'input.txt')
    if path is None or not os.path.isfile(path):
        sys.exit(f"input.txt not found ({path}); download it with\n  curl -o input.txt {URL}\n"
                 f"then run: python {sys.argv[0]} input.txt")
    with open(path, encoding='utf-8') as f:
        text = f.read()
    chars = ''.join(sorted(set(text)))
    stoi = {c: i for i, c in enumerate(chars)}
    print(f"length of dataset in characters: {len(text):,}")
    print(f"vocab size: {len(chars)}: {chars!r}")

    # one document per split and no eot: the char vocab has no end-of-document token
    n = int(len(text) * 0.9)
    os.makedirs(out_dir, exist_ok=True)
    for split, part in (('train', text[:n]), ('val', text[n:])):
        ntok = write_binidx(os.path.join(out_dir, split), [[stoi[c] for c in part]], 'uint16', eot_id=None)
        print(f"{split} has {ntok:,} tokens")
    meta = dict(vocab_size=len(chars), dtype='uint16', tokenizer='char:meta.json', eot_id=None, chars=chars)
    with open(os.path.join(out_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=1)

if __name__ == '__main__':
    main(sys.argv[1:])

# length of dataset in characters: 1,115,394
# vocab size: 65: "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# train has 1,003,854 tokens
# val has 111,540 tokens
