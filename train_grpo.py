"""
GRPO for RWKV-7 and hybrid models, with rollouts from the recurrent state.

    python data/grpo/prepare.py --task=arith --digits=1,2 --out=data/grpo/arith12
    python data/grpo/sft.py --prompts=data/grpo/arith12/train.jsonl --out_dir=out-arith-sft    # a tiny start
    python train_grpo.py config/grpo_arith_tiny.py                                             # CPU demo
    torchrun --standalone --nproc_per_node=8 train_grpo.py config/grpo_gsm8k_smollm2.py
    python train_grpo.py config/grpo_gsm8k_smollm2.py --benchmark_rollouts=True   # ours vs HF generate, tok/s

Each step: prompts_per_step prompts (split across ranks) are each prefilled once; the prefilled state is copied
group_size (G) times and the G completions are sampled together, one token per step from the recurrent state
(hybrids carry a KV cache for their attention layers). Rewards are plain functions named in `rewards`
(data/grpo/tasks.py). Advantages are per prompt: reward minus the mean of its own G rewards, divided by their std
unless scale_rewards=False (Dr. GRPO). The update recomputes the completions' log-probs with the parallel forward
and minimises the PPO-clipped objective (separate eps_low / eps_high, DAPO's clip-higher), normalised per token,
per sequence or by a constant (Dr. GRPO), plus beta times the k3 KL to the frozen initial model, for mu
iterations per rollout batch.

Models: an official .pth or a directory with our trainers' ckpt.pt (pure RWKV-7), a hybrid directory
(train_distill.py), or a Hugging Face model (hub id, directory, .gguf) as a plain transformer policy.
Output: out_dir/ckpt.pt (weights, optimizer, step, RNG: exact resume with init_from='resume'; sample.py loads it
for RWKV), out_dir/rwkv-grpo.pth or out_dir/hybrid/, log.txt, completions.jsonl.
"""
import copy
import json
import math
import os
import sys
import time
import types
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

from configurator import ConfigError, StopFlag, check, configure, exit_on_config_error, start_run
from data.grpo.tasks import REWARDS, load_prompts, parse_rewards
from data.tokenizers import get_tokenizer
from model import Hybrid, all_reduce_grads, load_hf_model
from sample import cat_states, decodable, encode, expand_state, generate, load_model, prefill

# -----------------------------------------------------------------------------
# defaults (override with a config file and --key=value)
# I/O
out_dir = "out-grpo"
init_from = ""  # .pth, a directory with ckpt.pt, a hybrid directory, an HF hub id / directory / .gguf; 'resume'
tokenizer = ""  # '' = the checkpoint's own; or world:vocab.txt, char:meta.json, hf:<dir>, ...
hf_rwkv_layers = "none"  # an HF init_from with these layers replaced by fresh RWKV-7 time-mixers (speed benchmarks)
train_prompts = ""  # .jsonl of {"prompt", "answer"} (data/grpo/prepare.py)
eval_prompts = ""  # held-out prompts for the greedy evaluation; '' = none
prompt_format = "auto"  # 'raw' (as is), 'rwkv' ("User: ...\n\nAssistant:"), 'chat' (the tokenizer's template), 'auto'
system_prompt = ""  # 'chat' format only
rewards = "arith"  # 'name[:weight],...' from data/grpo/tasks.py REWARDS: arith, gsm8k, format, digits
eval_reward = ""  # the reward whose mean is the eval accuracy; '' = the first of `rewards`
# rollouts
prompts_per_step = 16  # over all ranks
group_size = 8  # G completions per prompt
max_new_tokens = 256
temperature = 1.0
top_p = 1.0
stop = ["\n\n"]  # a completion ends at end-of-text, at one of these strings, or after max_new_tokens
cuda_graph = False  # CUDA, RWKV or a hybrid without attention layers: the one-token step replayed from a CUDA graph
# objective
loss_type = "token"  # 'token' (sum over all tokens / their count: DAPO), 'sequence' (GRPO), 'dr_grpo'
scale_rewards = True  # advantages / (group std + 1e-4); False = Dr. GRPO
eps_low = 0.2
eps_high = 0.28  # DAPO's clip-higher; = eps_low for the symmetric clip
beta = 0.0  # weight of the k3 KL to the initial model; 0 loads no reference
mu = 1  # optimizer steps per rollout batch, against the sampling policy's log-probs
dynamic_sampling = False  # drop groups whose G rewards are all equal (no signal)
mask_truncated = False  # completions cut at max_new_tokens get no loss (DAPO's overlong filtering)
micro_batch = 64  # sequences per forward in the update (bounds memory)
# optimizer
learning_rate = 1e-6
lr_final = -1.0  # cosine to this over max_steps; < 0 = constant
warmup_steps = 0
max_steps = 200  # 0 = only evaluate the starting model (eval_prompts) and exit
exit_step = 0  # > 0: save and stop at this step (jobs, tests); the schedule still spans max_steps
max_minutes = 0.0  # > 0: stop training after this many minutes (then the final eval and save, as at max_steps)
weight_decay = 0.0
beta1, beta2, adam_eps = 0.9, 0.99, 1e-8
grad_clip = 1.0
# logging, eval, saving
log_interval = 1
eval_interval = 50  # also at the start and the end
eval_max_prompts = 0  # 0 = all of eval_prompts
save_interval = 100
log_completions = 2  # completions per step appended to out_dir/completions.jsonl
wandb_log = False
wandb_project = "nano-rwkv7-grpo"
wandb_run_name = ""
progress_bar = True
# system
device = "auto"  # 'auto', 'cpu', 'cuda'
dtype = "auto"  # 'auto' = bf16 autocast on CUDA, fp32 on CPU; 'float32'
seed = 1337
wkv_impl = "auto"  # 'auto' (the CUDA kernel on GPU, head size 64), 'kernel' or 'torch' (any head size)
benchmark_rollouts = False  # time our rollouts against HF generate (G = 8 and 64, 256 tokens) and exit
benchmark_hf = ""  # the HF model for generate (hub id, dir, .gguf); '' = init_from
benchmark_groups = [8, 64]  # G values to time
benchmark_new_tokens = 256
# -----------------------------------------------------------------------------


# --- the objective ---------------------------------------------------------------------------------------------

def group_advantages(rewards, G, scale=True, eps=1e-4):
    """rewards (P*G,), prompt-major (a prompt's G completions are consecutive) -> advantages (P*G,):
    reward minus its own group's mean, divided by the group's std (+ eps) when scale. Groups never mix."""
    r = rewards.view(-1, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)  # unbiased std, as the GRPO paper and TRL
    return adv.reshape(-1)


def grpo_loss(logp, old_logp, advantages, mask, ref_logp=None, beta=0.0, eps_low=0.2, eps_high=0.2,
              loss_type="token", normaliser=None):
    """The clipped GRPO objective as a loss to minimise. logp (B, T) the current policy's log-probs of the sampled
    tokens (with grad), old_logp the sampling policy's, ref_logp the reference's (beta > 0), mask (B, T) 1 on
    completion tokens, advantages (B,). Per token: -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    + beta * (exp(ref - logp) - (ref - logp) - 1). Normalised over:
      'token'     all completion tokens of the batch (DAPO, TRL's default),
      'sequence'  each completion's own tokens, then the completions (the GRPO paper),
      'dr_grpo'   a constant, completions x max length (Dr. GRPO): pass normaliser = B_total * max_new_tokens.
    normaliser: the denominator over the whole batch when this call sees only part of it (micro-batches, ranks):
    total tokens ('token'), total completions ('sequence'), completions x max tokens ('dr_grpo'); the loss is then
    this part's share, and the shares add up to the whole batch's loss. -> (loss, stats of this part)."""
    mask = mask.to(logp.dtype)
    A = advantages[:, None].to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    per_token = -torch.min(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)
    kl = None
    if beta:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    if loss_type == "token":
        loss = (per_token * mask).sum() / (mask.sum().clamp(min=1) if normaliser is None else normaliser)
    elif loss_type == "sequence":
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        loss = per_seq.sum() / (per_seq.shape[0] if normaliser is None else normaliser)
    elif loss_type == "dr_grpo":
        if normaliser is None:
            raise ValueError("loss_type='dr_grpo' needs normaliser = completions x max_new_tokens")
        loss = (per_token * mask).sum() / normaliser
    else:
        raise ValueError(f"loss_type must be 'token', 'sequence' or 'dr_grpo', got {loss_type!r}")
    with torch.no_grad():  # TRL's clip statistics: where the clip is active and the gradient is cut
        low = ((ratio < 1 - eps_low) & (A < 0)).float()
        high = ((ratio > 1 + eps_high) & (A > 0)).float()
        stats = dict(tokens=mask.sum().item(), clip_low=(low * mask).sum().item(),
                     clip_high=(high * mask).sum().item(), kl=0.0 if kl is None else (kl * mask).sum().item())
    return loss, stats


def token_logprobs(model, ids, temperature=1.0):
    """ids (B, T) right-padded prompt + completion -> (log-probs (B, T-1) of ids[:, 1:], logits (B, T-1, V)). Right
    padding never reaches earlier positions (causal), so each row's numbers are its own."""
    logits = model(ids)[0][:, :-1].float()
    if temperature and temperature != 1.0:
        logits = logits / temperature
    logp = logits.gather(-1, ids[:, 1:, None])[..., 0] - logits.logsumexp(-1)
    return logp, logits


def entropy_sum(logits, mask):
    """Sum over masked positions of the policy's entropy, chunked over rows to bound memory."""
    total = 0.0
    for i in range(logits.shape[0]):
        lp = F.log_softmax(logits[i], dim=-1)
        total += ((-(lp.exp() * lp).sum(-1)) * mask[i]).sum().item()
    return total


# --- rollouts --------------------------------------------------------------------------------------------------

def format_prompt(tok, text, fmt, system=""):
    """The text the model sees before its answer: raw, RWKV's chat format, or the tokenizer's chat template."""
    if fmt == "auto":
        fmt = "chat" if getattr(getattr(tok, "tok", None), "chat_template", None) else "rwkv"
    if fmt == "raw":
        return text
    if fmt == "rwkv":
        return (f"System: {system}\n\n" if system else "") + f"User: {text}\n\nAssistant:"
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tok.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def decode(model, logits, state, max_new_tokens, gens, tok, temperature=1.0, top_p=1.0, stop=(), n_valid=None,
           cuda_graph=False, autocast=nullcontext()):
    """Sample from a prefilled (logits (B, V), state) until end-of-text, a stop string or max_new_tokens
    (sample.generate, stopping once every row has ended). -> per row (ids, sampling-time log-probs, truncated).
    A row's ids run through the token that ended it (one of tok.end_ids, or the one completing a stop string).
    Log-probs are of softmax(logits / temperature), the distribution the update uses."""
    B = logits.shape[0]
    ends = [None] * B  # per row: the number of tokens through the one that ended it
    window = max([len(s) for s in stop] + [1]) + 4  # tokens of text to search for a stop string (>= 1 char each)
    so_far, logps = [[] for _ in range(B)], [[] for _ in range(B)]

    def on_tokens(new_ids):
        for b, t in enumerate(new_ids):
            so_far[b].append(t)
            if ends[b] is None and (t in tok.end_ids or (stop and any(s in tok.decode(so_far[b][-window:])
                                                                     for s in stop))):
                ends[b] = len(so_far[b])
        return all(e is not None for e in ends)
    with autocast:  # (a CUDA graph records the kernels of the precision it is captured in)
        out, _ = generate(model, logits, state, max_new_tokens, gens, temperature, top_p, n_valid=n_valid,
                          on_tokens=on_tokens, cuda_graph=cuda_graph, logprobs=logps)
    return [(out[b][:ends[b]], logps[b][:ends[b]], ends[b] is None) for b in range(B)]


@torch.no_grad()
def rollout(model, prompt_ids, G, max_new_tokens, gens, tok, temperature=1.0, top_p=1.0, stop=(), n_valid=None,
            cuda_graph=False, autocast=nullcontext(), batch_prompts=0):
    """G completions for each prompt: each prompt is prefilled once, its state copied G times. All prompts are
    sampled together, batch_prompts at a time (0 = all); a hybrid's KV caches of prompts of different lengths are
    left-padded to a common length (sample.cat_states). gens: P*G generators, prompt-major. -> P*G rows,
    prompt-major: dicts with prompt (ids), ids (completion), logps (sampling time), truncated."""
    n = batch_prompts or len(prompt_ids)
    batches = [list(range(i, min(i + n, len(prompt_ids)))) for i in range(0, len(prompt_ids), n)]
    rows = [None] * (len(prompt_ids) * G)
    for batch in batches:
        with autocast:
            prefilled = [prefill(model, prompt_ids[p]) for p in batch]
        logits = torch.cat([l for l, _ in prefilled]).repeat_interleave(G, dim=0)
        states = [s for _, s in prefilled]
        state = expand_state(cat_states(states), G)
        row_ids = [p * G + g for p in batch for g in range(G)]
        out = decode(model, logits, state, max_new_tokens, [gens[r] for r in row_ids], tok, temperature, top_p,
                     stop, n_valid, cuda_graph, autocast)
        for r, (ids, logps, trunc) in zip(row_ids, out):
            rows[r] = dict(prompt=prompt_ids[r // G], ids=ids, logps=logps, truncated=trunc)
    return rows


def completion_text(tok, ids, stop=()):
    """The text a reward sees: decoded without the end-of-text (or end-of-turn) token, cut before the first stop
    string."""
    text = tok.decode([t for t in ids if t not in tok.end_ids])
    cut = min([text.find(s) for s in stop if s and s in text] + [len(text)])
    return text[:cut]


def pack_rollouts(rows, device, pad_id=0):
    """Rows -> ids (B, T) right-padded prompt + completion, mask (B, T-1) = 1 where the next token is a
    completion token, and the sampling-time log-probs (B, T-1) at those positions."""
    T = max(len(r["prompt"]) + len(r["ids"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask, old = torch.zeros(len(rows), T - 1), torch.zeros(len(rows), T - 1)
    for i, r in enumerate(rows):
        n, m = len(r["prompt"]), len(r["ids"])
        ids[i, :n + m] = torch.tensor(r["prompt"] + r["ids"])
        mask[i, n - 1:n - 1 + m] = 1
        old[i, n - 1:n - 1 + m] = torch.tensor(r["logps"]) if m else 0
    return ids.to(device), mask.to(device), old.to(device)


# --- models and tokenizers -------------------------------------------------------------------------------------

def load_policy(spec, tok_spec="", rwkv_layers="none", wkv_impl="auto"):
    """-> (model, tokenizer, kind): kind 'rwkv' for .pth / ckpt.pt directories, 'hybrid' for hybrid directories and
    HF models (an HF model is a hybrid with no RWKV layer: its own attention, bit for bit)."""
    is_ours = spec.endswith(".pth") or os.path.isfile(os.path.join(spec, "ckpt.pt")) or \
        os.path.isfile(os.path.join(spec, "hybrid.json"))
    if is_ours:
        model, own = load_model(spec, wkv_impl=wkv_impl)
        kind = "hybrid" if isinstance(model, Hybrid) else "rwkv"
        if not (tok_spec or own):
            raise ValueError(f"{spec} does not name its tokenizer: set tokenizer= (world:vocab.txt, char:meta.json, "
                             f"hf:<dir>)")
        tok = get_tokenizer(tok_spec or own)
        return model, tok, kind
    model = Hybrid(load_hf_model(spec), rwkv_layers, wkv_impl=wkv_impl)
    tok = get_tokenizer(tok_spec or f"hf:{spec}")
    return model, tok, "hybrid"


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    with exit_on_config_error():
        config = configure(globals(), sys.argv[1:])
        check(init_from, "set init_from= (a .pth, a checkpoint or hybrid directory, an HF model, or 'resume')")
        check(isinstance(rewards, str), "rewards must be a string like 'gsm8k:1.0,format:0.2'")
        try:
            reward_fns = parse_rewards(rewards)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        eval_reward = eval_reward or reward_fns[0][0]
        check(eval_reward in REWARDS, f"eval_reward {eval_reward!r} is not a reward: choose from {', '.join(REWARDS)}")
        check(loss_type in ("token", "sequence", "dr_grpo"), f"loss_type must be 'token', 'sequence' or 'dr_grpo', "
              f"got {loss_type!r}")
        check(prompt_format in ("auto", "raw", "rwkv", "chat"), f"prompt_format must be auto, raw, rwkv or chat, "
              f"got {prompt_format!r}")
        check(group_size >= 2 or benchmark_rollouts, f"group_size must be >= 2 (advantages compare a group), "
              f"got {group_size}")
        check(min(prompts_per_step, max_new_tokens, mu, micro_batch) >= 1 and max_steps >= 0,
              "prompts_per_step, max_new_tokens, mu and micro_batch must be >= 1, max_steps >= 0")
        check(0 <= eps_low < 1 and eps_high >= 0 and beta >= 0, "need 0 <= eps_low < 1, eps_high >= 0, beta >= 0")
        check(temperature >= 0 and 0 < top_p <= 1, "need temperature >= 0 and 0 < top_p <= 1")
        check(isinstance(stop, (list, tuple)), f"stop must be a list of strings, e.g. stop=['\\n'], got {stop!r}")
        check(dtype in ("auto", "float32"), f"dtype must be 'auto' or 'float32', got {dtype!r}")
        try:
            train_set = load_prompts(train_prompts) if not benchmark_rollouts or train_prompts else None
            eval_set = load_prompts(eval_prompts) if eval_prompts and not benchmark_rollouts else []
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if eval_max_prompts:
            eval_set = eval_set[:eval_max_prompts]
    reward_weights = {n: w for n, _, w in reward_fns}

    # --- distributed setup -------------------------------------------------------------------------------------
    distributed = "RANK" in os.environ
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    else:
        rank, world, local_rank = 0, 1, 0
    master = rank == 0
    device = f"cuda:{local_rank}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda and dtype == "auto" else nullcontext()
    with exit_on_config_error():
        check(prompts_per_step % world == 0, f"prompts_per_step ({prompts_per_step}) must be a multiple of the "
              f"{world} ranks")
    local_prompts = prompts_per_step // world

    def print0(*args):
        if master:
            print(*args, flush=True)

    # --- model, tokenizer, reference -----------------------------------------------------------------------------
    ckpt = None
    if init_from == "resume":
        path = os.path.join(out_dir, "ckpt.pt")
        if not os.path.isfile(path):
            sys.exit(f"error: init_from='resume' but there is no {path}")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    policy_spec = ckpt["config"]["init_from"] if ckpt else init_from
    hf_rwkv_layers = ckpt["config"].get("hf_rwkv_layers", "none") if ckpt else hf_rwkv_layers
    try:
        model, tok, kind = load_policy(policy_spec, tokenizer, hf_rwkv_layers, wkv_impl)
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot load init_from={policy_spec!r} ({str(e).strip().splitlines()[0]})")
    ref_model = copy.deepcopy(model).eval().requires_grad_(False).to(device) if beta > 0 else None
    if ckpt:
        model.load_state_dict(ckpt["model"])
    model.to(device)
    n_valid = decodable(tok, model.config.vocab_size)
    fixed_state = kind == "rwkv" or model.fixed_size_state
    with exit_on_config_error():
        check(not cuda_graph or (use_cuda and fixed_state), "cuda_graph=True needs CUDA and a fixed-size state (an "
              "RWKV model or a hybrid without attention layers)")
    config["tokenizer"] = tok.name  # sample.load_model reads it from ckpt.pt
    config["init_from"] = policy_spec  # (also after a resume: the model a later resume rebuilds, then overwrites)
    print0(f"policy {policy_spec} ({kind}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), "
           f"tokenizer {tok.name}, {world} rank(s), device {device}")

    def encode_prompt(text):
        return encode(tok, format_prompt(tok, text, prompt_format, system_prompt))

    # --- benchmark: our rollouts vs Hugging Face generate ------------------------------------------------------
    if benchmark_rollouts:
        if use_cuda and dtype == "auto":  # both sides in bf16 weights (training keeps fp32 weights under autocast)
            model.to(torch.bfloat16)
        if kind == "hybrid" and not model.rwkv_layers and not benchmark_hf:  # the policy is the HF model itself
            hf = model.hf
        else:  # (its attention replaced: load the original again)
            hf = load_hf_model(benchmark_hf or init_from, dtype=torch.bfloat16 if use_cuda else torch.float32)
        hf.to(device).eval()
        text = train_set[0]["prompt"] if train_set else "Tell me a story about a goose."
        ids = encode_prompt(text)
        model.eval()
        never_ends = types.SimpleNamespace(end_ids=set(), decode=tok.decode)  # exactly n_new tokens per row
        rows = []
        for G in benchmark_groups:
            for who in ("ours", "hf"):
                for measured in (False, True):  # a short warm-up, then the timed run
                    n_new = benchmark_new_tokens if measured else 8
                    if use_cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    if who == "ours":  # no end token, no stop: like min_new_tokens on the HF side
                        gens = [torch.Generator().manual_seed(seed + i) for i in range(G)]
                        rollout(model, [ids], G, n_new, gens, never_ends, temperature or 1.0, top_p, (), n_valid,
                                cuda_graph, autocast)
                    else:
                        x = torch.tensor([ids], device=device)
                        with torch.no_grad():
                            hf.generate(x, attention_mask=torch.ones_like(x), do_sample=True, num_return_sequences=G,
                                        max_new_tokens=n_new, min_new_tokens=n_new, use_cache=True,
                                        temperature=temperature or 1.0, top_p=top_p, top_k=0)
                    if use_cuda:
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                rows.append((G, who, G * n_new / dt))
        print0(f"rollout benchmark: ours = {policy_spec} ({kind}), HF generate = {benchmark_hf or init_from}; prompt "
               f"{len(ids)} tokens, {benchmark_new_tokens} new tokens per sample, {device}, "
               f"{'bf16' if use_cuda and dtype == 'auto' else 'fp32'}, cuda_graph={cuda_graph}")
        print0("| G | ours, new tok/s | HF generate (KV cache), new tok/s | ours / HF |\n|---|---|---|---|")
        for G in benchmark_groups:
            ours, theirs = [r[2] for r in rows if r[0] == G]
            print0(f"| {G} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f}x |")
        sys.exit(0)

    # --- optimizer, state ---------------------------------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(beta1, beta2), eps=adam_eps,
                                  weight_decay=weight_decay)
    step = 0
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"])
    train_ids = [None] * len(train_set)  # token ids, encoded on first use

    def lr_at(step):
        warm = (step + 1) / warmup_steps if step < warmup_steps else 1.0
        if lr_final < 0:
            return learning_rate * warm
        return warm * (lr_final + 0.5 * (learning_rate - lr_final) * (1 + math.cos(math.pi * min(1.0, step / max_steps))))

    def step_prompts(step):
        """This rank's prompt indices at a step: a deterministic function of (seed, step), so a resumed run sees
        the same prompts; one shuffle per pass over the prompt file."""
        n = len(train_set)
        out = []
        for j in range(rank * local_prompts, (rank + 1) * local_prompts):
            epoch, i = divmod(step * prompts_per_step + j, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)) if n > 1 else [0]
            out.append(int(perm[i]))
        return out

    def rewards_of(texts, answers):
        """-> total (B,) and {name: (B,)} per reward function."""
        per = {n: torch.tensor([fn(t, a) for t, a in zip(texts, answers)], dtype=torch.float32)
               for n, fn, _ in reward_fns}
        return sum(reward_weights[n] * v for n, v in per.items()), per

    def all_sum(values):
        """Sum a list of floats over ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if distributed:
            dist.all_reduce(t)
        return t.tolist()

    @torch.no_grad()
    def evaluate():
        """Greedy held-out accuracy: the mean of eval_reward over eval_prompts (split across ranks). The first
        few greedy completions go to out_dir/eval_completions.jsonl (before/after comparisons)."""
        model.eval()
        mine = eval_set[rank::world]
        fn = REWARDS[eval_reward]
        score, shown = 0.0, []
        for i in range(0, len(mine), 64):
            chunk = mine[i:i + 64]
            rows = rollout(model, [encode_prompt(r["prompt"]) for r in chunk], 1, max_new_tokens,
                           [torch.Generator() for _ in chunk], tok, 0.0, 1.0, stop, n_valid, cuda_graph,
                           autocast)
            texts = [completion_text(tok, r["ids"], stop) for r in rows]
            score += sum(fn(t, c["answer"]) for t, c in zip(texts, chunk))
            shown += [dict(step=step, prompt=c["prompt"], completion=t, answer=c["answer"])
                      for t, c in zip(texts, chunk)][:max(0, 4 - len(shown))]
        if master:
            with open(os.path.join(out_dir, "eval_completions.jsonl"), "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in shown)
        model.train()
        s, n = all_sum([score, len(mine)])
        return s / max(n, 1)

    def save():
        if not master:
            return
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        state = dict(model=sd, optimizer=optimizer.state_dict(), step=step, config=config, rng=torch.get_rng_state(),
                     kind=kind)
        if kind == "rwkv":
            model.save_pretrained(os.path.join(out_dir, "rwkv-grpo.pth"))
        else:
            model.save_pretrained(os.path.join(out_dir, "hybrid"))
            if hasattr(tok, "tok"):
                tok.tok.save_pretrained(os.path.join(out_dir, "hybrid"))
        torch.save(state, os.path.join(out_dir, "ckpt.pt.tmp"))
        os.replace(os.path.join(out_dir, "ckpt.pt.tmp"), os.path.join(out_dir, "ckpt.pt"))

    def log(line, metrics=None):
        print0(line)
        if master:
            with open(os.path.join(out_dir, "log.txt"), "a") as f:
                f.write(line + "\n")
            if run and metrics:
                run.log(metrics, step=step)

    stop_flag = StopFlag()
    run = start_run(out_dir, config, f"torch {torch.__version__} device {device} world {world}", wandb_log,
                    wandb_project, wandb_run_name, print0) if master else None
    bar = None
    if progress_bar and master and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=max_steps, initial=step, dynamic_ncols=True)

    # --- training loop ------------------------------------------------------------------------------------------
    model.train()
    t_start = time.perf_counter()
    while step < max_steps and not stop_flag.requested and not (exit_step and step >= exit_step):
        if max_minutes and all_sum([time.perf_counter() - t_start])[0] / world > 60 * max_minutes:
            print0(f"max_minutes={max_minutes} reached at step {step}")
            break
        if eval_set and step % eval_interval == 0:
            acc = evaluate()
            log(f"step {step} | eval {eval_reward} accuracy {acc:.4f} (greedy, {len(eval_set)} held-out prompts)",
                {"eval/accuracy": acc})
        t0 = time.perf_counter()
        # 1. rollouts: G completions per prompt from copies of its prefilled state
        idx = step_prompts(step)
        for i in idx:
            if train_ids[i] is None:
                train_ids[i] = encode_prompt(train_set[i]["prompt"])
        G = group_size
        base_row = (step * prompts_per_step + rank * local_prompts) * G  # a row's generator: (seed, step, row)
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + base_row + r) for r in range(len(idx) * G)]
        model.eval()
        rows = rollout(model, [train_ids[i] for i in idx], G, max_new_tokens, gens, tok, temperature, top_p, stop,
                       n_valid, cuda_graph, autocast)
        model.train()
        t_roll = time.perf_counter() - t0
        texts = [completion_text(tok, r["ids"], stop) for r in rows]
        answers = [train_set[idx[k // G]]["answer"] for k in range(len(rows))]
        total, per_fn = rewards_of(texts, answers)
        adv = group_advantages(total, G, scale_rewards)
        # 2. which completions train: dynamic sampling drops flat groups; overlong masking drops truncated rows
        group_std = total.view(-1, G).std(dim=1)
        keep = [True] * len(rows)
        for k, r in enumerate(rows):
            if (dynamic_sampling and group_std[k // G] == 0) or (mask_truncated and r["truncated"]):
                keep[k] = False
        train_rows = [k for k in range(len(rows)) if keep[k] and rows[k]["ids"]]
        n_tok_local = sum(len(rows[k]["ids"]) for k in train_rows)
        n_tok, n_seq = all_sum([n_tok_local, len(train_rows)])
        normaliser = {"token": n_tok, "sequence": n_seq, "dr_grpo": n_seq * max_new_tokens}[loss_type]
        # 3. the update: mu optimizer steps against the sampling policy's log-probs
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [train_rows[i:i + micro_batch] for i in range(0, len(train_rows), micro_batch)]
        packed = [pack_rollouts([rows[k] for k in mb], device) for mb in micro]
        ref_lp = []
        if beta > 0:
            with torch.no_grad(), autocast:
                ref_lp = [token_logprobs(ref_model, ids, temperature)[0] for ids, _, _ in packed]
        old_lp, sums = [None] * len(micro), dict(loss=0.0, tokens=0.0, clip_low=0.0, clip_high=0.0, kl=0.0,
                                                   entropy=0.0, logp_gap=0.0)
        grad_norm = torch.zeros(())
        for it in range(mu):
            for j, (ids, mask, samp_lp) in enumerate(packed):
                with autocast:
                    logp, logits = token_logprobs(model, ids, temperature)
                if it == 0:  # same weights as at sampling: these are the old log-probs
                    old_lp[j] = logp.detach()
                    sums["entropy"] += entropy_sum(logits.detach(), mask)
                    sums["logp_gap"] += ((logp.detach() - samp_lp).abs() * mask).sum().item()
                loss, st = grpo_loss(logp, old_lp[j], adv[micro[j]].to(device),
                                     mask, ref_lp[j] if beta > 0 else None, beta, eps_low, eps_high, loss_type,
                                     normaliser)
                loss.backward()
                if it == mu - 1:
                    for key in ("tokens", "clip_low", "clip_high", "kl"):
                        sums[key] += st[key]
                    sums["loss"] += loss.item()
            if distributed:  # each rank's loss is its share of the global one: summed gradients are exact
                for p in params:  # a rank that had no sequence to learn from still joins every bucket
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                all_reduce_grads(params, average=False)
            if n_seq > 0:  # (over all ranks; Adam would still move the weights on zero gradients)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
                if math.isfinite(grad_norm.item()):
                    optimizer.step()
                else:
                    print0(f"step {step}: non-finite gradient norm, update skipped")
            optimizer.zero_grad(set_to_none=True)
        # 4. logging, in TRL's vocabulary
        lens = torch.tensor([len(r["ids"]) for r in rows], dtype=torch.float32)
        n_flat = int((group_std == 0).sum())
        glob = all_sum([total.sum().item(), (total ** 2).sum().item(), len(rows), n_flat, len(group_std),
                        lens.sum().item(), sum(r["truncated"] for r in rows), sums["tokens"], sums["clip_low"],
                        sums["clip_high"], sums["kl"], sums["entropy"], sums["logp_gap"], sums["loss"],
                        lens.sum().item() / max(t_roll, 1e-9)]
                       + [v.sum().item() for v in per_fn.values()] + [(v ** 2).sum().item() for v in per_fn.values()])
        n = glob[2]
        mean = glob[0] / n
        metrics = {"reward": mean, "reward_std": math.sqrt(max(glob[1] / n - mean ** 2, 0.0)),
                   "frac_reward_zero_std": glob[3] / glob[4],
                   "completions/mean_length": glob[5] / n, "completions/min_length": lens.min().item(),
                   "completions/max_length": lens.max().item(), "completions/clipped_ratio": glob[6] / n,
                   "clip_ratio/low_mean": glob[8] / max(glob[7], 1), "clip_ratio/high_mean": glob[9] / max(glob[7], 1),
                   "clip_ratio/region_mean": (glob[8] + glob[9]) / max(glob[7], 1),
                   "entropy": glob[11] / max(n_tok, 1), "logp_gap": glob[12] / max(n_tok, 1), "loss": glob[13],
                   "rollout_tok_per_s": glob[14], "lr": lr, "grad_norm": float(grad_norm)}
        if beta > 0:
            metrics["kl"] = glob[10] / max(glob[7], 1)
        k = len(per_fn)
        for i, name in enumerate(per_fn):
            m = glob[15 + i] / n
            metrics[f"rewards/{name}/mean"] = m
            metrics[f"rewards/{name}/std"] = math.sqrt(max(glob[15 + k + i] / n - m ** 2, 0.0))
        step += 1
        if master and log_completions:
            with open(os.path.join(out_dir, "completions.jsonl"), "a") as f:
                for k2 in range(0, len(rows), max(1, len(rows) // log_completions))[:log_completions]:
                    f.write(json.dumps(dict(step=step, prompt=train_set[idx[k2 // G]]["prompt"], completion=texts[k2],
                                            answer=answers[k2], reward=total[k2].item(), advantage=adv[k2].item()))
                            + "\n")
        if step % log_interval == 0 or step == max_steps:
            log(f"step {step}/{max_steps} | reward {metrics['reward']:.3f} ± {metrics['reward_std']:.3f} | "
                f"zero-std {metrics['frac_reward_zero_std']:.2f} | len {metrics['completions/mean_length']:.1f} "
                f"(clipped {metrics['completions/clipped_ratio']:.2f}) | clip {metrics['clip_ratio/region_mean']:.3f}"
                + (f" | kl {metrics['kl']:.4f}" if beta > 0 else "") + f" | entropy {metrics['entropy']:.3f} | "
                f"lr {lr:.2e} | rollout {metrics['rollout_tok_per_s']:,.0f} tok/s | "
                f"{time.perf_counter() - t0:.2f}s", {f"train/{key}": v for key, v in metrics.items()})
        if bar:
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}")
        if step % save_interval == 0:
            save()
    if eval_set and not stop_flag.requested:
        acc = evaluate()
        log(f"step {step} | eval {eval_reward} accuracy {acc:.4f} (greedy, {len(eval_set)} held-out prompts)",
            {"eval/accuracy": acc})
    if max_steps:
        save()
        print0(f"{'stopped' if stop_flag.requested else 'done'} at step {step}; saved {out_dir}/ckpt.pt")
    if distributed:
        dist.barrier()  # all ranks finish before any tears down
        dist.destroy_process_group()
