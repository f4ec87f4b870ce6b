"""
Pseudo-labels: the teacher's own answers to a list of prompts, written as chat records for train_distill.py
(distilling on what the teacher itself says keeps the student's targets inside the teacher's distribution).

    python data/distill/teacher_answers.py --teacher=HuggingFaceTB/SmolLM2-135M-Instruct \
        --prompts=path/to/gsm8k/train.jsonl --out=data/distill/teacher.jsonl --limit=2000 --max_new_tokens=256

Prompts: .jsonl/.json records with 'prompt', 'question' (GSM8K), 'instruction' (+'input', Alpaca), or 'messages'
(everything before the last assistant turn). The teacher may be a hub id, a directory or a .gguf file.
"""
import argparse
import json
import os
import sys

import torch

sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from data.chat import load_tokenizer  # noqa: E402
from model import load_hf_model  # noqa: E402


def prompt_messages(record):
    if "messages" in record:
        msgs = record["messages"]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
        return msgs[:last]
    if "question" in record:
        return [{"role": "user", "content": record["question"]}]
    if "instruction" in record:
        return [{"role": "user", "content": record["instruction"] + ("\n\n" + record["input"] if record.get("input") else "")}]
    return [{"role": "user", "content": record["prompt"]}]


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--teacher", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(args.teacher)
    tok.padding_side = "left"  # generate continues every row from its last real token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = load_hf_model(args.teacher, torch.bfloat16 if device == "cuda" else torch.float32).to(device).eval()
    with open(args.prompts, encoding="utf-8") as f:
        records = json.load(f) if args.prompts.endswith(".json") else [json.loads(x) for x in f if x.strip()]
    prompts = [prompt_messages(r) for r in records[:args.limit]]
    with open(args.out + ".tmp", "w", encoding="utf-8") as out:
        for i in range(0, len(prompts), args.batch_size):
            batch = prompts[i:i + args.batch_size]
            texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in batch]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                                     temperature=args.temperature or None, top_p=None, top_k=None,
                                     pad_token_id=tok.pad_token_id)
            for msgs, row in zip(batch, gen[:, enc["input_ids"].shape[1]:]):
                answer = tok.decode(row, skip_special_tokens=True).strip()
                out.write(json.dumps({"messages": msgs + [{"role": "assistant", "content": answer}]}) + "\n")
            print(f"{min(i + args.batch_size, len(prompts))}/{len(prompts)}", flush=True)
    os.replace(args.out + ".tmp", args.out)
