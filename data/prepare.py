"""
Generic text -> binidx: tokenize documents, shuffle them with a seed, split train/val by documents,
append the eot id after every document (RWKV make_data.py habit), write train/val.{bin,idx} + meta.json.

    python data/prepare.py --tokenizer=world:path/to/rwkv_vocab_v20230424.txt --out=data/mine corpus.jsonl more/

Inputs: .jsonl files (one document per line, field --field, default 'text'), .txt files (the whole file is
one document; --txt_docs=blank splits it on blank lines instead) and dirs (every .jsonl/.txt inside, sorted).
All texts are held in memory: fine up to a few GB; shard bigger corpora.
"""
import argparse, glob, json, os, random, re, sys
from multiprocessing import Pool
if __name__ == '__main__':  # as a script, sys.path[0] is data/, where our tokenizers.py would shadow the
    # HF `tokenizers` package that transformers imports: use the repo root instead (also for `import data.*`)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from data.tokenizers import get_tokenizer
from data.binidx import token_dtype, write_binidx

def read_documents(paths, field='text', txt_docs='file'):
    files = []
    for p in paths:
        if os.path.isdir(p):  # every .jsonl/.txt inside, sorted; other files are skipped
            files += sorted(f for f in glob.glob(os.path.join(p, '**', '*'), recursive=True)
                            if f.endswith(('.jsonl', '.txt')))
        elif p.endswith(('.jsonl', '.txt')):
            files.append(p)
        else:
            raise SystemExit(f"{p}: expected a .jsonl or .txt file or a dir")
    for path in files:
        with open(path, encoding='utf-8') as f:
            if path.endswith('.jsonl'):
                yield from (json.loads(line)[field] for line in f if line.strip())
            elif txt_docs == 'blank':
                yield from (d for d in re.split(r'\n\s*\n', f.read()) if d.strip())
            else:
                yield f.read()

_tok = None
def _init(spec):  # one tokenizer per worker process
    global _tok
    _tok = get_tokenizer(spec)

def _encode(text):
    return _tok.encode(text)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('inputs', nargs='+', help='.jsonl / .txt files or dirs')
    ap.add_argument('--tokenizer', required=True, help='world[:vocab.txt] | tiktoken:gpt2 | hf:<dir or id>')
    ap.add_argument('--out', required=True, help='dataset dir to write')
    ap.add_argument('--field', default='text', help='jsonl field holding the document text')
    ap.add_argument('--txt_docs', default='file', choices=['file', 'blank'],
                    help='.txt: one document per file, or per blank-line-separated block')
    ap.add_argument('--val_frac', type=float, default=0.005, help='fraction of documents for val (at least 1)')
    ap.add_argument('--seed', type=int, default=1337)
    ap.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1))
    args = ap.parse_args(argv)

    tok = get_tokenizer(args.tokenizer)
    if tok.eot_id is None:
        raise SystemExit(f"{tok.name} has no end-of-document token; use a dataset-specific prepare.py")
    docs = list(read_documents(args.inputs, args.field, args.txt_docs))
    if len(docs) < 2:
        raise SystemExit(f"found {len(docs)} document(s); need at least 2 to split train/val (try --txt_docs=blank)")
    random.Random(args.seed).shuffle(docs)
    n_val = max(1, int(len(docs) * args.val_frac))
    dtype = token_dtype(tok.vocab_size)
    os.makedirs(args.out, exist_ok=True)
    with Pool(args.workers, initializer=_init, initargs=(args.tokenizer,)) as pool:
        for split, part in (('val', docs[:n_val]), ('train', docs[n_val:])):
            ids = pool.imap(_encode, part, chunksize=16)  # keeps document order
            ntok = write_binidx(os.path.join(args.out, split), ids, dtype, tok.eot_id)
            print(f"{split}: {len(part):,} documents, {ntok:,} tokens ({dtype.name})")
    meta = dict(vocab_size=tok.vocab_size, dtype=dtype.name, tokenizer=tok.name, eot_id=tok.eot_id)
    with open(os.path.join(args.out, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=1)

if __name__ == '__main__':
    main()
