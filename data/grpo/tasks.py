"""
GRPO tasks and rewards: a generated arithmetic task, GSM8K answer extraction, and the reward functions that
train_grpo.py looks up by name (REWARDS). A reward is a plain function (completion text, reference answer) -> float.

A prompt record (one line of a prompt .jsonl) is {"prompt": text, "answer": text}; train_grpo.py wraps `prompt`
in the model's chat format (or feeds it raw) and hands `answer` to the rewards.
"""
import json
import random
import re
import zlib

# --- answer extraction and comparison ------------------------------------------------------------------------

NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"


def to_number(text):
    """'1,234' -> 1234.0, '$5.50' -> 5.5, '3/4' -> 0.75; None when the text is not a number."""
    if text is None:
        return None
    t = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    t = re.sub(r"^\\text\{(.*)\}$", r"\1", t)
    m = re.fullmatch(r"\\d?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}|(-?[\d.]+)/(-?[\d.]+)", t)
    try:
        if m:
            num, den = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
            return float(num) / float(den)
        return float(t)
    except (ValueError, ZeroDivisionError):
        return None


def last_boxed(text):
    """The content of the last \\boxed{...} (nested braces allowed), or None."""
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    depth, j = 0, i + len("\\boxed{")
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            if depth == 0:
                return text[j:k]
            depth -= 1
    return None


def extract_answer(text):
    """GSM8K style: the number after the last '####', else the last \\boxed{}, else the last number in the text."""
    if "####" in text:
        m = re.search(NUMBER, text.rsplit("####", 1)[1])
        if m:
            return m.group(0)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = re.findall(NUMBER, text)
    return numbers[-1] if numbers else None


def same_number(a, b, tol=1e-6):
    x, y = to_number(a), to_number(b)
    return x is not None and y is not None and abs(x - y) <= tol * max(1.0, abs(y))


# --- rewards: (completion, answer) -> float ---------------------------------------------------------------------

def gsm8k_reward(completion, answer):
    """1 if the extracted final answer equals the reference numerically, else 0."""
    reference = answer if to_number(answer) is not None else extract_answer(answer)  # '72', or a whole solution
    return float(same_number(extract_answer(completion), reference))


def format_reward(completion, answer):
    """1 if the completion states its final answer in a recognised form ('#### 42' or '\\boxed{42}'), else 0."""
    marked = re.search(r"####\s*(" + NUMBER + ")", completion)
    boxed = last_boxed(completion)
    return float(bool(marked) or (boxed is not None and to_number(boxed) is not None))


def arith_reward(completion, answer):
    """1 if the completion's first number (its first line, the answer to 'a+b=') equals the answer, else 0."""
    m = re.match(r"\s*(" + NUMBER + r")\s*$", completion.strip().split("\n")[0])
    return float(bool(m) and same_number(m.group(1), answer))


def digits_reward(completion, answer):
    """Partial credit for a near miss: the share of the reference's digits that the extracted answer gets right,
    aligned from the units digit, 0 when the signs differ, and less when the lengths differ (165 for 175: 2/3).
    A dense signal for a small model that rarely gets a whole sum right; pair it with an exact-match reward."""
    got, ref = extract_answer(completion), answer.strip()
    if got is None or to_number(got) is None or to_number(ref) is None:
        return 0.0
    x, y = int(round(to_number(got))), int(round(to_number(ref)))
    if (x < 0) != (y < 0):
        return 0.0
    a, b = str(abs(x))[::-1], str(abs(y))[::-1]
    return sum(p == q for p, q in zip(a, b)) / max(len(a), len(b))


REWARDS = {"gsm8k": gsm8k_reward, "format": format_reward, "arith": arith_reward, "digits": digits_reward}


def parse_rewards(spec):
    """'gsm8k:1.0,format:0.2' -> [(name, function, weight)]; raises ValueError naming an unknown reward."""
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, w = part.partition(":")
        if name not in REWARDS:
            raise ValueError(f"unknown reward '{name}' in rewards={spec!r}: choose from {', '.join(REWARDS)} "
                             f"(e.g. rewards='gsm8k:1.0,format:0.2')")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"reward weight {w!r} in rewards={spec!r} is not a number") from None
        out.append((name, REWARDS[name], weight))
    if not out:
        raise ValueError("rewards is empty: name at least one reward, e.g. rewards='arith'")
    return out


# --- the arithmetic task --------------------------------------------------------------------------------------

def arith_problem(rng, digits, ops):
    """One problem 'a<op>b' with operands of digits[0]..digits[1] digits each; -> (text, answer)."""
    def operand():
        n = rng.randint(digits[0], digits[1])
        return rng.randint(0 if n == 1 else 10 ** (n - 1), 10 ** n - 1)
    a, b, op = operand(), operand(), rng.choice(ops)
    return f"{a}{op}{b}", str({"+": a + b, "-": a - b, "*": a * b}[op])


def is_heldout(text, heldout_percent):
    """A fixed split by a hash of the problem text: held-out problems never appear in training, for any seed."""
    return zlib.crc32(text.encode()) % 100 < heldout_percent


def arith_prompts(n, split="train", digits=(1, 2), ops="+", seed=0, heldout_percent=10, style="raw"):
    """n distinct problems of one split, deterministic in seed. style 'raw': prompt '12+34=' (the completion is
    the number); 'question': 'What is 12 + 34? ...' for chat models. -> [{'prompt', 'answer'}]"""
    if not (1 <= digits[0] <= digits[1]) or not ops or set(ops) - set("+-*"):
        raise ValueError(f"arithmetic task needs 1 <= digits[0] <= digits[1] and ops from '+-*', got {digits}, {ops!r}")
    space = len(ops) * (10 ** digits[1]) ** 2
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(50 * n + 1000):
        if len(out) == n:
            break
        text, answer = arith_problem(rng, digits, ops)
        if text in seen or is_heldout(text, heldout_percent) != (split != "train"):
            continue
        seen.add(text)
        if style == "raw":
            prompt = text + "="
        else:
            a, op, b = re.match(r"(\d+)([+*-])(\d+)", text).groups()
            prompt = f"What is {a} {op} {b}? End your answer with '#### <number>'."  # no example number to copy
        out.append({"prompt": prompt, "answer": answer})
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct {split} problems of {digits} digits with ops {ops!r} "
                         f"(asked for {n}; the problem space has about {space})")
    return out


def gsm8k_prompts(path, suffix="", limit=0):
    """GSM8K {question, answer} lines -> [{'prompt': question + suffix, 'answer': the number after ####}]."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out.append({"prompt": r["question"] + suffix, "answer": r["answer"].rsplit("####", 1)[-1].strip()})
                if limit and len(out) == limit:
                    break
    return out


def load_prompts(path):
    """[{'prompt', 'answer'}] from a prompt .jsonl; ValueError naming the file and the fix when it is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise ValueError(f"prompt file not found: {path!r} (write one with data/grpo/prepare.py)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON lines ({e})") from None
    for i, r in enumerate(records):
        if not (isinstance(r, dict) and isinstance(r.get("prompt"), str) and "answer" in r):
            raise ValueError(f"{path} line {i + 1}: expected {{\"prompt\": ..., \"answer\": ...}}")
        r["answer"] = str(r["answer"])
    if not records:
        raise ValueError(f"{path} holds no prompts")
    return records
