"""
Chat, task and text files for distillation, SFT and GRPO: token ids plus a mask of the tokens that are trained on.

Formats read (one record per line of .jsonl, or a .json list): chat {"messages": [{"role", "content"}, ...]}
rendered with the tokenizer's chat template (loss on assistant tokens only), GSM8K {"question", "answer"} and Alpaca
{"instruction", "input", "output"} as one user/assistant exchange, and plain {"text"} (or a .txt file), which
trains on every token and ends with EOS.
"""
import json
import os
import zlib

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


def turn_end_id(tok):
    """The special token that closes an assistant turn in tok's chat template ('<|im_end|>' for SmolLM2 and Qwen,
    '<|eot_id|>' for Llama 3), or None. Replies end there even when the tokenizer's eos is another token (SmolLM2's
    GGUF names '<|endoftext|>' as eos under some transformers versions)."""
    if not getattr(tok, "chat_template", None):
        return None
    marker = "Zq7Reply"
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}],
                                       tokenize=False)
    except Exception:  # a template may reject this minimal conversation (jinja raises its own error types)
        return None
    after = text.rsplit(marker, 1)[1] if marker in text else ""
    ids = tok.encode(after, add_special_tokens=False) if after else []
    return ids[0] if ids and ids[0] in tok.all_special_ids else None


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


def read_records(path):
    """The records of a .jsonl / .json list / .txt (one {'text'} record) file."""
    with open(path, encoding="utf-8") as f:
        if path.endswith(".txt"):
            return [{"text": f.read()}]
        if path.endswith(".json"):
            return json.load(f)
        return [json.loads(line) for line in f if line.strip()]


def tokenize_records(records, tok, path=""):
    """[(ids, mask)] for chat/task/text records; plain text is encoded in one batched call (the fast tokenizer
    spreads it over threads) and trains on every token, ending with EOS."""
    examples, texts = [], []
    for i, r in enumerate(records):
        messages = as_messages(r)
        if messages is not None:
            examples.append(render_chat(messages, tok))
        elif "text" in r:
            examples.append(None)
            texts.append((i, r["text"]))
        else:
            raise ValueError(f"{path}: a record has none of messages/text/question+answer/instruction+output: "
                             f"{sorted(r)[:6]}")
    if texts:
        encoded = tok([t for _, t in texts], add_special_tokens=False)["input_ids"]
        for (i, _), ids in zip(texts, encoded):
            examples[i] = (ids + [tok.eos_token_id], [1] * (len(ids) + 1))
    return examples


def binidx_examples(path, tok):
    """The documents of a binidx file (each already ends with its end-of-text id), all tokens trained."""
    from data.binidx import BinIdx
    data = BinIdx(path)
    if data.num_tokens and int(data.tokens.max()) >= len(tok):
        raise ValueError(f"{path} holds token id {int(data.tokens.max())}, beyond the tokenizer's {len(tok)} ids: it "
                         f"was written with another tokenizer (write it with data/prepare.py --tokenizer=hf:<teacher>)")
    return [(np.asarray(data.doc(i), dtype=np.int32), np.ones(int(data.sizes[i]), dtype=np.uint8))
            for i in range(len(data))]


def load_examples(path, tok, cache_dir=""):
    """[(ids, mask)] (numpy arrays) from a .jsonl/.json/.txt file or a binidx .bin/.idx file. Rendering and tokenising a large file takes
    minutes, so with a cache_dir the result is kept there, under a key covering the file (path, size, time) and the
    tokenizer (vocabulary, special tokens, chat template): a changed file or tokenizer makes a new entry."""
    if path.endswith((".bin", ".idx")):  # binidx (data/prepare.py): documents of ids, every token trained
        return binidx_examples(path, tok)
    st = os.stat(path)
    ident = [os.path.abspath(path), st.st_size, st.st_mtime_ns, len(tok), tok.eos_token_id,
             getattr(tok, "chat_template", None),
             tok.convert_ids_to_tokens(list(range(0, len(tok), max(1, len(tok) // 257))))]
    cache = bool(cache_dir)
    cache_file = os.path.join(os.path.expanduser(cache_dir), f"{os.path.basename(path)}."
                              f"{zlib.crc32(json.dumps(ident, default=str).encode()):08x}.tokens.npz")
    if cache and os.path.exists(cache_file):
        z = np.load(cache_file)
        ids, mask, bounds = z["ids"], z["mask"], np.cumsum(np.concatenate([[0], z["lengths"]]))
        return [(ids[a:b], mask[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    examples = tokenize_records(read_records(path), tok, path)
    examples = [(np.asarray(i, dtype=np.int32), np.asarray(m, dtype=np.uint8)) for i, m in examples]
    if cache:
        try:
            os.makedirs(os.path.dirname(cache_file), exist_ok=True)
            with open(cache_file + ".tmp", "wb") as f:
                np.savez(f, ids=np.concatenate([e[0] for e in examples]), mask=np.concatenate([e[1] for e in examples]),
                         lengths=np.array([len(e[0]) for e in examples], dtype=np.int64))
            os.replace(cache_file + ".tmp", cache_file)
        except OSError:  # an unwritable cache folder: tokenise again next time
            pass
    return examples


def pack(examples, ctx_len):
    """Concatenate examples into one stream and cut it into rows of ctx_len + 1 tokens: x = row[:-1], and the
    targets row[1:] are -1 wherever the target token is not trained on."""
    ids = np.concatenate([np.asarray(e[0], dtype=np.int64) for e in examples])
    mask = np.concatenate([np.asarray(e[1], dtype=np.int64) for e in examples])
    n = (len(ids) - 1) // ctx_len
    if n < 1:
        raise ValueError(f"the data has {len(ids)} tokens, fewer than ctx_len + 1 = {ctx_len + 1}")
    starts = np.arange(n) * ctx_len
    rows = np.stack([ids[s:s + ctx_len + 1] for s in starts])
    keep = np.stack([mask[s:s + ctx_len + 1] for s in starts])
    x, y = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())
    y[torch.from_numpy(keep[:, 1:] == 0)] = -1
    return x, y
