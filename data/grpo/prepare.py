"""
Prompt files for train_grpo.py: {"prompt", "answer"} per line, train.jsonl and test.jsonl in --out.

    python data/grpo/prepare.py --task=arith --digits=1,2 --ops=+ --out=data/grpo/arith12          # '12+34='
    python data/grpo/prepare.py --task=arith --digits=2,3 --style=question --out=data/grpo/add23    # chat models
    python data/grpo/prepare.py --task=gsm8k --gsm8k_dir=path/to/gsm8k --out=data/grpo/gsm8k

The arithmetic problems are deterministic in --seed; a problem is held out by a hash of its text, so the train
and test files never share a problem.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.grpo.tasks import arith_prompts, gsm8k_prompts  # noqa: E402

GSM8K_SUFFIX = "\nReason step by step, then give the final answer after '####', e.g. '#### 42'."


def write(records, path):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["arith", "gsm8k"], required=True)
    p.add_argument("--out", required=True, help="output directory (train.jsonl, test.jsonl)")
    p.add_argument("--digits", default="1,2", help="arith: operand digits, min,max")
    p.add_argument("--ops", default="+", help="arith: operators from '+-*'")
    p.add_argument("--n_train", type=int, default=5000)
    p.add_argument("--n_test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout_percent", type=int, default=10)
    p.add_argument("--style", choices=["raw", "question"], default="raw")
    p.add_argument("--gsm8k_dir", default="", help="gsm8k: the folder with train.jsonl and test.jsonl")
    args = p.parse_args()
    try:
        if args.task == "arith":
            digits = tuple(int(d) for d in args.digits.split(","))
            digits = digits * 2 if len(digits) == 1 else digits
            kw = dict(digits=digits, ops=args.ops, seed=args.seed, heldout_percent=args.heldout_percent, style=args.style)
            train, test = arith_prompts(args.n_train, "train", **kw), arith_prompts(args.n_test, "test", **kw)
        else:
            paths = [os.path.join(args.gsm8k_dir, f"{s}.jsonl") for s in ("train", "test")]
            missing = [q for q in paths if not os.path.isfile(q)]
            if missing:
                raise ValueError(f"{missing[0]} not found: set --gsm8k_dir to the folder with GSM8K's "
                                 f"train.jsonl and test.jsonl")
            train = gsm8k_prompts(paths[0], GSM8K_SUFFIX, args.n_train)
            test = gsm8k_prompts(paths[1], GSM8K_SUFFIX, args.n_test)
    except ValueError as e:
        sys.exit(f"error: {e}")
    os.makedirs(args.out, exist_ok=True)
    write(train, os.path.join(args.out, "train.jsonl"))
    write(test, os.path.join(args.out, "test.jsonl"))
    print(f"wrote {len(train)} train and {len(test)} test prompts to {args.out}")
