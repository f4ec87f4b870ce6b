"""
Build distillation / SFT data as one JSONL file of records train_distill.py reads ({"messages": [...]} or {"text"}).

    python data/distill/prepare.py --source=ultrachat --limit=20000        # HuggingFaceH4/ultrachat_200k (network)
    python data/distill/prepare.py --source=c4 --limit=50000               # allenai/c4 English (network)
    python data/distill/prepare.py --source=path/a.json,path/b.jsonl       # local chat/task/text files, mixed
    python data/distill/prepare.py --source=/usr/share/doc --text_glob='*.txt' --limit=2000  # local plain text
    python data/distill/prepare.py --source=man:/usr/share/man --exclude=gcloud --holdout=0.05  # manual pages (groff)

Records are shuffled with a seed and written to --out (default data/distill/train.jsonl). UltraChat needs
huggingface_hub and pyarrow; C4 needs huggingface_hub. Local sources: .json lists, .jsonl, folders of text files.
"""
import argparse
import glob
import gzip
import json
import os
import random
import re
import subprocess
import zlib


def ultrachat_records(rows):
    """UltraChat-200k rows {prompt, prompt_id, messages: [{role, content}]} -> {"messages"} records."""
    for row in rows:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"] if m.get("content")]
        if len(messages) >= 2 and messages[0]["role"] == "user":
            yield {"messages": messages}


def c4_records(lines):
    """C4 json lines {text, timestamp, url} -> {"text"} records."""
    for line in lines:
        text = json.loads(line)["text"].strip()
        if text:
            yield {"text": text}


def download_ultrachat(limit):
    from huggingface_hub import hf_hub_download
    import pyarrow.parquet as pq
    path = hf_hub_download("HuggingFaceH4/ultrachat_200k", "data/train_sft-00000-of-00003-a3ecf92756993583.parquet",
                           repo_type="dataset")
    return list(ultrachat_records(pq.read_table(path).slice(0, limit).to_pylist()))


def download_c4(limit):
    from huggingface_hub import hf_hub_download
    path = hf_hub_download("allenai/c4", "en/c4-train.00000-of-01024.json.gz", repo_type="dataset")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = []
        for r in c4_records(f):
            records.append(r)
            if len(records) >= limit:
                break
    return records


def man_page_text(path):
    """A manual page rendered to plain text by groff, with the typesetting undone: words hyphenated across lines
    joined, justification spaces collapsed, indentation capped at 4 spaces."""
    with open(path, "rb") as f:
        src = f.read()
    if path.endswith(".gz"):
        src = gzip.decompress(src)
    out = subprocess.run(["groff", "-man", "-Tutf8", "-P-c", "-P-b", "-P-u"], input=src, capture_output=True,
                         env=dict(os.environ, MANWIDTH="100")).stdout.decode("utf-8", errors="replace")
    out = re.sub(r"(\w)[\u2010-]\n\s+(\w)", r"\1\2", out)
    lines = [" " * min(len(line) - len(line.lstrip(" ")), 4) + re.sub(r" {2,}", " ", line.strip())
             for line in out.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def file_documents(path, text_glob, exclude):
    """(name, text) for the files of a folder: plain text, or manual pages for a 'man:' folder."""
    if path.startswith("man:"):
        names = sorted(glob.glob(os.path.join(path[4:], "man[1-8]", "*")))
    else:
        names = sorted(glob.glob(os.path.join(path, "**", text_glob), recursive=True))
    for name in names:
        if any(x in name for x in exclude) or not os.path.isfile(name):
            continue
        if path.startswith("man:"):
            text = man_page_text(name)
        else:
            with open(name, encoding="utf-8", errors="ignore") as f:
                text = f.read().strip()
        yield name, text


def split_text(text, max_chars):
    """Pieces of about max_chars characters, cut at blank lines, so one long file does not fill whole batches."""
    if not max_chars or len(text) <= max_chars:
        return [text]
    pieces, cur = [], ""
    for para in text.split("\n\n"):
        cur += para + "\n\n"
        if len(cur) > max_chars:
            pieces.append(cur)
            cur = ""
    return pieces + ([cur] if cur.strip() else [])


def local_records(path, text_glob, exclude=(), split_chars=0, truncate_chars=0):
    if os.path.isdir(path) or path.startswith("man:"):  # a folder of text files or manual pages, one document each
        for name, text in file_documents(path, text_glob, exclude):
            text = text[:truncate_chars] if truncate_chars else text
            if len(text) > 200:
                yield from ({"text": t, "file": name} for t in split_text(text, split_chars))
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            yield from json.load(f)
    else:
        with open(path, encoding="utf-8") as f:
            yield from (json.loads(line) for line in f if line.strip())


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--source", required=True, help="ultrachat, c4, or comma-separated local files/folders")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "train.jsonl"))
    p.add_argument("--limit", type=int, default=0, help="at most this many records per source (0 = all)")
    p.add_argument("--text_glob", default="*.txt")
    p.add_argument("--exclude", default="", help="comma-separated: skip files whose path contains any of these")
    p.add_argument("--split_chars", type=int, default=0, help="cut documents into pieces of about this many chars")
    p.add_argument("--truncate_chars", type=int, default=0, help="keep only the first this many chars of a file")
    p.add_argument("--holdout", type=float, default=0.0, help="this fraction of the files (by a hash of the file "
                   "name) goes to --holdout_out instead")
    p.add_argument("--holdout_out", default="")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()
    exclude = [x for x in args.exclude.split(",") if x]
    records = []
    for source in args.source.split(","):
        if source == "ultrachat":
            got = download_ultrachat(args.limit or 10 ** 9)
        elif source == "c4":
            got = download_c4(args.limit or 10 ** 9)
        elif os.path.exists(source.removeprefix("man:")):
            got = list(local_records(source, args.text_glob, exclude, args.split_chars, args.truncate_chars))
            got = got[:args.limit] if args.limit else got
        else:
            raise SystemExit(f"error: unknown source {source!r} (ultrachat, c4, or an existing file or folder)")
        print(f"{source}: {len(got)} records")
        records += got
    is_held = [bool("file" in r and zlib.crc32(os.path.basename(r["file"]).encode()) % 10 ** 6 < args.holdout * 10 ** 6)
               for r in records]
    held = [r for r, h in zip(records, is_held) if h]
    records = [r for r, h in zip(records, is_held) if not h]
    random.Random(args.seed).shuffle(records)
    for out, rs in [(args.out, records)] + ([(args.holdout_out or args.out + ".heldout", held)] if held else []):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out + ".tmp", "w", encoding="utf-8") as f:
            for r in rs:
                f.write(json.dumps({k: v for k, v in r.items() if k != "file"}, ensure_ascii=False) + "\n")
        os.replace(out + ".tmp", out)
        print(f"wrote {len(rs)} records to {out}")
