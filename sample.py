"""
Sample from an RWKV-7 model: completion, a command-line chat, the LAMBADA evaluation, a decode benchmark.

    python sample.py --init_from=RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth --start="The Eiffel tower is in"
    python sample.py --init_from=out-shakespeare-char --start=FILE:prompt.txt --num_samples=3 --temperature=0.8
    python sample.py --init_from=model.pth --chat=True --top_p=0.3        # /reset starts over, /quit leaves
    python sample.py --init_from=model.pth --eval=lambada --eval_file=lambada_test.jsonl
    python sample.py --init_from=model.pth --benchmark=True --num_samples=64 --max_new_tokens=256

A prompt goes through the parallel form once (prefill); each new token then goes through the one-token recurrent
form with the per-layer state. Several samples of one prompt copy its prefilled state along the batch; different
prompts (--prompts_file) are prefilled one by one, since left padding would leak into a recurrent state, and their
states are stacked into one batch. Row i of the batch draws its random numbers from its own generator seeded
seed + i, so a row's text does not depend on what else is in the batch.
"""
import functools, itertools, json, math, os, sys, time

import torch
import torch.nn.functional as F

from configurator import check, configure, exit_on_config_error
from data.binidx import load_meta
from data.tokenizers import get_tokenizer, is_partial
from model import RWKV, Hybrid, HybridState, capture_cuda_graph

# -----------------------------------------------------------------------------
init_from = ''  # an official-layout .pth (the authors' releases, save_pretrained) or a directory with ckpt.pt
tokenizer = ''  # '' = the checkpoint's own (World for 65536-token .pth files); or world:vocab.txt, tiktoken:gpt2, ...
start = "\n"  # the prompt (\n in it is a newline), or FILE:prompt.txt; in chat mode a non-blank start is a preamble
prompts_file = ''  # one prompt per line (write \n for a newline inside one): all decoded together as one batch
num_samples = 1  # samples per prompt
max_new_tokens = 200  # per sample, and per chat reply
temperature = 1.0  # 0 = greedy
top_p = 0.85  # nucleus sampling; 1.0 = off (the authors' PIPELINE_ARGS default is 0.85)
top_k = 0  # 0 = off
presence_penalty = 0.2  # subtracted from the logit of every token generated so far (the authors' defaults)
frequency_penalty = 0.2  # ... plus this times the token's count; whitespace and digit tokens do not count
penalty_decay = 0.996  # counts decay by this factor per generated token
stop = []  # stop strings, e.g. --stop="['\n\n', 'User:']"; the stop string itself is not printed
seed = 1337  # row i of the batch samples with seed + i
chat = False  # multi-turn chat in the RWKV format "User: ...\n\nAssistant:", one stdin line per turn
eval = ''  # 'lambada': perplexity and accuracy on --eval_file with the authors' recipe
eval_file = ''  # lambada_test.jsonl
eval_batch_size = 32  # documents per forward (documents with equal context length are batched)
benchmark = False  # time prefill (1024 random tokens) and decoding at batch num_samples, no text
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'  # 'float32', 'bfloat16' or 'float16'
compile = False  # torch.compile the model
cuda_graph = False  # replay the one-token decoding step from a CUDA graph (CUDA only; removes launch overhead)
wkv_impl = 'auto'  # 'auto', 'kernel' or 'torch' (model.RWKVConfig.wkv_impl)
# -----------------------------------------------------------------------------
PREFILL_CHUNK = 4096  # prompt tokens per parallel forward: bounds the activation memory of long prompts
timing = dict(prefill_tokens=0, prefill_s=0.0, decode_tokens=0, decode_steps=0, decode_s=0.0)

def load_model(path, dtype=torch.float32, **overrides):
    """-> (model, tokenizer spec or None). `path`: a .pth in the official layout, a directory holding our
    trainer's ckpt.pt (weights under 'model', the run's settings under 'config'), or a hybrid directory."""
    if os.path.isfile(os.path.join(path, 'hybrid.json')):  # Hybrid.save_pretrained (train_distill.py)
        has_tok = any(os.path.isfile(os.path.join(path, f)) for f in ('tokenizer.json', 'tokenizer_config.json'))
        return Hybrid.from_pretrained(path, dtype, **overrides), f'hf:{path}' if has_tok else None
    path = os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: init_from is a .pth file or a directory with ckpt.pt")
    if path.endswith('.pth'):
        model = RWKV.from_pretrained(path, dtype, **overrides)
        return model, 'world' if model.config.vocab_size == 65536 else None
    try:  # a trainer's own file: it also holds RNG states (numpy arrays), so not weights_only
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        raise ValueError(f"{path} is not a loadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict):
        raise ValueError(f"{path} is not a training checkpoint of this repository (no 'model' state dict)")
    config = RWKV.config_from_state_dict(ckpt['model'], **overrides)
    with torch.device('meta'):
        model = RWKV(config)
    model.load_official_state_dict(ckpt['model'], dtype)
    return model, checkpoint_tokenizer(ckpt)

def checkpoint_tokenizer(ckpt):
    """The tokenizer a training checkpoint records: the meta.json of its data_dir, else a 'tokenizer' entry."""
    config = ckpt.get('config') if isinstance(ckpt.get('config'), dict) else {}
    data_dir = config.get('data_dir')
    if isinstance(data_dir, str) and os.path.isfile(os.path.join(data_dir, 'meta.json')):
        return load_meta(data_dir)['tokenizer']  # (resolves a char table's path inside data_dir)
    for d in (ckpt.get('meta'), config):
        if isinstance(d, dict) and isinstance(d.get('tokenizer'), str) and d['tokenizer']:
            return d['tokenizer']
    return None

def encode(tok, text):
    """Token ids, or one clear ValueError naming the first character the tokenizer cannot encode."""
    try:
        return tok.encode(text)
    except Exception:
        for c in text:
            try:
                tok.encode(c)
            except Exception:
                raise ValueError(f"the tokenizer {tok.name} cannot encode the character {c!r} "
                                 f"(U+{ord(c):04X})") from None
        raise

def sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()

# --- state: per layer (att_shift [B, C], wkv [B, H, N, N] fp32, ffn_shift [B, C]); a HybridState for hybrids ----

def map_state(state, fn):
    """fn applied to every tensor of a state (an RWKV model's list of layers, or a HybridState)."""
    if isinstance(state, HybridState):
        return state.map(fn)
    return [tuple(fn(t) for t in layer) for layer in state]

def expand_state(state, n):
    """Each row repeated n times along the batch, as copies: rows [a, b] -> [a]*n + [b]*n."""
    return map_state(state, lambda t: t.repeat_interleave(n, dim=0))

def cat_states(states):
    """The states of separately prefilled prompts (of any lengths) stacked into one batch."""
    if isinstance(states[0], HybridState):
        first, L = states[0], max(s.length for s in states)
        rwkv = {i: tuple(map(torch.cat, zip(*(s.rwkv[i] for s in states)))) for i in first.rwkv}
        if all(s.length == L and s.pad is None for s in states):  # equal lengths: the KV caches just stack
            return HybridState(L, rwkv, {i: tuple(map(torch.cat, zip(*(s.kv[i] for s in states)))) for i in first.kv})
        # unequal lengths: each KV cache (B, H, length, D) is left-padded with empty slots up to L, so that later
        # tokens append at the same slot in every row; pad tells Hybrid.forward which slots each row hides
        kv = {i: tuple(torch.cat([F.pad(t, (0, 0, L - s.length, 0)) for t, s in zip(ts, states)])
                       for ts in zip(*(s.kv[i] for s in states))) for i in first.kv}
        pad = []
        for s in states:
            t = next(t for layer in (*s.rwkv.values(), *s.kv.values()) for t in layer)  # any tensor: rows, device
            own = torch.zeros(t.shape[0], dtype=torch.long, device=t.device) if s.pad is None else s.pad
            pad.append(own + (L - s.length))
        return HybridState(L, rwkv, kv, torch.cat(pad))
    return [tuple(torch.cat(ts) for ts in zip(*layers)) for layers in zip(*states)]

@torch.no_grad()
def prefill(model, ids, state=None):
    """Prompt ids through the parallel form: -> (logits of the last position (1, V) fp32, state)."""
    device, t0 = next(model.parameters()).device, time.perf_counter()
    for i in range(0, len(ids), PREFILL_CHUNK):
        logits, _, state = model(torch.tensor([ids[i:i + PREFILL_CHUNK]], device=device), state=state, last_only=True)
    logits = logits[:, -1].float()
    sync(device)
    timing['prefill_tokens'] += len(ids)
    timing['prefill_s'] += time.perf_counter() - t0
    return logits, state

# --- sampling -------------------------------------------------------------------------------------------------

def sample(logits, gens, temperature=1.0, top_p=1.0, top_k=0):
    """The authors' sampler (PIPELINE.sample_logits in the `rwkv` package), batched: softmax, top-p, top-k,
    p^(1/temperature), draw. Row i inverts its cumulative distribution at a uniform from gens[i] (a CPU
    generator), so a row's draw does not depend on the other rows."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(logits.float(), dim=-1)
    V = probs.shape[-1]
    if top_p < 1:  # keep the tokens at least as likely as the one where the sorted cumulative mass reaches top_p
        sorted_probs = probs.sort(dim=-1, descending=True).values
        n_below = (sorted_probs.cumsum(dim=-1) < top_p).sum(dim=-1, keepdim=True).clamp(max=V - 1)
        probs = probs.masked_fill(probs < sorted_probs.gather(-1, n_below), 0)
    if 0 < top_k < V:
        probs = probs.masked_fill(probs < probs.topk(top_k, dim=-1).values[:, -1:], 0)
    cdf = (probs ** (1 / temperature)).cumsum(dim=-1)
    u = torch.tensor([torch.rand((), generator=g).item() for g in gens], device=cdf.device)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=V - 1)[:, 0]

def state_tensors(state):
    """Every tensor of a recurrent state, in a fixed order (RWKV: per layer; hybrid: per RWKV layer)."""
    if isinstance(state, HybridState):
        return [t for i in sorted(state.rwkv) for t in state.rwkv[i]]
    return [t for layer in state for t in layer]

def graphed_step(model, state):
    """The one-token step captured once as a CUDA graph; the state lives in the graph's buffers. At batch 1 a
    step is a few hundred tiny kernels, so launching them one by one from Python is most of its time. Needs a
    state of fixed size: an RWKV model, or a hybrid without attention layers (a KV cache grows every step)."""
    hybrid = isinstance(state, HybridState)
    if hybrid and (state.kv or not model.fixed_size_state):
        raise ValueError("a CUDA graph needs a fixed-size state: this hybrid has attention layers (a growing KV cache)")
    static = map_state(state, torch.clone)
    buffers = state_tensors(static)
    tokens = torch.zeros(buffers[0].shape[0], dtype=torch.long, device=buffers[0].device)

    def run():
        logits, _, new = model(tokens[:, None], state=static)  # (its token-range check is skipped while capturing)
        for buf, t in zip(buffers, state_tensors(new)):
            buf.copy_(t)
        return logits[:, -1].float()
    graph, logits = capture_cuda_graph(run)
    for buf, t in zip(buffers, state_tensors(state)):  # undo the warm-up's and the capture's steps
        buf.copy_(t)

    def step(new_tokens):
        tokens.copy_(new_tokens)
        graph.replay()
        if hybrid:  # (positions inside the graph stay those of the capture: they only feed attention, and there is none)
            static.length += 1
        return logits, static
    return step

@torch.no_grad()
def generate(model, logits, state, max_new_tokens, gens, temperature=1.0, top_p=1.0, top_k=0,
             presence_penalty=0.0, frequency_penalty=0.0, penalty_decay=0.996, token_weight=None,
             n_valid=None, on_tokens=None, cuda_graph=False, logprobs=None):
    """Decode from a prefilled (logits (B, V), state), one token per row per step through the recurrent form.
    Penalties as in the authors' PIPELINE.generate: a token generated before loses presence + frequency * count;
    counts decay by penalty_decay per step, and a new occurrence adds token_weight(t) (0 for whitespace and
    digit tokens). Ids >= n_valid (ones the tokenizer cannot decode) are never drawn. on_tokens(B ids) returns
    True to stop early. logprobs, a list of B lists, receives each drawn token's log-probability under
    softmax(logits / temperature) (temperature 0: at 1), as GRPO needs. -> (B lists of ids, state after the last
    token)."""
    B, V = logits.shape
    ban = torch.zeros(V, device=logits.device)
    ban[V if n_valid is None else n_valid:] = float('-inf')
    seen = torch.zeros(B, V, dtype=torch.bool, device=logits.device)
    counts = torch.zeros(B, V, device=logits.device)
    rows = torch.arange(B, device=logits.device)
    step = graphed_step(model, state) if cuda_graph else None
    out, t0 = [[] for _ in range(B)], time.perf_counter()
    penalised = presence_penalty != 0 or frequency_penalty != 0  # (else: no per-step work over the vocabulary)
    for _ in range(max_new_tokens):
        logits = logits + ban
        if penalised:
            logits = logits - presence_penalty * seen - frequency_penalty * counts
        tokens = sample(logits, gens, temperature, top_p, top_k)
        ids = tokens.tolist()
        for row, t in zip(out, ids):
            row.append(t)
        if logprobs is not None:
            lp = F.log_softmax(logits.float() / (temperature or 1.0), dim=-1).gather(1, tokens[:, None])[:, 0]
            for row, x in zip(logprobs, lp.tolist()):
                row.append(x)
        if penalised:
            counts.mul_(penalty_decay)
            weights = [1.0 if token_weight is None else token_weight(t) for t in ids]
            counts[rows, tokens] += torch.tensor(weights, device=counts.device)
            seen[rows, tokens] = True
        if step:
            logits, state = step(tokens)
        else:
            logits, _, state = model(tokens[:, None], state=state)
            logits = logits[:, -1].float()
        timing['decode_steps'] += 1
        timing['decode_tokens'] += B
        if on_tokens is not None and on_tokens(ids):
            break
    sync(logits.device)
    timing['decode_s'] += time.perf_counter() - t0
    return out, map_state(state, torch.clone) if step else state  # (the graph's buffers: the next replay overwrites them)

class Stream:
    """One row's text as it is generated: complete UTF-8 characters only (a token can end inside one), cut
    before the first stop string, and holding back a tail that could be the beginning of a stop string."""

    def __init__(self, tok, stops=()):
        self.tok, self.stops, self.ids = tok, [s for s in stops if s], []
        self.text, self.shown, self.waited, self.done = '', 0, 0, False

    def push(self, token):
        """Add a token; -> the text that is now safe to print (often '')."""
        if self.done:
            return ''
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if is_partial(text[self.shown:]) and self.waited < 3:  # a UTF-8 character has at most 4 bytes
            self.waited += 1
            return ''
        self.text, self.waited, end = text, 0, len(text)
        for s in self.stops:
            i = text.find(s, self.shown)
            if i >= 0:
                end, self.done = min(end, i), True
        if not self.done:
            end -= max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        out, self.shown = text[self.shown:end], max(self.shown, end)
        return out

    def flush(self):
        """At the end: the held-back text, unless a stop string ended the row."""
        if self.done:
            return ''
        self.text = self.tok.decode(self.ids)
        out, self.shown, self.done = self.text[self.shown:], len(self.text), True
        return out

    @property
    def reply(self):
        return self.text[:self.shown]

def penalty_weight(tok):
    """The authors' rule: a token decoding to whitespace or digits (' ', '\\t', '0'..'9', '12', ...) adds nothing."""
    return functools.lru_cache(maxsize=None)(lambda t: 0.0 if tok.decode([t]) in ' \t0123456789' else 1.0)

def decodable(tok, vocab_size):
    """How many leading ids the tokenizer decodes; the model's extra ids (World's padding 65530..65535, a vocab
    rounded up to a multiple of 64) are never sampled."""
    n = vocab_size
    while n > 1 and vocab_size - n < 4096:
        try:
            tok.decode([n - 1])
            break
        except Exception:
            n -= 1
    return n

# --- LAMBADA ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def eval_lambada(model, tok, path, batch_size=32):
    """The authors' recipe (RWKV-LM demos): context = [eot] + encode(text minus its last word), target =
    encode(' ' + last word); a document is correct when every target token is the argmax; ppl = exp(-mean over
    documents of the summed target log-probability). Documents with equal context length share a batch: the
    context but its last token goes through the parallel form, then (last context token + target[:-1], right-
    padded, which cannot change earlier positions) continues from that state. -> (ppl, acc, n_docs)."""
    docs = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            if line.strip():
                context, word = json.loads(line)['text'].rsplit(' ', 1)
                eot = [] if tok.eot_id is None else [tok.eot_id]
                docs.append((eot + encode(tok, context), encode(tok, ' ' + word)))
    device, t0 = next(model.parameters()).device, time.perf_counter()
    order = sorted(range(len(docs)), key=lambda i: len(docs[i][0]))
    batches = [list(g) for _, g in itertools.groupby(order, key=lambda i: len(docs[i][0]))]
    logp, correct = [0.0] * len(docs), [False] * len(docs)
    for ks in (g[b:b + batch_size] for g in batches for b in range(0, len(g), batch_size)):
        src = torch.tensor([docs[k][0] for k in ks], device=device)
        state = model(src[:, :-1], last_only=True)[2] if src.shape[1] > 1 else None
        width = max(len(docs[k][1]) for k in ks)
        cont = [docs[k][0][-1:] + docs[k][1][:-1] + [0] * (width - len(docs[k][1])) for k in ks]
        lp = F.log_softmax(model(torch.tensor(cont, device=device), state=state)[0].float(), dim=-1)
        for r, k in enumerate(ks):
            target = torch.tensor(docs[k][1], device=device)
            logp[k] = lp[r, torch.arange(len(target), device=device), target].sum().item()
            correct[k] = bool((lp[r, :len(target)].argmax(dim=-1) == target).all())
    timing['prefill_tokens'] += sum(len(s) + len(d) - 1 for s, d in docs)
    timing['prefill_s'] += time.perf_counter() - t0  # (the .item() calls above synchronize)
    return math.exp(-sum(logp) / len(docs)), sum(correct) / len(docs), len(docs)

# -----------------------------------------------------------------------------
def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

def chat_loop(model, tok, preamble, settings):
    """Multi-turn chat on stdin: "User: <line>\\n\\nAssistant:", each reply ends at "\\n\\n"; /reset, /quit, EOF.
    With a tokenizer that has a chat template (a hybrid of a chat model) the turns are rendered with it instead and
    a reply ends at the end-of-turn token; each turn feeds the state only the text the template adds."""
    template = getattr(getattr(tok, 'tok', None), 'chat_template', None) and tok.tok
    messages, rendered = [], ''
    init = prefill(model, preamble)[1] if preamble else None
    state, clean = init, True
    gens = [torch.Generator().manual_seed(seed)]
    print("chat: one line per turn; /reset starts over, /quit (or end of input) leaves")
    while True:
        print("User: ", end='', flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            print()
            return
        msg = line.strip()
        if not sys.stdin.isatty():  # echo piped input so the transcript reads like a conversation
            print(msg)
        if msg == '/quit':
            return
        if msg == '/reset':
            state, clean = None if init is None else expand_state(init, 1), True
            messages, rendered = [], ''
            gens = [torch.Generator().manual_seed(seed)]
            print("(conversation reset)\n")
            continue
        if not msg:
            continue
        if template:
            messages.append({'role': 'user', 'content': msg})
            text = template.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids, rendered = encode(tok, text[len(rendered):]), text
        else:
            try:
                ids = encode(tok, ('' if clean else '\n\n') + f"User: {msg}\n\nAssistant:")
            except ValueError as e:
                print(f"error: {e}\n")
                continue
        logits, state = prefill(model, ids, state)
        stream = Stream(tok, ([] if template else ['\n\n']) + stop)
        print("Assistant:", end='', flush=True)

        def on_tokens(ids):
            print(stream.flush() if ids[0] in tok.end_ids else stream.push(ids[0]), end='', flush=True)
            return stream.done
        _, state = generate(model, logits, state, max_new_tokens, gens, **settings, on_tokens=on_tokens)
        clean = stream.text[stream.shown:].startswith('\n\n')  # else the next turn begins with it
        reply = stream.text
        print(stream.flush() + '\n')
        if template:  # the state has seen the rendered prompt plus the reply; the end-of-turn text comes next turn
            messages.append({'role': 'assistant', 'content': reply})
            full = template.apply_chat_template(messages, tokenize=False)
            end = full.rfind(reply) if reply else -1
            rendered = full[:end + len(reply)] if end >= 0 else rendered + reply


if __name__ == '__main__':
    with exit_on_config_error():
        configure(globals(), sys.argv[1:])
        check(init_from, "set --init_from=path/to/model.pth (or a directory with ckpt.pt)")
        check(eval in ('', 'lambada'), f"eval must be '' or 'lambada', got {eval!r}")
        check(not eval or os.path.isfile(eval_file), f"--eval=lambada needs --eval_file=lambada_test.jsonl "
                                                    f"({eval_file!r} not found)")
        check(temperature >= 0 and 0 < top_p <= 1 and top_k >= 0, "need temperature >= 0, 0 < top_p <= 1, top_k >= 0")
        check(num_samples >= 1 and max_new_tokens >= 1, "num_samples and max_new_tokens must be >= 1")
        check(dtype in ('float32', 'bfloat16', 'float16'), f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        check(not cuda_graph or device.startswith('cuda'), "cuda_graph=True needs a CUDA device")
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    try:
        model, spec = load_model(init_from, ptdtype, wkv_impl=wkv_impl)
        if not (tokenizer or spec):
            fail(f"{init_from} does not name its tokenizer (vocab {model.config.vocab_size}): set --tokenizer=... "
                 f"(world:vocab.txt, tiktoken:<encoding>, hf:<dir>, char:meta.json)")
        tok = get_tokenizer(tokenizer or spec)
    except ValueError as e:
        fail(e)
    model.eval().to(device)
    with exit_on_config_error():
        check(not cuda_graph or isinstance(model, RWKV) or model.fixed_size_state,
              "cuda_graph=True needs a fixed-size state: an RWKV model or a hybrid without attention layers")
    if compile and cuda_graph:  # the graph replays the model's forward: compile its layers in place,
        model.compile_blocks()  # so it runs fused kernels
    elif compile:
        model = torch.compile(model)
    settings = dict(temperature=temperature, top_p=top_p, top_k=top_k, presence_penalty=presence_penalty,
                    frequency_penalty=frequency_penalty, penalty_decay=penalty_decay, token_weight=penalty_weight(tok),
                    n_valid=decodable(tok, model.config.vocab_size), cuda_graph=cuda_graph)
    try:
        if eval:
            ppl, acc, n = eval_lambada(model, tok, eval_file, eval_batch_size)
            print(f"lambada: ppl {ppl:.4f} acc {acc:.4f} ({n} docs, {n / timing['prefill_s']:.1f} docs/s)")
        elif chat:
            chat_loop(model, tok, encode(tok, start.replace('\\n', '\n')) if start.strip() else [], settings)
        elif benchmark:
            ids = torch.randint(0, settings['n_valid'], (1024,)).tolist()
            for measured in (False, True):  # a short warm-up, then the timed run
                timing.update({k: 0 for k in timing})
                logits, state = prefill(model, ids)
                gens = [torch.Generator().manual_seed(seed + i) for i in range(num_samples)]
                generate(model, logits.expand(num_samples, -1), expand_state(state, num_samples),
                         max_new_tokens if measured else 8, gens, **settings)
            print(f"benchmark: batch {num_samples}, {max_new_tokens} steps, {device} {dtype}, cuda_graph={cuda_graph}")
        else:
            if prompts_file:
                with open(prompts_file, encoding='utf-8') as f:
                    prompts = [line.rstrip('\n').replace('\\n', '\n') for line in f if line.strip()]
            elif start.startswith('FILE:'):
                with open(start[5:], encoding='utf-8') as f:
                    prompts = [f.read()]
            else:
                prompts = [start.replace('\\n', '\n')]
            if not all(prompts):
                fail("empty prompt: set --start=text or --start=FILE:prompt.txt")
            prefilled = [prefill(model, encode(tok, p)) for p in prompts]
            logits = torch.cat([l for l, _ in prefilled]).repeat_interleave(num_samples, dim=0)
            state = expand_state(cat_states([s for _, s in prefilled]), num_samples)
            B = len(prompts) * num_samples
            gens = [torch.Generator().manual_seed(seed + i) for i in range(B)]
            streams = [Stream(tok, stop) for _ in range(B)]

            def on_tokens(ids):
                for s, t in zip(streams, ids):
                    text = s.flush() if t in tok.end_ids else s.push(t)
                    if B == 1:
                        print(text, end='', flush=True)
                return all(s.done for s in streams)
            if B == 1:
                print(prompts[0], end='', flush=True)
            generate(model, logits, state, max_new_tokens, gens, **settings, on_tokens=on_tokens)
            for i, s in enumerate(streams):
                tail = s.flush()
                print(tail if B == 1 else prompts[i // num_samples] + s.reply)
                print('---------------')
    except (ValueError, OSError) as e:
        fail(e)
    t = timing
    print(f"throughput: prefill {t['prefill_tokens']} tokens at {t['prefill_tokens'] / max(t['prefill_s'], 1e-9):.0f} "
          f"tok/s, decode {t['decode_tokens']} tokens at {t['decode_tokens'] / max(t['decode_s'], 1e-9):.0f} tok/s "
          f"({t['decode_steps'] / max(t['decode_s'], 1e-9):.1f} steps/s)")
