"""
Chat, task and text files for distillation, SFT and GRPO: token ids plus a mask of the tokens that are trained on.

Formats read (one record per line of .jsonl, or a .json list): chat {"messages": [{"role", "content"}, ...]}
rendered with the tokenizer's chat template (loss on assistant tokens only), GSM8K {"question", "answer"} and Alpaca
{"instruction", "input", "output"} as one user/assistant exchange, and plain {"text"} (or a .txt file), which
trains on every token and ends with EOS.
"""
import json
import os

import numpy as np
import torch


def load_tokenizer(spec):
    """A Hugging Face tokenizer from a hub id, a local directory, or a .gguf file."""
    from transformers import AutoTokenizer
    spec = str(spec)
    if (spec.endswith(".gguf") or spec.startswith(("/", ".", "~"))) and not os.path.exists(spec):
        raise FileNotFoundError(f"{spec} does not exist (give a hub id, a local directory or a .gguf file)")
    if spec.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(spec) or ".", gguf_file=os.path.basename(spec))
    return AutoTokenizer.from_pretrained(spec)


def as_messages(record):
    """Chat messages from the formats we read: {'messages'}, GSM8K {'question','answer'}, Alpaca
    {'instruction','input','output'}; None for plain {'text'} records."""
    if "messages" in record:
        return [{"role": m.get("role", m.get("from")), "content": m.get("content", m.get("value"))}
                for m in record["messages"]]
    if "question" in record and "answer" in record:
        return [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": record["answer"]}]
    if "instruction" in record and "output" in record:
        prompt = record["instruction"] + ("\n\n" + record["input"] if record.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    return None


def render_chat(messages, tok):
    """Token ids of a conversation in the tokenizer's chat template, and a mask that is 1 on assistant tokens.
    Each assistant turn spans from the end of the prompt rendered with the generation prompt to the end of the
    conversation rendered through that turn (its end-of-turn token included)."""
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    mask = [0] * len(ids)
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tok.apply_chat_template(messages[:j], tokenize=True, add_generation_prompt=True, return_dict=False))
        end = len(tok.apply_chat_template(messages[:j + 1], tokenize=True, return_dict=False))
        mask[start:end] = [1] * (end - start)
    return ids, mask


def load_examples(path, tok):
    """[(ids, mask)] from a .jsonl/.json/.txt file. Plain text trains on every token and ends with EOS."""
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            records = [{"text": f.read()}]
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    else:
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    examples = []
    for r in records:
        messages = as_messages(r)
        if messages is not None:
            examples.append(render_chat(messages, tok))
        elif "text" in r:
            ids = tok.encode(r["text"], add_special_tokens=False) + [tok.eos_token_id]
            examples.append((ids, [1] * len(ids)))
        else:
            raise ValueError(f"{path}: a record has none of messages/text/question+answer/instruction+output: "
                             f"{sorted(r)[:6]}")
    return examples


def pack(examples, ctx_len):
    """Concatenate examples into one stream and cut it into rows of ctx_len + 1 tokens: x = row[:-1], and the
    targets row[1:] are -1 wherever the target token is not trained on."""
    ids = np.fromiter((t for e in examples for t in e[0]), dtype=np.int64)
    mask = np.fromiter((m for e in examples for m in e[1]), dtype=np.int64)
    n = (len(ids) - 1) // ctx_len
    if n < 1:
        raise ValueError(f"the data has {len(ids)} tokens, fewer than ctx_len + 1 = {ctx_len + 1}")
    starts = np.arange(n) * ctx_len
    rows = np.stack([ids[s:s + ctx_len + 1] for s in starts])
    keep = np.stack([mask[s:s + ctx_len + 1] for s in starts])
    x, y = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())
    y[torch.from_numpy(keep[:, 1:] == 0)] = -1
    return x, y
