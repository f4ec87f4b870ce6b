"""
Distil a pretrained transformer (Llama, Qwen2, Qwen3; SmolLM2 is Llama) into a hybrid whose attention layers
(all, or a chosen subset) are RWKV-7 time-mixers. Three stages, one per run (RADLADS' recipe, arXiv 2505.03005):

  stage 1  align  every RWKV layer runs beside the frozen teacher attention it replaces, on the same input; the
                  residual stream continues with the teacher's output; loss = per-token L2 distance of the two
                  outputs (RMS over the width), averaged over tokens and layers; only the RWKV layers train.
  stage 2  KL     the hybrid against the frozen teacher model's logits: forward KL(teacher || student) at a
                  temperature (optionally on the teacher's top-k logits plus the remaining mass), + ce_weight * CE.
  stage 3  SFT    cross-entropy on assistant tokens only, no teacher.

    python train_distill.py config/smollm2_135m.py                                  # stage 1
    python train_distill.py config/smollm2_135m.py --stage=2 --init_from=out-smollm2/stage1/hybrid \
        --compile=True --cuda_graph=True                                                   # one GPU, fast
    torchrun --standalone --nproc_per_node=8 train_distill.py config/qwen_0.5b.py --stage=2 --teacher_ranks=2

The teacher runs in this process, or on `teacher_ranks` extra ranks of the same torchrun job: each serves a group
of trainer ranks through torch.distributed (NCCL on GPU, gloo on CPU), batching their inputs into one forward and
sending back logits (full, or top-k). Output: out_dir/hybrid (a directory model.Hybrid.from_pretrained and
sample.py load) and out_dir/ckpt.pt (optimizer, step, RNG: exact resume with init_from='resume').
"""
import math
import os
import sys
import threading
import time
from contextlib import nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from configurator import StopFlag, check, configure, exit_on_config_error, start_run
from data.chat import load_examples, load_tokenizer, pack
from lora import add_lora_hybrid, merge_state_dict
from model import CUDAGraphStep, Hybrid, all_reduce_grads, ctx_warmup_len, kl_loss, load_hf_model, teacher_targets

# -----------------------------------------------------------------------------
# defaults (override with a config file and --key=value)
# I/O
out_dir = "out-distill"
init_from = "teacher"  # 'teacher' (build the hybrid from `base`), a hybrid directory from an earlier stage, 'resume'
base = ""  # the transformer to convert: hub id, local directory, or a .gguf file
teacher = ""  # stage-2 teacher (any model sharing base's tokenizer); '' = base
rwkv_layers = "all"  # which layers become RWKV: 'all', a list of indices, or a slice string like '0:30:2'
stage = 1  # 1 align, 2 KL, 3 SFT
trainable = ""  # 'student', 'all' or 'all_but_mlp'; '' = student in stage 1, all in stages 2 and 3
untie_embeddings = True  # stages 2-3: give the head its own copy of a tied embedding (RADLADS)
# losses
kl_temperature = 1.0
kl_weight = 1.0
ce_weight = 0.0  # stage 2: add the student's cross-entropy on the labels
topk = 0  # stage 2: KL on the teacher's top-k logits plus the remaining mass (0 = full vocabulary)
# where the teacher runs
teacher_ranks = 0  # 0 = in this process; N = the last N ranks of the torchrun job serve the teacher
teacher_timeout = 600  # seconds a trainer waits for its teacher rank before giving up
# data
data = ""  # .jsonl (chat 'messages', 'text', or GSM8K/Alpaca fields), .json list, .txt
val_data = ""  # '' = hold out val_fraction of `data`
val_fraction = 0.05
data_cache = "~/.cache/nano-rwkv7/tokens"  # tokenised data kept here between runs and stages ('' = off)
ctx_len = 512
batch_size = 8  # sequences per trainer rank per micro-step
grad_accum = 1
# optimizer and schedule
max_steps = 1000
exit_step = 0  # > 0: save and stop at this step; the schedule still spans max_steps (jobs, tests)
learning_rate = 1e-3
lr_final = 1e-5  # cosine from learning_rate to lr_final over max_steps; lr_final = learning_rate for a flat lr
warmup_steps = 10  # lr grows as 0.01 -> 1 over these steps
weight_decay = 0.0
beta1, beta2, adam_eps = 0.9, 0.95, 1e-8
grad_clip = 1.0
# logging, eval, saving
log_interval = 10
eval_interval = 200
eval_batches = 8  # validation batches: the first eval_batches x global batch validation rows
eval_only = False  # evaluate once and exit; in stage 2 with val_data=held-out text: student vs teacher perplexity
save_interval = 500
wandb_log = False
wandb_project = "nano-rwkv7-distill"
wandb_run_name = ""
progress_bar = True
# system
device = "auto"  # 'auto', 'cpu', 'cuda'
dtype = "auto"  # 'auto' = bf16 on CUDA, fp32 on CPU
compile = False  # torch.compile the RWKV time-mixers and the KL loss (GPU)
cuda_graph = False  # replay each micro-step (teacher forward, hybrid forward, loss, backward) as one CUDA graph
parallel = "ddp"  # under torchrun: 'ddp', or 'fsdp' (FSDP2: fully_shard each decoder layer, then the root)
grad_checkpointing = False
seed = 1337
# long context (as in train_pretrain.py; exact: the loss and gradients of one plain pass)
ctx_parts = 1  # > 1: parts of ceil(ctx_len / ctx_parts) tokens: the WKV runs part by part, or with state_cp the model
state_cp = False  # stage 3: the whole hybrid runs part by part, each part recomputed in backward, the state carried:
                  # activation memory of one part (kept attention layers: their KV cache still grows with ctx_len)
# LoRA (lora.py) on the RWKV layers of a hybrid, stages 2-3; the rest frozen. ckpt.pt holds only the trainable
# subset (resume rebuilds the rest from init_from), out_dir/hybrid the merged model
lora_r = 0  # > 0: the LoRA rank; 0 = off
lora_alpha = 32.0  # the update is scaled by lora_alpha / lora_r
lora_dropout = 0.0
lora_parts = "att,time,ln"  # att: r/k/v/o; ffn: the MLP; time: the time-mixer's own tensors; ln: ln_x and norms
lora_layers = ""  # e.g. '0-3 20-23'; '' = every RWKV layer
initial_ctx_len = 0  # > 0: context warm-up: rows start this long and grow linearly to ctx_len ...
ctx_warmup_steps = 0  # ... over this many steps (a row is cut to its first tokens)
# -----------------------------------------------------------------------------
with exit_on_config_error():
    config = configure(globals(), sys.argv[1:])
    check(stage in (1, 2, 3), f"stage must be 1, 2 or 3, got {stage}")
    check(init_from != "teacher" or base, "init_from='teacher' needs base= (hub id, directory or .gguf file)")
    check(stage != 1 or init_from in ("teacher", "resume"), "stage 1 starts from the teacher (init_from='teacher')")
    check((data and os.path.exists(data)) or (eval_only and val_data), f"data file not found: {data!r} (set "
          "data=path/to/file.jsonl)")
    check(not val_data or os.path.exists(val_data), f"val_data file not found: {val_data!r}")
    check(warmup_steps < max_steps, f"warmup_steps ({warmup_steps}) must be smaller than max_steps ({max_steps})")
    check(topk >= 0 and teacher_ranks >= 0 and ctx_len > 0 and batch_size > 0, "topk, teacher_ranks, ctx_len and "
          "batch_size must be positive")
    check(teacher_ranks == 0 or stage == 2, "teacher_ranks serve the stage-2 teacher; use 0 in stages 1 and 3")
    check(parallel in ("ddp", "fsdp"), f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")
    check(ctx_parts >= 1, f"need ctx_parts >= 1, got {ctx_parts}")
    check(not state_cp or stage == 3, f"state_cp is for stage 3 (SFT), not stage {stage}: stages 1 and 2 compare "
          "every position with the teacher; use ctx_parts there")
    check(not lora_r or (stage > 1 and init_from != "teacher"), "LoRA trains a hybrid from an earlier stage in "
          "stage 2 or 3: set stage=2 or 3 and init_from=that run's out_dir/hybrid (or resume)")
    check(0 <= initial_ctx_len <= ctx_len and ctx_warmup_steps >= 0,
          f"need 0 <= initial_ctx_len ({initial_ctx_len}) <= ctx_len ({ctx_len}) and ctx_warmup_steps >= 0")
trainable = trainable or ("student" if stage == 1 else "all")

# --- distributed setup: trainer ranks first, then teacher ranks ---------------------------------------------
distributed = "RANK" in os.environ
use_cuda = torch.cuda.is_available() and device != "cpu"
if distributed:
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=teacher_timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ["LOCAL_RANK"])
else:
    rank, world, local_rank = 0, 1, 0
n_trainers = world - teacher_ranks
with exit_on_config_error():
    check(n_trainers >= 1, f"teacher_ranks={teacher_ranks} leaves no trainer rank out of {world}")
    check(not cuda_graph or (use_cuda and not distributed and not (state_cp or initial_ctx_len or grad_checkpointing)),
          "cuda_graph=True needs one CUDA process (no torchrun) and state_cp, initial_ctx_len, grad_checkpointing off "
          "(one fixed shape, captured once)")
is_teacher_rank = rank >= n_trainers
my_teacher = n_trainers + rank % teacher_ranks if teacher_ranks else None  # (trainer ranks)
master = rank == 0
device = f"cuda:{local_rank}" if use_cuda else "cpu"
if use_cuda:
    torch.cuda.set_device(device)
ptdtype = {"auto": torch.bfloat16 if use_cuda else torch.float32, "bf16": torch.bfloat16,
           "fp32": torch.float32}[dtype]
autocast = nullcontext() if not use_cuda or ptdtype != torch.bfloat16 else \
    torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not cuda_graph)  # a CUDA graph needs the cache off
trainer_group = dist.new_group(list(range(n_trainers))) if distributed else None
torch.manual_seed(seed)  # the same on every rank: FSDP shards each rank's own init (DDP would broadcast)


def print0(*args, **kwargs):
    if master:
        print(*args, **kwargs, flush=True)


def load_or_exit(what, fn, *args, **kwargs):
    """A model or tokenizer that cannot be loaded is one line naming it, not a traceback."""
    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load the {what} ({str(e).strip().splitlines()[0]})") from None


# --- the teacher: in this process, or on teacher ranks --------------------------------------------------------


def serve_teacher(model, trainers):
    """Teacher-rank loop: gather input ids from our trainers, one batched forward, send back targets. A header
    (B, T, go) precedes each request; go = 0 means that trainer is done. Messages live on `device` (NCCL moves
    CUDA tensors only)."""
    active = list(trainers)
    while active:
        requests = []
        for r in list(active):
            header = torch.zeros(3, dtype=torch.int64, device=device)
            dist.recv(header, src=r)
            if header[2] == 0:
                active.remove(r)
                continue
            ids = torch.zeros(int(header[0]), int(header[1]), dtype=torch.int64, device=device)
            dist.recv(ids, src=r)
            requests.append((r, ids))
        if not requests:
            break
        with torch.no_grad(), autocast:
            logits = model(torch.cat([ids for _, ids in requests])).logits
        target = teacher_targets(logits, topk, kl_temperature)
        row = 0
        for r, ids in requests:
            part = slice(row, row + ids.shape[0])
            row += ids.shape[0]
            if topk:
                dist.send(target[0][part].contiguous(), dst=r)
                dist.send(target[1][part].contiguous(), dst=r)
            else:
                dist.send(target[part].to(torch.bfloat16 if use_cuda else torch.float32).contiguous(), dst=r)


def wait_for(work, failed):
    """work.wait(), any error appended to failed (a helper thread's body)."""
    try:
        work.wait()
    except RuntimeError as e:  # the connection to a dead rank closed
        failed.append(e)


def lost_teacher(why):
    """The one-line exit for a trainer whose teacher rank is gone; why: a reason or the communication error."""
    return SystemExit(f"error: lost teacher rank {my_teacher} ({str(why).strip().splitlines()[0]}; see its log "
                      f"above); the last checkpoint in {out_dir} is intact")


def ask_teacher(ids):
    """Trainer side of serve_teacher. A teacher rank that dies, hangs past teacher_timeout, or a stop signal
    (torchrun sends SIGTERM to the other ranks when one dies) ends the run with one line; the last checkpoint is
    left as it was. A receive waits in a helper thread while this one watches the clock and the stop flag: a
    blocking receive would sit through both (signal handlers cannot run inside it), and gloo's irecv completes
    only inside wait(), so is_completed() cannot be polled instead."""
    def receive(buffer):
        work, failed = dist.irecv(buffer, src=my_teacher), []
        waiter = threading.Thread(target=wait_for, args=(work, failed), daemon=True)
        waiter.start()
        deadline = time.monotonic() + teacher_timeout
        while waiter.is_alive():
            waiter.join(0.001)
            if waiter.is_alive() and (stop_flag.requested or time.monotonic() > deadline):
                raise lost_teacher("this run was stopped" if stop_flag.requested
                                   else f"no answer in {teacher_timeout}s")
        if failed:
            raise lost_teacher(failed[0])
        return buffer
    try:
        dist.send(torch.tensor([ids.shape[0], ids.shape[1], 1], device=device), dst=my_teacher)
        dist.send(ids.contiguous(), dst=my_teacher)
        if topk:
            k = min(topk, vocab_size)
            values = receive(torch.zeros(*ids.shape, k, device=device))
            return values, receive(torch.zeros(*ids.shape, k, dtype=torch.int64, device=device))
        dtype = torch.bfloat16 if use_cuda else torch.float32
        return receive(torch.zeros(*ids.shape, vocab_size, dtype=dtype, device=device)).float()
    except RuntimeError as e:  # the connection to a dead rank closed
        raise lost_teacher(e) from None


def release_teacher():
    """Tell our teacher rank that we are done (after the last checkpoint: a teacher gone by then is still an error)."""
    try:
        dist.send(torch.tensor([0, 0, 0], device=device), dst=my_teacher)
    except RuntimeError as e:
        raise lost_teacher(e) from None


if compile:  # the loss on both sides: a few fused passes over the (B, T, vocab) logits instead of about ten in fp32
    kl_loss, teacher_targets = torch.compile(kl_loss), torch.compile(teacher_targets)
if is_teacher_rank:
    teacher_model = load_or_exit("teacher", load_hf_model, teacher or base, dtype=ptdtype)
    teacher_model = teacher_model.to(device).eval().requires_grad_(False)
    serve_teacher(teacher_model, [r for r in range(n_trainers) if n_trainers + r % teacher_ranks == rank])
    dist.barrier()  # all ranks finish before any tears down
    dist.destroy_process_group()
    sys.exit(0)

# --- trainer ranks: data ---------------------------------------------------------------------------------------
ckpt = None
if init_from == "resume":  # the checkpoint names the model, and with it the tokenizer
    if not os.path.isfile(os.path.join(out_dir, "ckpt.pt")):
        raise SystemExit(f"error: init_from='resume' but there is no {out_dir}/ckpt.pt")
    ckpt = torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=False)
    init_from = ckpt["config"]["init_from"]
    lora_r, lora_alpha, lora_dropout, lora_parts, lora_layers = (ckpt["config"].get(k, v) for k, v in (
        ("lora_r", 0), ("lora_alpha", 0), ("lora_dropout", 0), ("lora_parts", ""), ("lora_layers", "")))
    # saved again with the next checkpoint, so that it too resumes from the right model
    config.update(init_from=init_from, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                  lora_parts=lora_parts, lora_layers=lora_layers)
tok = load_or_exit("tokenizer", load_tokenizer, base or init_from)  # a hybrid directory carries its tokenizer
if val_data:
    val_x, val_y = pack(load_examples(val_data, tok, data_cache), ctx_len)
    train_x, train_y = pack(load_examples(data, tok, data_cache), ctx_len) if data else (val_x, val_y)
else:  # hold out whole examples, shuffled with a fixed seed
    examples = load_examples(data, tok, data_cache)
    order = np.random.default_rng(0).permutation(len(examples))
    n_val = max(1, int(len(examples) * val_fraction))
    val_x, val_y = pack([examples[i] for i in order[:n_val]], ctx_len)
    train_x, train_y = pack([examples[i] for i in order[n_val:]], ctx_len)
global_batch = batch_size * n_trainers
print0(f"data: {train_x.shape[0]} train rows, {val_x.shape[0]} val rows of {ctx_len} tokens; "
       f"{int((train_y >= 0).sum())} trained tokens; {global_batch * grad_accum * ctx_len} tokens per step")


_perm_cache = {}


def get_batch(step, micro, split="train"):
    """Rows for this rank, a deterministic function of (step, micro): resuming at a step replays the same data."""
    if split == "val":  # validation rows in order: the first eval_batches x global batch rows, every time
        rows = (step * global_batch + rank * batch_size + torch.arange(batch_size)) % val_x.shape[0]
        return val_x[rows].to(device), val_y[rows].to(device)
    x, y = train_x, train_y
    per_epoch = max(1, x.shape[0] // global_batch)
    draw = step * grad_accum + micro
    epoch, i = divmod(draw, per_epoch)
    if _perm_cache.get(split, (None,))[0] != epoch:  # one shuffle per epoch, not per step
        _perm_cache[split] = (epoch, torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed + epoch)))
    perm = _perm_cache[split][1]
    rows = perm[(i * global_batch + rank * batch_size + torch.arange(batch_size)) % x.shape[0]]
    return x[rows].to(device), y[rows].to(device)


# --- model -----------------------------------------------------------------------------------------------------
if init_from == "teacher":
    model = Hybrid(load_or_exit("base model", load_hf_model, base, dtype=torch.float32), rwkv_layers,
                   keep_teacher_attention=stage == 1)
else:
    model = load_or_exit("hybrid", Hybrid.from_pretrained, init_from)
if stage > 1:
    model.drop_teacher_attention()
    if untie_embeddings:
        model.untie_embeddings()
model.set_trainable(trainable)
if lora_r:  # only the LoRA subset trains
    try:
        add_lora_hybrid(model, lora_r, lora_alpha, lora_dropout, lora_parts, lora_layers)
    except ValueError as e:  # bad lora_parts or lora_layers
        raise SystemExit(f"error: {e}") from None
if ckpt is not None:  # with LoRA: the trainable subset, the rest is init_from's
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=not lora_r)
    if unexpected or any(model.get_parameter(k).requires_grad for k in missing):
        raise SystemExit(f"error: {out_dir}/ckpt.pt does not match the model built from {init_from}")
model.to(device)
model.grad_checkpointing = grad_checkpointing  # the hybrid's own per-layer recompute (HF's drops the state)
part_len = -(-ctx_len // ctx_parts)  # tokens per part (the last part of a row may be shorter)
if ctx_parts > 1 and not state_cp:
    model.set_wkv_part_len(part_len)
vocab_size = model.config.vocab_size
n_train_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
print0(f"hybrid: {len(model.rwkv_layers)} of {len(model.hf.model.layers)} layers RWKV, stage {stage}, "
       f"training {f'a LoRA (r={lora_r}, {lora_parts})' if lora_r else repr(trainable)}: "
       f"{n_train_params / 1e6:.2f}M parameters")

teacher_model = None
if stage == 2 and teacher_ranks == 0:
    teacher_model = load_or_exit("teacher", load_hf_model, teacher or base, dtype=ptdtype)
    teacher_model = teacher_model.to(device).eval().requires_grad_(False)
    if teacher_model.config.vocab_size != vocab_size:
        raise SystemExit(f"error: the teacher's vocabulary ({teacher_model.config.vocab_size}) differs from the "
                         f"student's ({vocab_size}); use a teacher with the same tokenizer")

if compile:  # fuses the time-mixers' many small elementwise ops: a stage-2 step of the SmolLM2 hybrid went from
    # 1.88x to 1.42x the teacher's own training step (H200, batch 16 x 512). In place: names keep no prefix.
    model.compile_time_mixers()
raw_model = model  # unwrapped (under FSDP the sharded root itself): eval, saving
if distributed and parallel == "fsdp":
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = DeviceMesh.from_group(trainer_group, "cuda" if use_cuda else "cpu")  # trainer ranks only
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if ptdtype == torch.bfloat16 \
        else MixedPrecisionPolicy()
    for layer in model.hf.model.layers:  # one all-gather per decoder layer in forward and in backward
        # stage 1: a layer's output is the teacher's and needs no gradient, so it would not gather the student's
        # weights again for backward; sharded on its own, the student's output does
        if stage == 1 and hasattr(layer.self_attn, "student"):
            fully_shard(layer.self_attn.student, mesh=mesh, mp_policy=mp)
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)  # the root holds the embedding, final norm and head
elif distributed and state_cp:  # no DDP wrapper: gradients averaged by all_reduce_grads; start from rank 0's weights
    for p in model.parameters():
        dist.broadcast(p.data, 0, group=trainer_group)
elif distributed:
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None,
                                                      process_group=trainer_group)

params = [p for p in raw_model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(beta1, beta2), eps=adam_eps,
                              weight_decay=weight_decay, fused=use_cuda)
step = 0
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0; every trainer takes part
SAVED = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=bool(lora_r))  # LoRA: trainable
if ckpt is not None:
    set_optimizer_state_dict(raw_model, optimizer, ckpt["optimizer"], options=StateDictOptions(full_state_dict=True))
    step = ckpt["step"]
    torch.set_rng_state(ckpt["rng"])


def lr_at(step):
    warm = 0.01 + 0.99 * step / warmup_steps if step < warmup_steps else 1.0
    progress = min(1.0, step / max_steps)
    return warm * (lr_final + 0.5 * (learning_rate - lr_final) * (1 + math.cos(math.pi * progress)))


def compute_loss(x, y, teacher_target=None, extra=False):
    """The stage's loss and the terms to log, as tensors (no value is read back: a CUDA graph can capture this).
    extra (stage 2, teacher in this process): also the teacher's CE and the top-1 agreement of student and teacher on
    trained tokens, from the same forwards."""
    with autocast:
        if stage == 1:
            _, loss, _ = model(x, align=True)
            return loss, {"align": loss.detach()}
        if state_cp:  # stage 3 only: no logits kept
            logits, ce, _ = raw_model.forward_segments(x, y, part_len)
        else:
            logits, ce, _ = model(x, y)
    if stage == 3:
        return ce, {"ce": ce.detach()}
    terms = {}
    if teacher_target is None:
        with torch.no_grad(), autocast:
            teacher_logits = teacher_model(x).logits
        teacher_target = teacher_targets(teacher_logits, topk, kl_temperature)
        if extra:
            valid = y >= 0
            terms["teacher_ce"] = F.cross_entropy(teacher_logits.float()[valid], y[valid])
            terms["agreement"] = (logits.argmax(-1) == teacher_logits.argmax(-1))[valid].float().mean()
    kl = kl_loss(logits, teacher_target, y >= 0, kl_temperature)
    return kl_weight * kl + ce_weight * ce, {"kl": kl.detach(), "ce": ce.detach(), **terms}


def micro_step(x, y, teacher_target=None):
    """Forward and backward of one micro-batch; returns its loss terms (tensors, already weighted for accumulation
    and, under torchrun, by this rank's share of the tokens)."""
    loss, terms = compute_loss(x, y, teacher_target)
    if distributed and stage > 1:  # token-weighted mean over ranks: DDP averages gradients, so weigh by our share
        n_local = (y >= 0).sum().float()
        n_total = n_local.clone()
        dist.all_reduce(n_total, group=trainer_group)
        share = n_local * n_trainers / n_total.clamp_min(1)
        loss, terms = loss * share, {k: v * share for k, v in terms.items()}
    (loss / grad_accum).backward()
    return {k: v / grad_accum for k, v in terms.items()}


@torch.no_grad()
def evaluate():
    """Validation: the stage loss and its terms (with a teacher in this process also the teacher's CE and the
    student-teacher top-1 agreement), token-weighted over all trainer ranks."""
    model.eval()
    sums, count = {}, 0.0
    for i in range(eval_batches):
        x, y = get_batch(i, 0, "val")
        loss, terms = compute_loss(x, y, ask_teacher(x) if stage == 2 and teacher_ranks else None, extra=True)
        terms = {k: v.item() for k, v in terms.items()} | {"loss": loss.item()}
        n = float((y >= 0).sum()) if stage > 1 else float(y.numel())  # token-weighted, as in training
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v * n
        count += n
    model.train()
    vals = torch.tensor(list(sums.values()) + [count], device=device, dtype=torch.float64)
    if distributed:
        dist.all_reduce(vals, group=trainer_group)
    return {**dict(zip(sums, (vals[:-1] / vals[-1].clamp_min(1)).tolist())), "tokens": vals[-1].item()}


def save():
    sd, opt_sd = get_model_state_dict(raw_model, options=SAVED), get_optimizer_state_dict(raw_model, optimizer, options=FULL)
    full = get_model_state_dict(raw_model, options=FULL) if lora_r else sd
    if not master:
        return
    if lora_r:  # the hybrid directory holds the merged model: loadable as any hybrid
        full = merge_state_dict(full, lora_alpha / lora_r, dtype=torch.float32)
    raw_model.save_pretrained(os.path.join(out_dir, "hybrid"), state_dict=full)
    tok.save_pretrained(os.path.join(out_dir, "hybrid"))
    state = dict(model=sd, optimizer=opt_sd, step=step, config=config, rng=torch.get_rng_state())
    torch.save(state, os.path.join(out_dir, "ckpt.pt.tmp"))
    os.replace(os.path.join(out_dir, "ckpt.pt.tmp"), os.path.join(out_dir, "ckpt.pt"))


# --- training loop ---------------------------------------------------------------------------------------------
stop_flag = StopFlag()
run = start_run(out_dir, config, f"torch {torch.__version__} device {device} world {world} ({teacher_ranks} teacher "
                f"ranks)", wandb_log, wandb_project, wandb_run_name, print0) if master else None
bar = None
if progress_bar and master and sys.stderr.isatty():
    from tqdm import tqdm
    bar = tqdm(total=max_steps, initial=step, dynamic_ncols=True)

if eval_only:
    ev = evaluate()
    print0(f"eval | {int(ev.pop('tokens'))} tokens | " + " | ".join(f"{k} {v:.4f}" for k, v in ev.items()))
    if "teacher_ce" in ev:
        print0(f"eval | student ppl {math.exp(ev['ce']):.3f} | teacher ppl {math.exp(ev['teacher_ce']):.3f} | ratio "
               f"{math.exp(ev['ce'] - ev['teacher_ce']):.3f} | top-1 agreement {ev['agreement']:.3f}")
    if stage == 2 and teacher_ranks:
        release_teacher()
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    sys.exit(0)
model.train()
bad_steps, t0, tokens_seen = 0, time.time(), 0
graphed_step = None  # cuda_graph: a model.CUDAGraphStep
while step < max_steps and not stop_flag.requested and not (exit_step and step >= exit_step):
    if step % eval_interval == 0 or step == max_steps - 1:
        ev = evaluate()
        ev.pop("tokens")
        line = f"step {step} | val " + " | ".join(f"{k} {v:.4f}" for k, v in ev.items())
        print0(line)
        if master:
            with open(os.path.join(out_dir, "log.txt"), "a") as f:
                f.write(line + "\n")
        if run:
            run.log({f"val/{k}": v for k, v in ev.items()}, step=step)
    lr = lr_at(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    terms_sum = {}
    for micro in range(grad_accum):
        x, y = get_batch(step, micro)
        n = ctx_warmup_len(step, initial_ctx_len, ctx_len, ctx_warmup_steps)  # context warm-up
        x, y = x[:, :n], y[:, :n]
        target = ask_teacher(x) if stage == 2 and teacher_ranks else None
        if distributed and parallel == "fsdp":
            model.set_requires_gradient_sync(micro == grad_accum - 1)
        elif distributed and not state_cp:
            model.require_backward_grad_sync = micro == grad_accum - 1
        if cuda_graph and graphed_step is None:  # captured at the first step, replayed from then on
            graphed_step = CUDAGraphStep(micro_step, params, x, y)
            print0("cuda_graph: captured one micro-step (teacher and hybrid forward, loss, backward)")
        terms = graphed_step(x, y) if cuda_graph else micro_step(x, y, target)
        for k, v in terms.items():  # new tensors: a replay overwrites the graph's outputs
            terms_sum[k] = terms_sum.get(k, 0.0) + v
    if distributed and parallel == "ddp" and state_cp:
        all_reduce_grads(params, trainer_group)
    vals = torch.stack(list(terms_sum.values()))
    if distributed:  # log the mean over trainer ranks
        dist.all_reduce(vals, group=trainer_group)
        vals = vals / n_trainers
    terms_sum = dict(zip(terms_sum, vals.tolist()))  # the step's one read-back
    if not all(math.isfinite(v) for v in terms_sum.values()):  # never train on NaN/inf: drop this step's gradients; stop if it keeps happening
        optimizer.zero_grad(set_to_none=not cuda_graph)  # the graph adds into the gradients it captured
        bad_steps += 1
        print0(f"step {step}: non-finite loss {terms_sum}, step skipped ({bad_steps} in a row)")
        if bad_steps >= 5:
            raise SystemExit(f"error: 5 non-finite losses in a row at step {step}; lower learning_rate "
                             f"(the last checkpoint in {out_dir} is intact)")
        step += 1
        continue
    bad_steps = 0
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # a DTensor under FSDP
    optimizer.step()
    optimizer.zero_grad(set_to_none=not cuda_graph)
    step += 1
    tokens_seen += global_batch * grad_accum * x.shape[1]
    if step % log_interval == 0 or step == max_steps:
        dt = time.time() - t0
        line = (f"step {step}/{max_steps} | " + " | ".join(f"{k} {v:.4f}" for k, v in terms_sum.items())
                + f" | lr {lr:.2e} | gnorm {grad_norm.item():.3f} | tok/s {tokens_seen / dt:,.0f}"
                + (f" | ctx {x.shape[1]}" if initial_ctx_len else ""))
        print0(line)
        if master:
            with open(os.path.join(out_dir, "log.txt"), "a") as f:
                f.write(line + "\n")
        if run:
            run.log({**{f"train/{k}": v for k, v in terms_sum.items()}, "lr": lr, "tok/s": tokens_seen / dt},
                    step=step)
    if bar:
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in terms_sum.items()})
    if step % save_interval == 0:
        save()
save()
if stage == 2 and teacher_ranks:
    release_teacher()
print0(f"{'stopped' if stop_flag.requested else 'done'} at step {step}; saved {out_dir}/hybrid and {out_dir}/ckpt.pt")
if distributed:
    dist.barrier()  # all ranks finish before any tears down
    dist.destroy_process_group()
