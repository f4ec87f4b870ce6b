"""
Speed of the WKV7 implementations, measured by a script rather than by tests.

    python bench.py                 # the GPU table on a CUDA machine, the CPU comparison otherwise
    python bench.py --device=cpu    # chunked PyTorch WKV vs the sequential loop at B=2, T=1024, C=256
    python bench.py --distill       # a distillation step of a SmolLM2-shaped hybrid vs the teacher's training step,
                                    # each eager and replayed from a CUDA graph (--no-cuda-graph: eager only)
    python bench.py --distill --profile   # GPU, with --pretrain too: + kernel time per step vs wall, by kernel group
    python bench.py --pretrain      # an L12-D768 pretraining step, ctx 512, batch 16, blocks compiled (--no-compile;
                                    # --cuda-graph: forward + backward replayed from a CUDA graph)
    python bench.py --sweep         # GPU: also time every rows-per-block setting of the kernel (tuning)
    python bench.py --phases        # GPU: cycles of each phase of the kernel's backward (a -DWKV7_PROFILE build)
    python bench.py --no-fla        # GPU: skip fla's chunk_rwkv7 even when it is importable
    python bench.py --builds="-DWKV7_BWD_L=32 -DWKV7_BWD_MINB=1;..."   # GPU: also time these WKV7_CFLAGS builds
    python bench.py --decode        # GPU: L12-D768 decoding tok/s at batch 1 and 64 (eager, CUDA graph, compiled + graph)
                                    # and the `rwkv` package's 'cuda fp16' strategy at batch 1, in the same run
    python bench.py --long          # long-context training of the 0.4B shape at ctx 32768 and 131072 (a tiny model on CPU)
                                    # (--segment=N: state_cp segment length, default 4096; --long_tiny: tiny on GPU too)

GPU: wkv7.cu at (B, T, C) = (8, 4096, 4096), (16, 512, 768), (1, 16384, 2048), head 64, bf16 in and out, fp32 state:
a float64 check on a slice of each shape, then forward and forward+backward (ones as dy), median of 20 after 3
warm-ups timed with CUDA events, and the peak memory of forward+backward (inputs included); fla's chunk_rwkv7 on
the same inputs in the same run when fla is installed.

Every timing is the median of several runs after a warm-up; results go into the README with device and date.
"""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import model
from model import LOG_DECAY_SCALE, wkv7_chunked, wkv7_kernel, wkv7_sequential


def random_inputs(B, T, C, N=64, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    H = C // N
    rnd = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.float32)  # noqa: E731
    kk = F.normalize(rnd(B, T, H, N), dim=-1)
    x = [rnd(B, T, H, N), rnd(B, T, H, N) * 3, rnd(B, T, H, N), rnd(B, T, H, N), -kk, kk * torch.sigmoid(rnd(B, T, H, N))]
    return [t.to(dtype) for t in x] + [rnd(B, H, N, N)]


def time_cpu(fn, inputs, backward, repeats=5):
    times = []
    for _ in range(repeats + 1):  # the first run is a warm-up
        xs = [t.clone().requires_grad_(backward) for t in inputs]
        t0 = time.perf_counter()
        y, s = fn(*xs)
        if backward:
            (y.sum() + s.sum()).backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1000


def bench_cpu(B=2, T=1024, C=256):
    torch.manual_seed(0)
    x = random_inputs(B, T, C)
    print(f"CPU WKV7, B={B} T={T} C={C} head 64, fp32, {torch.get_num_threads()} threads, median ms")
    print(f"{'implementation':<28}{'fwd':>10}{'fwd+bwd':>10}")
    rows = {}
    for name, fn in [("chunked (wkv7_chunked)", wkv7_chunked), ("sequential (wkv7_sequential)", wkv7_sequential)]:
        rows[name] = (time_cpu(fn, x, False), time_cpu(fn, x, True, repeats=3))
        print(f"{name:<28}{rows[name][0]:>10.1f}{rows[name][1]:>10.1f}")
    (cf, cb), (sf, sb) = rows.values()
    print(f"speed-up of the chunked form: {sf / cf:.1f}x forward, {sb / cb:.1f}x forward+backward")


# --- GPU: the kernel (and fla) at the shapes ----------------------------------------------------------

GPU_SHAPES = [(8, 4096, 4096), (16, 512, 768), (1, 16384, 2048)]
TARGET_MS = {(8, 4096, 4096): 11.1, (16, 512, 768): 0.86, (1, 16384, 2048): 11.0}  # fwd+bwd, issue 3


def time_gpu(fn, warmup=3, repeats=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


KERNEL_GROUPS = [("Triton (Inductor)", ("triton",)), ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas")),
                 ("WKV", ("wkv",)), ("AdamW, clipping", ("adam", "multi_tensor", "foreach", "norm_kernel")),
                 ("copies", ("copy", "memcpy", "memset", "fill"))]


def profile_step(step, name, ms, steps=5):
    """--profile: the GPU's busy time in `steps` calls of step() by torch.profiler, per step and grouped by kernel
    name, as a share of the step's unprofiled time `ms` (the profiler slows the launches down, so its own wall time
    is printed but not used): the rest of a step the GPU waits for Python to launch kernels."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps * 1000
    groups = {}
    for event in prof.key_averages():
        if event.self_device_time_total > 0:
            group = next((g for g, keys in KERNEL_GROUPS if any(k in event.key.lower() for k in keys)), "other")
            groups[group] = groups.get(group, 0.0) + event.self_device_time_total / steps / 1000
    busy = sum(groups.values())
    print(f"  {name}: {busy:.1f} ms of kernels = {100 * busy / ms:.0f}% of the {ms:.1f} ms step ({wall:.1f} ms "
          f"profiled): "
          + ", ".join(f"{group} {t:.1f}" for group, t in sorted(groups.items(), key=lambda kv: -kv[1])))


def fwd_bwd_fns(impl, leaves, dy):
    def fwd():
        with torch.no_grad():
            impl(*leaves)

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        impl(*leaves)[0].backward(dy)
    return fwd, fwd_bwd


def peak_gb(fn):
    fn()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9


def check_slice(B, T, C, impl):
    """max rel. error of y and of every gradient vs the float64 loop, on B=1, T<=256, 2 heads of the shape."""
    xs = random_inputs(1, min(T, 256), 128, dtype=torch.bfloat16, device="cuda", seed=1)[:6]
    leaves = [x.requires_grad_() for x in xs]
    y = impl(*leaves)[0]
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = [x.detach().double().requires_grad_() for x in xs]
    y_ref = wkv7_sequential(*ref)[0]
    y_ref.backward(dy.double())
    err = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()  # noqa: E731
    return max([err(y, y_ref)] + [err(a.grad, b.grad) for a, b in zip(leaves, ref)])


def fla_impl():
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except Exception:  # not installed (or no Triton)
        return None

    def run(r, w, k, v, a, b):  # fla takes log decay; scale 1 (RWKV has no 1/sqrt(N)); its layer's training flags
        w_log = (LOG_DECAY_SCALE * torch.sigmoid(w.float())).to(r.dtype)
        return chunk_rwkv7(r, w_log, k, v, a, b, scale=1.0, safe_gate=True, lower_bound=LOG_DECAY_SCALE,
                           chunk_size=64)
    return run


def kernel_built_with(cflags):
    """wkv7_kernel on a build of wkv7.cu with these WKV7_CFLAGS (each set of flags is an extension of its own)."""
    os.environ["WKV7_CFLAGS"] = cflags
    model._WKV7_OPS.clear()
    ops = model.wkv7_ops(64)

    def run(*x):
        model._WKV7_OPS[64] = ops
        return wkv7_kernel(*x)
    return run


def bench_gpu(sweep=False, use_fla=True, builds=()):
    """builds: more WKV7_CFLAGS settings of wkv7.cu, each timed beside the default build in this run."""
    impls = {"wkv7.cu": kernel_built_with(os.environ.get("WKV7_CFLAGS", ""))}
    impls |= {f"wkv7.cu {flags}": kernel_built_with(flags) for flags in builds}
    fla = fla_impl() if use_fla else None
    if fla is not None:
        impls["fla chunk_rwkv7"] = fla
    print(f"GPU WKV7 on {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, head 64, "
          f"median of 20 (CUDA events)", flush=True)
    rows = []
    for B, T, C in GPU_SHAPES:
        xs = random_inputs(B, T, C, dtype=torch.bfloat16, device="cuda")[:6]
        leaves = [x.requires_grad_() for x in xs]
        dy = torch.ones(B, T, C // 64, 64, device="cuda", dtype=torch.bfloat16)
        settings = [(name, fn, 0) for name, fn in impls.items()]
        if sweep:
            settings += [(f"wkv7.cu rows={n}", impls["wkv7.cu"], n) for n in (16, 32, 64)]
        for name, fn, rows_per_block in settings:
            model.WKV7_ROWS_PER_BLOCK = rows_per_block
            try:
                err = check_slice(B, T, C, fn)
                fwd, fwd_bwd = fwd_bwd_fns(fn, leaves, dy)
                row = ((B, T, C), name, time_gpu(fwd), time_gpu(fwd_bwd), peak_gb(fwd_bwd), err)
            except Exception as e:  # e.g. an fla version with another signature
                print(f"  {name} at {(B, T, C)} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            finally:
                model.WKV7_ROWS_PER_BLOCK = 0
            print("  " + "  ".join(str(x) for x in row), flush=True)
            rows.append(row)
        del xs, leaves, dy
        torch.cuda.empty_cache()
    width = max([22] + [len(name) + 2 for name in impls])
    print(f"\n{'shape (B, T, C)':<18}{'implementation':<{width}}{'fwd ms':>9}{'fwd+bwd ms':>12}{'target':>8}"
          f"{'peak GB':>9}{'max rel err':>13}")
    for shape, name, f, fb, mem, err in rows:
        target = f"{TARGET_MS[shape]:.2f}" if name.startswith("wkv7.cu") else ""
        print(f"{str(shape):<18}{name:<{width}}{f:>9.2f}{fb:>12.2f}{target:>8}{mem:>9.2f}{err:>13.1e}")


# the backward's phases, in the order of its WKV7_PROF(k) marks in wkv7.cu
BWD_PHASES = ["dw loop + d log G_L sums", "loads", "cumsum log G", "G factors, dS G_L", "M, X, dV U",
              "invert, X+=, dU+=", "U, dX", "D, dK B, dR A, dV", "dR A+=, dK B+=, dS+=, store dv", "chain rule, lambdas"]


def bench_phases(runs=5):
    """Where the backward's time goes: a -DWKV7_PROFILE build sums thread 0's clock between the backward's barriers
    over all blocks and chunks (its own extension, beside the plain one); printed per backward chunk per block."""
    if not torch.cuda.is_available():
        sys.exit("bench.py --phases needs a CUDA GPU: it profiles wkv7.cu")
    # read when the kernel is built, which happens below; other flags (e.g. -DWKV7_BWD_L=32) are kept
    os.environ["WKV7_CFLAGS"] = (os.environ.get("WKV7_CFLAGS", "") + " -DWKV7_PROFILE").strip()
    fwd_op, _, chunk = model.wkv7_ops(64)  # chunk: the backward's chunk length (WKV7_BWD_L)
    prof_read = getattr(torch.ops, fwd_op.namespace).prof_read
    counts = torch.zeros(16, dtype=torch.int64)
    for B, T, C in GPU_SHAPES:
        leaves = [x.requires_grad_() for x in random_inputs(B, T, C, dtype=torch.bfloat16, device="cuda")[:6]]
        dy = torch.ones(B, T, C // 64, 64, device="cuda", dtype=torch.bfloat16)
        fwd_bwd = fwd_bwd_fns(wkv7_kernel, leaves, dy)[1]
        fwd_bwd()
        torch.cuda.synchronize()
        prof_read(counts)  # read and reset: the timed runs start from zero
        for _ in range(runs):
            fwd_bwd()
        torch.cuda.synchronize()
        prof_read(counts)
        rows = 64  # the kernel's automatic choice (wkv7.cu rows_per_block): split heads until 132 blocks
        while rows > 16 and B * (C // 64) * (64 // rows) < 132:
            rows //= 2
        per_chunk_block = runs * B * (C // 64) * (64 // rows) * ((T + chunk - 1) // chunk)
        total = counts[:len(BWD_PHASES)].sum().item()
        print(f"{(B, T, C)}, {rows} rows per block: {total / per_chunk_block:,.0f} cycles per {chunk}-step chunk "
              "per block")
        for name, n in zip(BWD_PHASES, counts.tolist()):
            print(f"  {name:<34}{n / per_chunk_block:>8,.0f}{100 * n / total:>6.0f}%")


def bench_distill(device, batch=16, ctx=512, layers=30, compile=True, cuda_graph=True, profile=False):
    """A stage-2 distillation step of an all-RWKV SmolLM2-135M-shaped hybrid (teacher forward, KL, backward, fused
    AdamW) against the teacher's own training step, same batch, bf16 autocast, random weights (timing only).
    cuda_graph (CUDA): also both steps with forward + backward replayed from a CUDA graph, as train_distill.py
    --cuda_graph=True does; the graph's memory, allocated at capture, counts in its peak."""
    import transformers
    from model import CUDAGraphStep, Hybrid, kl_loss, teacher_targets
    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                                   num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    teacher = transformers.AutoModelForCausalLM.from_config(cfg).to(device, torch.bfloat16 if cuda else torch.float32)
    teacher.eval().requires_grad_(False)
    hybrid = Hybrid(transformers.AutoModelForCausalLM.from_config(cfg), "all")
    hybrid.untie_embeddings()
    hybrid.to(device)
    if compile:  # what train_distill.py --compile=True does
        hybrid.compile_time_mixers()
        kl_loss, teacher_targets = torch.compile(kl_loss), torch.compile(teacher_targets)
    base = transformers.AutoModelForCausalLM.from_config(cfg).to(device)
    x = torch.randint(0, cfg.vocab_size, (batch, ctx), device=device)
    opt_h = torch.optim.AdamW(hybrid.parameters(), lr=1e-5, fused=cuda)
    opt_t = torch.optim.AdamW(base.parameters(), lr=1e-5, fused=cuda)

    def autocast(graph):  # a CUDA graph needs autocast's cast cache off
        return torch.autocast("cuda", torch.bfloat16, cache_enabled=not graph) if cuda else \
            torch.autocast("cpu", enabled=False)

    def hybrid_micro(x, graph):
        with autocast(graph):
            with torch.no_grad():
                target = teacher_targets(teacher(x).logits, 0, 1.0)
            loss = kl_loss(hybrid(x)[0], target, torch.ones_like(x, dtype=torch.bool), 1.0)
        loss.backward()
        return loss.detach()

    def teacher_micro(x, graph):
        with autocast(graph):
            loss = base(x, labels=x).loss
        loss.backward()
        return loss.detach()

    def make_step(micro, model, opt, graph):
        graphed = []  # captured at the first call (inside the timing's warm-up, so its memory counts)

        def step():
            if graph and not graphed:
                graphed.append(CUDAGraphStep(lambda x, _: micro(x, True), model.parameters(), x, x))
            if graph:
                graphed[0](x, x)
            else:
                micro(x, False)
            opt.step()
            opt.zero_grad(set_to_none=not graph)
        return step

    steps = [("hybrid stage-2 step", make_step(hybrid_micro, hybrid, opt_h, False)),
             ("teacher fwd+bwd+AdamW", make_step(teacher_micro, base, opt_t, False))]
    if cuda and cuda_graph:
        steps += [("hybrid, CUDA graph", make_step(hybrid_micro, hybrid, opt_h, True)),
                  ("teacher, CUDA graph", make_step(teacher_micro, base, opt_t, True))]
    rows = []
    for name, step in steps:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            ms = time_gpu(step, repeats=10)
            if profile:
                profile_step(step, name, ms)
        else:  # the CPU run only checks that the code works: one warm-up, one timed step
            step()
            t0 = time.perf_counter()
            step()
            ms = (time.perf_counter() - t0) * 1000
        rows.append((name, ms, torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")))
    print(f"distillation step, {torch.cuda.get_device_name() if cuda else 'CPU'}, batch {batch} x {ctx}, "
          f"{layers} layers, compile={compile}")
    for name, ms, gb in rows:
        print(f"{name:<24}{ms:>9.1f} ms {batch * ctx / ms * 1000:>10,.0f} tok/s {gb:>6.1f} GB")
    print(f"ratio {rows[0][1] / rows[1][1]:.2f} (target <= 1.5)")
    if len(rows) == 4:
        print(f"ratio, hybrid graphed / teacher eager {rows[2][1] / rows[1][1]:.2f}; both graphed "
              f"{rows[2][1] / rows[3][1]:.2f}")


def bench_pretrain(device, n_layer=12, n_embd=768, vocab=65536, batch=16, ctx=512, compile=True, steps=20,
                   cuda_graph=False, profile=False):
    """The step of train_pretrain.py (bf16 autocast, cross-entropy + L2Wrap, clipping, fused AdamW) on random tokens:
    ms/step, tok/s, MFU (known GPUs) and peak memory, after 8 warm-up steps (compilation included). cuda_graph:
    forward + backward replayed from a CUDA graph, as train_pretrain.py --cuda_graph=True does."""
    from model import RWKV, RWKVConfig
    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    m = RWKV(RWKVConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab)).to(device)
    if compile:
        m.compile_blocks()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-18, fused=cuda)
    x = torch.randint(0, vocab, (batch, ctx + 1), device=device)
    autocast = torch.autocast("cuda", torch.bfloat16, cache_enabled=not cuda_graph) if cuda else \
        torch.autocast("cpu", enabled=False)

    def micro_step(inputs, targets):
        with autocast:
            loss = m(inputs, targets)[1]
        loss.backward()
        return loss.detach()

    graphed = model.CUDAGraphStep(micro_step, m.parameters(), x[:, :-1], x[:, 1:]) if cuda_graph else None

    def step():
        (graphed or micro_step)(x[:, :-1], x[:, 1:])
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=not cuda_graph)

    for _ in range(8 if cuda else 1):
        step()
    # steps back to back, one sync at the end: time_gpu's sync after every call would add the launch latency that
    # a training loop hides behind the GPU
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    ms = (time.perf_counter() - t0) / steps * 1000
    memory = f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB" if cuda else "n/a"
    memory += " outside the graph's pool (its activations, allocated at capture, are not counted)" if cuda_graph else ""
    gpu, tok_s = torch.cuda.get_device_name() if cuda else "CPU", batch * ctx / ms * 1000
    peak = model.peak_bf16_flops(gpu) if cuda else None
    mfu = f", MFU {100 * m.flops_per_token() * tok_s / peak:.1f}%" if peak else ""
    print(f"pretraining step, L{n_layer}-D{n_embd} vocab {vocab}, batch {batch} x {ctx}, compile={compile}, "
          f"cuda_graph={cuda_graph}, {gpu}: {ms:.1f} ms/step, {tok_s:,.0f} tok/s{mfu}, peak {memory}")
    if profile and cuda:
        profile_step(step, "pretraining step", ms)


def bench_decode(device, n_layer=12, n_embd=768, steps=256, prompt_len=16):
    """Greedy decoding of random L12-D768 weights (vocab 65536), bf16 weights and fp32 state, through sample.py's
    generate: batch 1 and 64, eager, with the CUDA graph, and with the blocks compiled inside the graph; then the
    `rwkv` package (the authors' inference code, 'cuda fp16', its CUDA kernel on) on the same file at batch 1.
    tok/s = new tokens / wall time of the decode loop (sampling included), after a warm-up."""
    import os
    import tempfile
    from model import RWKV, RWKVConfig
    from sample import expand_state, generate, prefill
    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    model = RWKV(RWKVConfig(n_layer=n_layer, n_embd=n_embd)).eval()
    path = os.path.join(tempfile.mkdtemp(), f"L{n_layer}-D{n_embd}.pth")
    model.save_pretrained(path)
    model = model.to(device, torch.bfloat16 if cuda else torch.float32)
    prompt = torch.randint(0, model.config.vocab_size, (prompt_len,)).tolist()
    runs = [(1, False, False), (64, False, False)]
    if cuda:
        runs += [(1, True, False), (64, True, False), (1, True, True), (64, True, True)]
    print(f"decoding, {torch.cuda.get_device_name() if cuda else 'CPU'}, L{n_layer}-D{n_embd} vocab "
          f"{model.config.vocab_size}, {steps} greedy steps after a {prompt_len}-token prompt")
    print(f"{'implementation':<34}{'batch':>6}{'tok/s':>10}")
    results = {}
    for batch, graph, compiled in runs:
        if compiled:
            model.compile_blocks()  # in place, as sample.py --compile=True --cuda_graph=True does
        for n in (8, steps):  # warm-up (graph capture, compilation), then the timed run
            logits, state = prefill(model, prompt)
            gens = [torch.Generator().manual_seed(i) for i in range(batch)]
            sync = torch.cuda.synchronize if cuda else (lambda: None)
            sync()
            t0 = time.perf_counter()
            generate(model, logits.expand(batch, -1), expand_state(state, batch), n, gens, temperature=0,
                     cuda_graph=graph)
            sync()
            tok_s = batch * n / (time.perf_counter() - t0)
        name = "ours, " + ("compiled blocks + CUDA graph" if compiled else "CUDA graph" if graph else "eager")
        results[(batch, graph, compiled)] = tok_s
        print(f"{name:<34}{batch:>6}{tok_s:>10,.0f}", flush=True)
    if cuda:
        try:
            os.environ.update(RWKV_V7_ON="1", RWKV_JIT_ON="1", RWKV_CUDA_ON="1")
            from rwkv.model import RWKV as AuthorsRWKV
            theirs = AuthorsRWKV(model=path[:-4], strategy="cuda fp16")
            for n in (8, steps):
                out, st = theirs.forward(prompt, None)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(n):
                    out, st = theirs.forward([int(out.argmax())], st)
                torch.cuda.synchronize()
                tok_s = n / (time.perf_counter() - t0)
            print(f"{'rwkv package, cuda fp16':<34}{1:>6}{tok_s:>10,.0f}")
            print(f"best batch-1 / rwkv package: {max(v for k, v in results.items() if k[0] == 1) / tok_s:.2f}x")
        except ImportError:
            print("(the rwkv package is not installed: pip install rwkv for the comparison row)")
    best = {b: max(v for k, v in results.items() if k[0] == b) for b in (1, 64)}
    print(f"best batch 64 / best batch 1: {best[64] / best[1]:.1f}x")


def bench_long(device, n_layer=24, n_embd=1024, vocab=65536, ctxs=(32768, 131072), segment=4096, steps=3):
    """Training steps (fwd + bwd + fused AdamW) of the 0.4B shape (L24-D1024, vocab 65536), batch 1, random tokens,
    fp32 weights under bf16 autocast: with state checkpointing (forward_segments: segments of `segment` tokens,
    each segment's head and loss inside its checkpoint, so full-sequence logits never exist) at every ctx, then plain
    (one forward) at the first ctx. Peak memory includes weights, gradients and Adam states; OOM is reported."""
    from model import RWKV, RWKVConfig
    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    with torch.device(device):  # the authors' init, on the GPU (the orthogonal 65536 x 1024 head is slow on CPU)
        m = RWKV(RWKVConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab)).train()
    opt = m.configure_optimizer(0.1, 1e-5, device_type="cuda" if cuda else "cpu")
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    print(f"long-context training, {torch.cuda.get_device_name() if cuda else 'CPU'}, L{n_layer}-D{n_embd} vocab "
          f"{vocab}, batch 1, segment {segment}, {steps} timed steps after 1 warm-up")
    print(f"{'ctx':>8}  {'mode':<10}{'tokens/s':>10}{'peak GiB':>10}")
    for ctx, mode in [(c, "state_cp") for c in ctxs] + [(ctxs[0], "plain")]:
        x = torch.randint(0, vocab, (1, ctx + 1), device=device)

        def step():
            with autocast:
                if mode == "state_cp":
                    loss = m.forward_segments(x[:, :-1], x[:, 1:], segment)[1]
                else:
                    loss = m(x[:, :-1], x[:, 1:])[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            step()  # warm-up: kernel build, Adam states
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            if cuda:
                torch.cuda.synchronize()
            tok_s = f"{ctx * steps / (time.perf_counter() - t0):,.0f}"
            peak = f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f}" if cuda else "-"
        except torch.OutOfMemoryError:
            tok_s, peak = "OOM", "OOM"
        opt.zero_grad(set_to_none=True)
        print(f"{ctx:>8}  {mode:<10}{tok_s:>10}{peak:>10}", flush=True)


if __name__ == "__main__":
    device = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--device=")), None)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "--long" in sys.argv:  # python bench.py --long [--segment=4096] [--long_tiny] (tiny: a check that it runs)
        tiny = "--long_tiny" in sys.argv or device == "cpu"
        sizes = dict(n_layer=2, n_embd=64, vocab=256, ctxs=(512, 2048), segment=128) if tiny else {}
        seg = next((int(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--segment=")), None)
        bench_long(device, **(sizes | (dict(segment=seg) if seg else {})))
    elif "--decode" in sys.argv:
        bench_decode(device, **(dict(n_layer=2, n_embd=128, steps=16) if device == "cpu" else {}))
    elif "--pretrain" in sys.argv:  # python bench.py --pretrain [--no-compile] [--cuda-graph] [--profile]
        bench_pretrain(device, compile="--no-compile" not in sys.argv and device != "cpu",
                       cuda_graph="--cuda-graph" in sys.argv and device != "cpu", profile="--profile" in sys.argv,
                       **(dict(n_layer=2, n_embd=64, vocab=256, batch=2, ctx=64, steps=2) if device == "cpu" else {}))
    elif "--distill" in sys.argv:  # python bench.py --distill [--no-compile] [--no-cuda-graph] [--profile]
        bench_distill(device, compile="--no-compile" not in sys.argv and device != "cpu",
                      cuda_graph="--no-cuda-graph" not in sys.argv, profile="--profile" in sys.argv,
                      **(dict(batch=1, ctx=32, layers=2) if device == "cpu" else {}))
    elif "--phases" in sys.argv:
        bench_phases()
    elif device == "cpu":
        bench_cpu()
    else:
        builds = next((a.split("=", 1)[1].split(";") for a in sys.argv[1:] if a.startswith("--builds=")), [])
        bench_gpu(sweep="--sweep" in sys.argv, use_fla="--no-fla" not in sys.argv, builds=builds)
