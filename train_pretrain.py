"""
Pretrain RWKV-7 with its authors' recipe, on one process or under torchrun (DDP or FSDP2), GPU or CPU.

    python data/shakespeare_char/prepare.py && python train_pretrain.py config/shakespeare_char.py  # CPU, minutes
    python train_pretrain.py config/rwkv7_0.1b_minipile.py                                          # 1 GPU
    python train_pretrain.py config/rwkv7_0.1b_minipile.py --compile=True --cuda_graph=True         # 1 GPU, fast
    torchrun --standalone --nproc_per_node=8 train_pretrain.py config/rwkv7_0.4b_pile.py --parallel=fsdp
    python train_pretrain.py config/shakespeare_char.py --init_from=resume  # after Ctrl+C, SIGTERM or exit_step

The recipe is BlinkDL/RWKV-LM's RWKV-v7/train_temp (DeepSpeed + Lightning there, plain torch here; reference notes
§3): AdamW(0.9, 0.99, eps 1e-18) with weight decay on the large matrices only and 2x lr on att.w0, a cosine over
tokens from learning_rate to min_lr after a 0.01 -> 1 warm-up, clipping at 1.0, L2Wrap (inside model.py's loss),
the magic-prime sampler, and train_log.txt with one line per mini-epoch of 40320 samples. Resuming continues
exactly (bit for bit on CPU); the architecture comes from the checkpoint, the rest from the command line.
"""
import contextlib, datetime, math, os, random, signal, subprocess, sys, time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from tqdm import tqdm

from configurator import ConfigError, check, configure, exit_on_config_error
from data.binidx import BinIdx, check_magic_prime, load_meta, open_dataset, sample_offset
from data.binidx import magic_prime as find_magic_prime
from lora import add_lora, merge_state_dict
from model import CUDAGraphStep, RWKV, RWKVConfig, all_reduce_grads, ctx_warmup_len, peak_bf16_flops

# -----------------------------------------------------------------------------
# default config: the authors' L12-D768 MiniPile demo (reference §3.1); config files and --key=value override it
# I/O
out_dir = 'out'              # ckpt.pt, rwkv-latest.pth, rwkv-final.pth, log.txt, train_log.txt
init_from = 'scratch'        # 'scratch' (the authors' init), 'resume' (out_dir/ckpt.pt) or path/to/official.pth
eval_interval = 1000         # steps between validation + checkpoint (ckpt.pt and rwkv-latest.pth)
eval_iters = 20              # validation batches per process (the same fixed windows every time)
log_interval = 10            # steps between log lines
exit_step = 0                # > 0: save and stop at this step; the schedule still spans max_tokens (jobs, tests)
epoch_save = 10              # keep rwkv-{mini-epoch}.pth every this many mini-epochs (the authors' epoch_save); 0 = off
progress_bar = True          # tqdm bar with loss, tokens/s and ETA (rank 0, and only when stderr is a terminal)
wandb_log = False            # log to wandb, if installed (WANDB_MODE=offline works too)
wandb_project = 'rwkv7'
wandb_run_name = 'pretrain'
# data
data_dir = 'data/minipile/minipile'  # a dir from data/*/prepare.py, or a binidx prefix (no val, no meta.json)
ctx_len = 512                # tokens per sample
batch_size = 16              # samples per micro-batch per process (the authors' micro_bsz)
gradient_accumulation_steps = 1  # global batch = batch_size * gradient_accumulation_steps * world size
magic_prime = 0              # > 0: this prime (§3.6); 0: the largest that fits, else random windows; -1: random
epoch_samples = 40320        # samples per mini-epoch = one train_log.txt line (the authors' 40320)
# model (with init_from = a .pth or 'resume' the architecture comes from that file instead)
n_layer = 12
n_embd = 768
head_size = 64
vocab_size = 0               # 0 = the data's (meta.json)
wkv_impl = 'auto'            # 'auto' (GPU kernel on CUDA, chunked PyTorch elsewhere), 'kernel', 'torch'
dropout = 0.0                # on each block's residual branches (nanoGPT's small-data configs use 0.2; the authors: 0)
# optimizer and schedule
learning_rate = 6e-4         # the authors' lr_init
min_lr = 6e-5                # lr_final, reached at max_tokens
warmup_iters = 10            # steps of the 0.01 -> 1 warm-up
max_tokens = 1498226207      # run length in tokens (the authors' my_exit_tokens: all of MiniPile)
max_iters = 0                # > 0: run length in steps instead (then max_tokens = max_iters * tokens per step)
weight_decay = 0.001         # on emb, head and the r/k/v/o/ffn matrices only (model.optim_groups)
beta1 = 0.9
beta2 = 0.99
adam_eps = 1e-18
grad_clip = 1.0              # max global gradient norm; 0 = no clipping
max_bad_steps = 5            # a non-finite loss or gradient skips its update; this many in a row stop the run
# system
device = 'auto'              # 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'
dtype = 'auto'               # 'auto' (bfloat16 autocast on GPU, float32 on CPU), 'bfloat16', 'float32'
parallel = 'ddp'             # under torchrun: 'ddp', or 'fsdp' (FSDP2: fully_shard each block, then the root)
grad_checkpointing = False   # recompute each block in backward: much less activation memory, ~30% more time
# long context (seed (d)); both are exact: the same loss and gradients as one plain pass over the sample
ctx_parts = 1                # > 1: parts of ceil(ctx_len / ctx_parts) tokens: the WKV runs part by part (kernel scratch
                             # of one part), or with state_cp the whole model does
state_cp = False             # state checkpointing: the whole model runs part by part, each part recomputed in backward,
                             # gradients through the carried state: activation memory of one part
initial_ctx_len = 0          # > 0: context warm-up: samples start this long and grow linearly to ctx_len ...
ctx_warmup_steps = 0         # ... over this many steps (a sample is the first tokens of its ctx_len window)
# LoRA (lora.py) on init_from = a .pth, the rest frozen. ckpt.pt and lora-*.pth hold only the trainable
# subset (resume reloads the base .pth), rwkv-final.pth is the merged model
lora_r = 0                   # > 0: the LoRA rank; 0 = off
lora_alpha = 32.0            # the update is scaled by lora_alpha / lora_r
lora_dropout = 0.0           # dropout on the LoRA input
lora_parts = 'att,ffn,time,ln'  # att/ffn: LoRA on r/k/v/o and ffn key/value; time: mixes, w0/a0/v0..; ln: norms
lora_layers = ''             # e.g. '0-3 20-23'; '' = every layer
compile = False              # torch.compile each block (GPU)
cuda_graph = False           # replay each micro-step's forward+backward as one CUDA graph (one GPU process)
seed = 1337
# -----------------------------------------------------------------------------

world_size = int(os.environ.get('WORLD_SIZE', 1))
with exit_on_config_error():
    config = configure(globals(), sys.argv[1:])
    samples_per_step = batch_size * gradient_accumulation_steps * world_size
    tokens_per_step = samples_per_step * ctx_len
    if max_iters > 0:
        max_tokens = max_iters * tokens_per_step
    max_iters = -(-max_tokens // tokens_per_step)  # the authors stop at the first step with tokens >= max_tokens
    check(min(ctx_len, batch_size, gradient_accumulation_steps, eval_interval, log_interval, max_bad_steps) > 0,
          "ctx_len, batch_size, gradient_accumulation_steps, eval_interval, log_interval, max_bad_steps must be > 0")
    check(warmup_iters < max_iters, f"warmup_iters ({warmup_iters}) must be < the run's {max_iters} steps")
    check(0 < min_lr <= learning_rate, f"need 0 < min_lr ({min_lr}) <= learning_rate ({learning_rate})")
    check(epoch_samples % samples_per_step == 0, f"epoch_samples ({epoch_samples}) must be a multiple of the global "
          f"batch {samples_per_step} (batch_size * gradient_accumulation_steps * {world_size} processes)")
    check(parallel in ('ddp', 'fsdp'), f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")
    check(ctx_parts >= 1, f"need ctx_parts >= 1, got {ctx_parts}")
    check(lora_r == 0 or init_from != 'scratch', "LoRA needs init_from=a .pth (or resume), not 'scratch'")
    check(0 <= initial_ctx_len <= ctx_len and ctx_warmup_steps >= 0,
          f"need 0 <= initial_ctx_len ({initial_ctx_len}) <= ctx_len ({ctx_len}) and ctx_warmup_steps >= 0")
    check(dtype in ('auto', 'bfloat16', 'float32'), f"dtype must be 'auto', 'bfloat16' or 'float32', got {dtype!r}")
    device = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    check(device_type == 'cpu' or torch.cuda.is_available(), f"device={device!r} but CUDA is not available")
    dtype = ('bfloat16' if device_type == 'cuda' else 'float32') if dtype == 'auto' else dtype
    check(not cuda_graph or (device_type == 'cuda' and world_size == 1 and not (state_cp or initial_ctx_len or
                                                                                grad_checkpointing)),
          "cuda_graph=True needs one CUDA process and state_cp, initial_ctx_len, grad_checkpointing off (fixed shapes, "
          "no recomputation)")

    try:  # data first, so that a wrong path fails before a big model is built
        if os.path.isdir(data_dir):  # from data/*/prepare.py: train, val, meta.json
            train_ds, val_ds = open_dataset(data_dir, 'train'), open_dataset(data_dir, 'val')
            data_vocab = load_meta(data_dir)['vocab_size']
        else:  # a bare binidx prefix, like the published MiniPile files: train only, vocab unknown
            check(os.path.isfile(data_dir + '.idx'), f"data_dir {data_dir} is neither a dataset dir nor a binidx prefix "
                  f"(no {data_dir}.idx): run data/shakespeare_char/prepare.py or data/prepare.py, or fix the path")
            train_ds, val_ds, data_vocab = BinIdx(data_dir), None, None
        check(train_ds.num_tokens > ctx_len + 1, f"{data_dir}: {train_ds.num_tokens} train tokens, too few for ctx_len")
        check(val_ds is None or val_ds.num_tokens > ctx_len, f"{data_dir}: val split shorter than ctx_len {ctx_len}")
        if magic_prime == 0:
            try:
                magic_prime = find_magic_prime(train_ds.num_tokens, ctx_len)
            except ValueError:
                magic_prime = -1  # small data: no 3n+2 prime close enough below the window count
        elif magic_prime > 0:
            check_magic_prime(magic_prime, train_ds.num_tokens, ctx_len)

        checkpoint, lora_base = None, None
        if init_from == 'resume':
            ckpt_path = os.path.join(out_dir, 'ckpt.pt')
            check(os.path.isfile(ckpt_path), f"init_from='resume' but there is no {ckpt_path}")
            checkpoint = torch.load(ckpt_path, map_location='cpu', weights_only=False)  # ours: holds RNG states
            old = checkpoint['config']
            check(old['ctx_len'] == ctx_len and old['samples_per_step'] == samples_per_step,
                  f"resume needs the checkpoint's ctx_len {old['ctx_len']} and global batch {old['samples_per_step']}"
                  f" (now {ctx_len}, {samples_per_step}); to change them, start anew from {out_dir}/rwkv-latest.pth")
            lora_base = checkpoint.get('lora_base')
            if lora_base:  # a LoRA run's checkpoint: its settings, the frozen rest from the base .pth
                lora_r, lora_alpha, lora_dropout, lora_parts, lora_layers = (
                    old[k] for k in ('lora_r', 'lora_alpha', 'lora_dropout', 'lora_parts', 'lora_layers'))
                model = add_lora(RWKV.from_pretrained(lora_base, wkv_impl=wkv_impl), lora_r, lora_alpha, lora_dropout,
                                 lora_parts, lora_layers)
                missing, unexpected = model.load_state_dict(checkpoint['model'], strict=False)
                check(not unexpected and all(not model.get_parameter(k).requires_grad for k in missing),
                      f"{ckpt_path} does not match the LoRA of {lora_base}")
            else:
                with torch.device('meta'):  # no init: every tensor comes from the checkpoint
                    model = RWKV(RWKVConfig(**{**checkpoint['model_args'], 'wkv_impl': wkv_impl}))
                model.load_state_dict(checkpoint['model'], assign=True)
        elif init_from == 'scratch':
            check(vocab_size or data_vocab, f"{data_dir} has no meta.json: set vocab_size (65536 for RWKV World)")
            torch.manual_seed(seed)  # the same initial weights on every rank
            model = RWKV(RWKVConfig(n_layer=n_layer, n_embd=n_embd, head_size=head_size,
                                    vocab_size=vocab_size or data_vocab, wkv_impl=wkv_impl, dropout=dropout))
        else:
            check(os.path.isfile(init_from), f"init_from={init_from!r}: no such file ('scratch', 'resume' or a .pth)")
            model = RWKV.from_pretrained(init_from, wkv_impl=wkv_impl, dropout=dropout)
            if lora_r:
                lora_base = os.path.abspath(init_from)
                torch.manual_seed(seed)  # LoRA A's random init: the same in every run with this seed
                add_lora(model, lora_r, lora_alpha, lora_dropout, lora_parts, lora_layers)
    except (FileNotFoundError, ValueError) as e:  # a missing file or a bad checkpoint: one line too, exit 2
        raise ConfigError(str(e)) from None
    n_layer, n_embd, head_size, vocab_size = (getattr(model.config, k) for k in ('n_layer', 'n_embd', 'head_size',
                                                                                  'vocab_size'))  # for the log
    check(data_vocab is None or vocab_size >= data_vocab, f"model vocab_size {vocab_size} < data vocab_size {data_vocab} "
          f"({data_dir}/meta.json): raise vocab_size or prepare the data with the model's tokenizer")
config = {k: globals()[k] for k in config} | dict(samples_per_step=samples_per_step, world_size=world_size)

# -----------------------------------------------------------------------------
# processes and device: nccl on GPUs, gloo on CPU (so `torchrun --nproc_per_node=2` works on a laptop too)
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo')
    rank, local_rank = dist.get_rank(), int(os.environ['LOCAL_RANK'])
    if device_type == 'cuda':
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
else:
    rank, local_rank = 0, 0
master = rank == 0
random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)  # nothing below draws from these; saved anyway
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
# no cast cache under a CUDA graph (PyTorch's rule for autocast with graphs: a cached cast can outlive its capture)
ctx = torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=not cuda_graph) if dtype == 'bfloat16' \
    else contextlib.nullcontext()
if master:
    os.makedirs(out_dir, exist_ok=True)
log_file = open(os.path.join(out_dir, 'log.txt'), 'a') if master else None
bar = None  # the tqdm bar, once there is one

def print0(line):
    """Print on rank 0 (through tqdm while a bar is shown) and append to out_dir/log.txt."""
    if master:
        tqdm.write(line) if bar is not None and not bar.disable else print(line, flush=True)
        log_file.write(line + '\n'), log_file.flush()

def git(*args):
    try:
        return subprocess.run(['git', *args], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True).stdout.strip()
    except OSError:  # no git installed
        return ''

# each run's log opens with the command, versions, hardware, commit and the resolved config
gpu = torch.cuda.get_device_name(device) if device_type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
print0(f"=== {datetime.datetime.now():%Y-%m-%d %H:%M:%S} python {' '.join(sys.argv)}")
print0(f"torch {torch.__version__}, CUDA {torch.version.cuda or '-'}, HIP {torch.version.hip or '-'}, "
       f"{world_size} x {gpu}, {parallel if ddp else 'single process'}, {dtype}, "
       f"git {git('rev-parse', '--short', 'HEAD') or '?'}{' (dirty)' if git('status', '--porcelain') else ''}")
print0(f"config: {config}")
n_params = sum(p.numel() for p in model.parameters())
print0(f"model L{n_layer}-D{n_embd} vocab {vocab_size}: {n_params / 1e6:.2f}M parameters | {tokens_per_step:,} "
       f"tokens/step, {max_iters:,} steps | sampler: {f'magic prime {magic_prime}' if magic_prime > 0 else 'random windows'}")
flops_per_token = model.flops_per_token()  # for MFU

# -----------------------------------------------------------------------------
# model on the device and wrapped, optimizer, resume state
model.to(device)
raw_model = model  # the unwrapped module: eval, state dicts (under FSDP it is the sharded root itself)
raw_model.grad_checkpointing = grad_checkpointing
part_len = -(-ctx_len // ctx_parts)  # tokens per part (the last part of a sample may be shorter)
if ctx_parts > 1 and not state_cp:
    raw_model.set_wkv_part_len(part_len)

def loss_of(m, x, y):
    """The model's loss on (x, y): segment by segment with state checkpointing, else in one call."""
    return raw_model.forward_segments(x, y, part_len)[1] if state_cp else m(x, y)[1]


def micro_step(x, y):
    """Forward and backward of one micro-batch; returns the detached loss, already divided for accumulation."""
    with ctx:
        loss = loss_of(model, x, y) / gradient_accumulation_steps
    loss.backward()
    return loss.detach()


graphed_step = None  # cuda_graph: a model.CUDAGraphStep
# the authors' parameter groups, by name and before sharding: optim_groups' p.squeeze() fails on a DTensor sharded
# along a size-1 dim (the [1, 1, C] mixes), and fully_shard keeps the names but replaces the parameters
names = {p: n for n, p in raw_model.named_parameters()}
groups = [g | dict(params=[names[p] for p in g['params']]) for g in raw_model.optim_groups(weight_decay)]
if compile:
    print0("compiling the blocks (the first steps take a while)")
    raw_model.compile_blocks()  # in place: parameter names get no _orig_mod. prefix
if ddp and parallel == 'fsdp':
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == 'bfloat16' \
        else MixedPrecisionPolicy()
    for block in raw_model.blocks:  # one all-gather per block in forward and in backward
        fully_shard(block, mp_policy=mp)
    fully_shard(raw_model, mp_policy=mp)  # the root holds emb, ln_out and head
elif ddp and not state_cp:
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(raw_model, device_ids=[local_rank] if device_type == 'cuda' else None)
elif ddp:  # state_cp: no DDP wrapper, gradients averaged by all_reduce_grads below; start from rank 0's weights
    for p in raw_model.parameters():
        dist.broadcast(p.data, 0)
params = dict(raw_model.named_parameters())

optimizer = torch.optim.AdamW([g | dict(params=[params[n] for n in g['params']]) for g in groups], lr=learning_rate,
                              betas=(beta1, beta2), eps=adam_eps, fused=device_type == 'cuda')

start_step, best_val_loss, epoch_loss, epoch_steps = 0, float('inf'), 0.0, 0
if checkpoint is not None:
    set_optimizer_state_dict(raw_model, optimizer, checkpoint['optimizer'], options=StateDictOptions(full_state_dict=True))
    start_step, best_val_loss, (epoch_loss, epoch_steps) = checkpoint['step'], checkpoint['best_val_loss'], checkpoint['epoch_loss']
    rng = checkpoint['rng']
    torch.set_rng_state(rng['torch']), np.random.set_state(rng['numpy']), random.setstate(rng['python'])
    if device_type == 'cuda' and rng['cuda'] is not None:
        torch.cuda.set_rng_state(rng['cuda'])
    print0(f"resumed from {out_dir}/ckpt.pt at step {start_step}")
    checkpoint = None  # free the memory

# -----------------------------------------------------------------------------
# data: every sample is a pure function of a global sample counter, so the step is the position in the data

def sample_start(ii):
    """Token offset of sample ii: the magic-prime permutation (§3.6), or a random window drawn from (seed, ii)."""
    if magic_prime > 0:
        return sample_offset(ii, magic_prime, ctx_len)
    return int(np.random.default_rng([seed, ii]).integers(train_ds.num_tokens - ctx_len))

def get_batch(ds, starts):
    xy = torch.from_numpy(np.stack([ds.get(s, ctx_len + 1) for s in starts]).astype(np.int64))
    x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
    if device_type == 'cuda':
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y

def train_batch(step, micro):
    # Micro-batch `micro` of optimizer step `step` on this rank: samples ii = 1 + g, with the global counter
    # g = ((step * accum + micro) * batch_size + j) * world_size + rank. With accum = 1 this is the authors'
    # ii = 1 + epoch * 40320 + idx * world_size + rank, and any split of one global batch reads the same samples.
    first = (step * gradient_accumulation_steps + micro) * batch_size
    x, y = get_batch(train_ds, [sample_start(1 + (first + j) * world_size + rank) for j in range(batch_size)])
    n = ctx_warmup_len(step, initial_ctx_len, ctx_len, ctx_warmup_steps)
    return (x[:, :n], y[:, :n]) if n < ctx_len else (x, y)

@torch.no_grad()
def estimate_loss():
    """Mean validation loss over fixed, evenly spaced windows, shared out over all ranks and averaged."""
    raw_model.eval()
    n, span = eval_iters * batch_size * world_size, val_ds.num_tokens - ctx_len - 1
    losses = torch.zeros(eval_iters, device=device)
    for i in range(eval_iters):
        ks = [(i * batch_size + j) * world_size + rank for j in range(batch_size)]
        x, y = get_batch(val_ds, [k * span // max(n - 1, 1) for k in ks])
        with ctx:
            losses[i] = loss_of(raw_model, x, y)  # no graph: segments keep eval memory at one part too
    raw_model.train()
    total = losses.mean()
    if ddp:
        dist.all_reduce(total)  # a sum: gloo has no AVG
    return total.item() / world_size

def get_lr(step):
    """The authors' schedule (reference §3.3): a cosine from learning_rate to min_lr over TOKENS, starting after the
    warm-up tokens, times a linear 0.01 -> 1 ramp over the first warmup_iters steps."""
    tokens, warmup_tokens = step * tokens_per_step, warmup_iters * tokens_per_step
    progress = min(max((tokens - warmup_tokens) / (max_tokens - warmup_tokens), 0.0), 1.0)
    f = min_lr / learning_rate
    lr = learning_rate * ((0.5 + f / 2) + (0.5 - f / 2) * math.cos(math.pi * progress))
    return lr * (0.01 + 0.99 * step / warmup_iters) if step < warmup_iters else lr

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 (every rank must take part)
# LoRA: only the trainable subset is gathered and saved (the frozen rest is the base .pth)
SAVED = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=bool(lora_base))

def save_official(sd, name):
    """The official .pth layout (bf16, the authors' names) from a full state dict."""
    raw_model.save_pretrained(os.path.join(out_dir, name), state_dict=sd)

def save_lora(sd, name):
    """What lora.load_lora reads: the settings and the trainable tensors (merge: python lora.py BASE LORA OUT)."""
    path = os.path.join(out_dir, name)
    torch.save(dict(lora_config=raw_model.lora_config, weights=sd), path + '.tmp')
    os.replace(path + '.tmp', path)

def save_checkpoint(step, final):
    sd, opt_sd = get_model_state_dict(raw_model, options=SAVED), get_optimizer_state_dict(raw_model, optimizer, options=FULL)
    full = get_model_state_dict(raw_model, options=FULL) if lora_base and final else None  # for the merged file
    if master:
        rng = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                   cuda=torch.cuda.get_rng_state() if device_type == 'cuda' else None)
        ckpt = dict(model=sd, optimizer=opt_sd, model_args=asdict(raw_model.config), config=config, lora_base=lora_base,
                    step=step,
                    samples=step * samples_per_step, best_val_loss=best_val_loss, epoch_loss=(epoch_loss, epoch_steps), rng=rng)
        path = os.path.join(out_dir, 'ckpt.pt')
        torch.save(ckpt, path + '.tmp')
        os.replace(path + '.tmp', path)  # a job killed mid-write leaves the previous checkpoint intact
        if lora_base:
            save_lora(sd, 'lora-latest.pth')
            if final:  # the merged model, in the official layout
                merged = os.path.join(out_dir, 'rwkv-latest.pth')
                lora = raw_model.lora_config
                torch.save(merge_state_dict(full, lora['alpha'] / lora['r']), merged + '.tmp')
                os.replace(merged + '.tmp', merged)
        else:
            save_official(sd, 'rwkv-latest.pth')
        if final:
            os.replace(os.path.join(out_dir, 'rwkv-latest.pth'), os.path.join(out_dir, 'rwkv-final.pth'))
        print0(f"saved {path} at step {step}" + (" and rwkv-final.pth" if final else ""))

stop_signal = None
def on_signal(signum, frame):  # only set a flag: the loop saves and exits at the next step boundary
    global stop_signal
    stop_signal = signal.Signals(signum).name
    signal.signal(signum, signal.SIG_DFL)  # a second Ctrl+C quits at once
    if master:  # os.write, not print: the signal may have interrupted a print
        os.write(2, f"\n{stop_signal}: saving a checkpoint after this step (send it again to quit at once)\n".encode())
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, on_signal)

# -----------------------------------------------------------------------------
# logging: train_log.txt in the authors' format, wandb, the bar
steps_per_epoch = epoch_samples // samples_per_step
peak = peak_bf16_flops(gpu) if device_type == 'cuda' else None  # None: no MFU shown
if master:
    train_log = open(os.path.join(out_dir, 'train_log.txt'), 'a')
    train_log.write(f"NEW RUN {datetime.datetime.now():%Y-%m-%d-%H-%M-%S}\n{config}\n"), train_log.flush()
    if wandb_log:
        try:  # lazily: wandb is optional, and a missing install or login must not stop the run
            import wandb
            wandb.init(project=wandb_project, name=wandb_run_name, config=config)
        except Exception as e:
            print0(f"wandb off ({type(e).__name__}: {e})")
            wandb_log = False
    bar = tqdm(total=max_iters, initial=start_step, unit='step', dynamic_ncols=True,
               disable=not (progress_bar and sys.stderr.isatty()))
if val_ds is None:
    print0(f"{data_dir} has no val split: no validation (the authors' recipe has none either)")

# -----------------------------------------------------------------------------
# training loop: set lr -> evaluate/save/exit -> micro-steps -> clip -> step (skipped if non-finite) -> log
step, bad_steps, stop, t_start = start_step, 0, False, time.time()
x, y = train_batch(step, 0)
while True:
    last_step = step == max_iters
    lr = get_lr(step)
    for group in optimizer.param_groups:
        group['lr'] = lr * group['lr_scale']  # 2x on att.w0
    fresh = step == start_step  # nothing new to save yet; a resumed run's first evaluation was done before it
    if val_ds is not None and (last_step or step % eval_interval == 0) and not (fresh and init_from == 'resume'):
        val_loss = estimate_loss()
        best_val_loss = min(best_val_loss, val_loss)
        print0(f"step {step} | val loss {val_loss:.4f}")
        if wandb_log:
            wandb.log({'val/loss': val_loss}, step=step)
    exiting = last_step or stop or step == exit_step > 0
    if not fresh and (exiting or step % eval_interval == 0):
        save_checkpoint(step, final=last_step)
    if exiting:
        break

    t0, seq_len = time.time(), x.shape[1]
    loss_sum = torch.zeros((), device=device)
    for micro in range(gradient_accumulation_steps):
        sync = micro == gradient_accumulation_steps - 1  # reduce gradients on the last micro-step only
        if ddp and parallel == 'ddp' and not state_cp:
            model.require_backward_grad_sync = sync
        elif ddp and parallel == 'fsdp':
            model.set_requires_gradient_sync(sync)
        if cuda_graph and graphed_step is None:  # captured at the first step, replayed from then on
            graphed_step = CUDAGraphStep(micro_step, model.parameters(), x, y)
            print0("cuda_graph: captured one micro-step (forward + backward)")
        loss = graphed_step(x, y) if cuda_graph else micro_step(x, y)
        x, y = train_batch(step + 1, 0) if sync else train_batch(step, micro + 1)  # prefetch while the GPU works
        loss_sum += loss
    if ddp and parallel == 'ddp' and state_cp:
        all_reduce_grads(raw_model.parameters())
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float('inf'))
    norm = norm.full_tensor() if hasattr(norm, 'full_tensor') else norm  # a DTensor under FSDP
    # one small all-reduce and one sync per step (the authors have one too): the mean loss for the logs, the
    # global norm for the finite check, and whether any rank got a signal, so that all ranks stop together
    stats = torch.stack([loss_sum.float(), norm.float(), torch.tensor(float(stop_signal is not None), device=device)])
    if ddp:
        dist.all_reduce(stats)
    lossf, normf, stop = (stats / world_size).tolist()
    if math.isfinite(lossf) and math.isfinite(normf):
        optimizer.step()
        bad_steps, epoch_loss, epoch_steps = 0, epoch_loss + lossf, epoch_steps + 1
    else:  # never train on inf/nan: skip this update (the data moves on with the step)
        bad_steps += 1
        print0(f"warning: step {step}: loss {lossf}, grad norm {normf}: update skipped ({bad_steps} in a row)")
        if bad_steps >= max_bad_steps:
            print0(f"error: {bad_steps} non-finite steps in a row: lower learning_rate or check the data; "
                   f"the last checkpoint, if any, is {out_dir}/ckpt.pt")
            sys.exit(1)
    optimizer.zero_grad(set_to_none=not cuda_graph)  # the graph adds into the gradients it captured
    step, stop = step + 1, stop > 0
    dt = time.time() - t0

    if step % steps_per_epoch == 0:  # end of a mini-epoch: the authors' train_log.txt line (reference §3.7)
        epoch, mean = step // steps_per_epoch - 1, epoch_loss / max(epoch_steps, 1)
        if master:
            train_log.write(f"{epoch} {mean:.6f} {math.exp(mean):.4f} {lr:.8f} {datetime.datetime.now()} "
                            f"{epoch - start_step // steps_per_epoch}\n"), train_log.flush()
        if epoch_save and epoch % epoch_save == 0:
            sd = get_model_state_dict(raw_model, options=SAVED)
            if master and lora_base:
                save_lora(sd, f"lora-{epoch}.pth")
            elif master:
                save_official(sd, f"rwkv-{epoch}.pth")
        epoch_loss, epoch_steps = 0.0, 0
    if master:
        tok_s = samples_per_step * seq_len / dt
        if step % log_interval == 0 or step == max_iters:
            mfu = f" | mfu {100 * flops_per_token * tok_s / world_size / peak:.1f}%" if peak else ""
            print0(f"step {step}/{max_iters} | loss {lossf:.4f} | lr {lr:.1e} | dt {dt * 1000:.0f}ms | "
                   f"tok/s {tok_s:,.0f}{mfu}" + (f" | ctx {seq_len}" if initial_ctx_len else ""))
            if wandb_log:
                wandb.log({'loss': lossf, 'lr': lr, 'tok/s': tok_s, 'grad_norm': normf,
                           'Gtokens': step * tokens_per_step / 1e9}, step=step)
        bar.set_postfix_str(f"loss {lossf:.4f}, {tok_s:,.0f} tok/s", refresh=False)
        bar.update(1)

if master:
    bar.close()
    why = 'done' if last_step else ('stopped by a signal' if stop else 'stopped at exit_step') + \
        '; continue with --init_from=resume'
    val = f" | best val loss {best_val_loss:.4f}" if val_ds is not None else ""
    mem = f" | peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device_type == 'cuda' else ""
    print0(f"{why}: step {step} | {(time.time() - t_start) / 60:.1f} min{val}{mem}")
if master and wandb_log:
    wandb.finish()
if ddp:
    dist.barrier()  # all ranks finish before any tears down
    dist.destroy_process_group()
    if parallel == 'fsdp' and lora_base:  # this pairing (frozen base weights inside FSDP2 units, gloo) aborted
        # at interpreter teardown in CI, after everything was saved ("terminate called without an active exception"):
        # everything is written and flushed, so leave without the finalizers
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)
