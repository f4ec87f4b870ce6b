"""
Build distillation / SFT data as one JSONL file of records train_distill.py reads ({"messages": [...]} or {"text"}).

    python data/distill/prepare.py --source=ultrachat --limit=20000        # HuggingFaceH4/ultrachat_200k (network)
    python data/distill/prepare.py --source=c4 --limit=50000               # allenai/c4 English (network)
    python data/distill/prepare.py --source=path/a.json,path/b.jsonl       # local chat/task/text files, mixed
    python data/distill/prepare.py --source=/usr/share/doc --text_glob='*.txt' --limit=2000  # local plain text

Records are shuffled with a seed and written to --out (default data/distill/train.jsonl). UltraChat needs
huggingface_hub and pyarrow; C4 needs huggingface_hub. Local sources: .json lists, .jsonl, folders of text files.
"""
import argparse
import glob
import gzip
import json
import os
import random


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


def local_records(path, text_glob):
    if os.path.isdir(path):  # a folder of plain-text files, one document each
        for name in sorted(glob.glob(os.path.join(path, "**", text_glob), recursive=True)):
            with open(name, encoding="utf-8", errors="ignore") as f:
                text = f.read().strip()
            if len(text) > 200:
                yield {"text": text}
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
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()
    records = []
    for source in args.source.split(","):
        if source == "ultrachat":
            got = download_ultrachat(args.limit or 10 ** 9)
        elif source == "c4":
            got = download_c4(args.limit or 10 ** 9)
        elif os.path.exists(source):
            got = list(local_records(source, args.text_glob))
            got = got[:args.limit] if args.limit else got
        else:
            raise SystemExit(f"error: unknown source {source!r} (ultrachat, c4, or an existing file or folder)")
        print(f"{source}: {len(got)} records")
        records += got
    random.Random(args.seed).shuffle(records)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {len(records)} records to {args.out}")
