"""
How fast is the default model on this machine?

- training: tokens/s of a full step (forward, backward, AdamW) on a batch of 16 x 256, per precision, and the
  achieved FLOP/s (nanoGPT's estimate: 6N per token plus attention) as a fraction of the matmul peak measured
  here (a large square matmul in the same dtype) -- a CPU "MFU". A CPU without bf16 matmul units emulates
  bf16, well below its fp32 speed; the bench says so instead of showing a fraction of that emulated "peak".
- sampling, the step RL adds to training: tokens/s of model.generate with the KV cache as the RL stages call
  it (left-padded prompts of 7 to 36 tokens, 32 new tokens, random weights, the world tokenizer's vocabulary)
  at batch 128 and the other batch sizes the stages use, against generate_plain below, the earlier
  implementation kept as the reference. The prompts are distinct unless --gen_copies asks for several
  samples of each (reward.py's K, best-of-16), whose copies share generate's one pass through the prompt.
  The two take turns (new, plain, new, plain, ...) so that a machine busy with other work slows both alike;
  the table shows medians and the median of the per-turn ratios.
  FLOP/s counts the forward passes generate makes: every real token of the result (prompt and reply; a
  prompt its copies share, once) but the last once through the network, the logits only where a token is
  sampled from them.
- where a stage's time goes is not measured here: every stage ends with a line splitting its own run into
  sampling, scoring, the hidden human, training and the rest (runtime.Stopwatch).

    python bench.py                       # training per precision, then sampling
    python bench.py --threads=1           # steadier on a machine shared with other jobs
    python bench.py --dtypes="('float32',)" --train_iters=3 --gen_batches="(128,)"
    python bench.py --n_layer=12 --n_head=12 --n_embd=768 --vocab_size=50304 --block_size=1024 \
        --dtypes="('bfloat16',)" --gen_dtype=bfloat16 --matmul_size=8192 --compile=True   # GPT-2 small, GPU
"""
import os
import statistics
import time

import torch
from torch.nn import functional as F

from data.tokenizer import get_tokenizer
from model import GPT, GPTConfig, generate, token_logprobs
from runtime import configure, configure_optimizer, matmul_flops, run, setup

# -----------------------------------------------------------------------------
# config (every name can be overridden with --name=value)
device = "auto"                        # auto: cuda > mps > cpu
threads = 0                            # torch.set_num_threads when > 0 (0: torch's default, one per core):
                                       # on a machine shared with other jobs, threads wait on each other
dtypes = ("float32", "bfloat16")       # training precisions to measure (low precision via autocast):
                                       # fp32, what the stages run in on a CPU, and bf16, what they pick on
                                       # a GPU that has it (fp16, their fallback, on request)
batch_size = 16                        # training batch, sequences of block_size tokens: pretrain.py's
                                       # batch and context, so a row reads as that stage's step
block_size = 256                       # training sequence length, the stages' context
n_layer, n_head, n_embd = GPTConfig.n_layer, GPTConfig.n_head, GPTConfig.n_embd  # the stages' model dims
vocab_size = 0                         # 0: the world tokenizer's, as the stages train with
compile = False                        # torch.compile the training step, and the blocks when sampling
train_iters = 10                       # timed training steps per precision (after warmup_iters untimed)
warmup_iters = 2                       # untimed steps first: allocation, kernel set-up, compilation
gen_batches = (128, 64, 256)           # sampling batch sizes: ppo.py's rollout batch first, reward.py's 256
gen_prompt_lens = (7, 36)              # shortest, longest prompt, lengths drawn uniformly: the world's
                                       # held-out chat prompts' range (its training prompts reach 38)
gen_new_tokens = 32                    # tokens sampled per prompt (no stop token: every row runs them all)
gen_copies = 1                         # samples per prompt in a batch: 1 as in ppo.py's rollouts, 4 as
                                       # reward.py's K, 16 as evaluate.py's best-of-16
gen_repeats = 5                        # timed (new, plain) turns per batch size, after one untimed turn
gen_dtype = "float32"                  # precision for the sampling benchmark: what the stages sample in on
                                       # a CPU (a GPU's autocast is bf16: pass --gen_dtype=bfloat16 there)
matmul_size = 2048                     # side of the square matmul that measures the peak: big enough that
                                       # the arithmetic, not the call, sets the time, yet brief on a laptop;
                                       # a GPU needs a larger one to reach its peak (8192 above)
seed = 1337                            # the same weights and prompts on every run
# -----------------------------------------------------------------------------
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync():  # a GPU runs ahead of Python: stop the clock once its queued work is done (CPU: no-op)
    getattr(torch, env.device_type).synchronize()


def autocast(dtype):  # fp32 runs as is; lower precisions autocast the matmuls, as the stages do
    return torch.autocast(env.device_type, dtype=ptdtype[dtype], enabled=(dtype != "float32"))


def timed(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def label(dtype):
    """dtype as the tables name it: on CUDA, runtime.setup lets float32 matmuls run as TF32 (Ampere on), so
    that row, and its peak, are TF32's, not full fp32's."""
    fast_fp32 = torch.get_float32_matmul_precision() != "highest"  # what allow_tf32 = True sets
    tf32 = (dtype == "float32" and env.device_type == "cuda" and fast_fp32
            and torch.cuda.get_device_capability()[0] >= 8)
    return "float32 (TF32)" if tf32 else dtype


def dims(**kw):
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size, **kw)


def train_speed(dtype):
    torch.manual_seed(seed)
    cfg = dims(block_size=block_size)
    model = GPT(cfg).to(env.device)
    opt = configure_optimizer(model, 0.1, 3e-4, (0.9, 0.95), env.device_type)
    step_model = torch.compile(model) if compile else model  # the first (warm-up) steps compile
    x = torch.randint(0, cfg.vocab_size, (batch_size, block_size + 1), device=env.device)

    def step():
        with autocast(dtype):
            _, loss = step_model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = timed(step, train_iters, warmup_iters)
    # nanoGPT's estimate: 6N per token for the matmuls (2 forward, 4 backward) + 12 * L * T * C for attention
    flops_per_token = 6 * model.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * block_size
    tokens = batch_size * block_size
    return tokens / dt, flops_per_token * tokens / dt


@torch.no_grad()
def generate_plain(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_ids=(),
                   pad_id=0, generator=None, return_logprobs=False):
    """model.generate as it was, the reference: one loop in which every step goes through model.hidden (which
    rebuilds the (B, 1, T, Tk) mask and the positions from the whole attention mask), samples with
    multinomial, and runs every row until all have stopped. Its one change: the cache's size is given
    as (rows, length), which the attention layer now expects."""
    model = getattr(model, "module", model)
    device, block_size = model.lm_head.weight.device, model.config.block_size
    B, P = len(prompts), max(len(p) for p in prompts)
    L = P + min(max_new_tokens, block_size - P)
    seq = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros(B, L, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        seq[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p):P] = 1
    gen = torch.zeros_like(attn)
    logprobs = torch.zeros(B, L, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    cache = [{"size": (B, L)} for _ in model.transformer.h]
    was_training = model.training
    model.eval()
    for t in range(P, L):
        # with the cache only the new token goes through the network (the whole prompt on the first step)
        start = t - 1 if t > P else 0
        h = model.hidden(seq[:, start:t], attn[:, :t], kv_cache=cache)[:, -1]  # (B, C)
        logits = model.lm_head(h).float()                                        # (B, V)
        if temperature == 0:
            tok = logits.argmax(-1)
        else:
            logits_t = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits_t, min(top_k, logits_t.size(-1))).values[:, -1:]
                logits_t = logits_t.masked_fill(logits_t < kth, float("-inf"))
            if top_p is not None:  # nucleus: keep the smallest set of top tokens whose mass reaches top_p
                sorted_l, order = torch.sort(logits_t, descending=True)
                probs = F.softmax(sorted_l, dim=-1)
                drop = probs.cumsum(-1) - probs >= top_p  # the mass before a token already reaches top_p
                drop[:, 0] = False  # the most likely token always stays
                logits_t = logits_t.scatter(-1, order, sorted_l.masked_fill(drop, float("-inf")))
            tok = torch.multinomial(F.softmax(logits_t, dim=-1), 1, generator=generator).squeeze(-1)
        lp = token_logprobs(logits, tok, temperature if temperature > 0 else 1.0)
        alive = ~done
        seq[:, t] = torch.where(alive, tok, pad_id)
        attn[:, t], gen[:, t] = alive.long(), alive.long()
        logprobs[:, t] = torch.where(alive, lp, 0.0)
        done = done | (alive & torch.isin(tok, stop))
        if done.all():
            L = t + 1
            break
    model.train(was_training)
    out = (seq[:, :L], attn[:, :L], gen[:, :L])
    return out + (logprobs[:, :L],) if return_logprobs else out


def forward_flops(n_params, head_params, n_layer, n_embd, attn_mask, gen_mask, shared=None):
    """Forward FLOPs generate does for the real tokens of its result (B, T), counted as nanoGPT counts them:
    every real token but the last (sampled, never fed back) goes once through the trunk, 2 (N - head) per
    token for its matmuls plus 4 * n_layer * n_embd per (query, key) pair it attends to (q.k and the sum of
    v); the head's logits (2 * head per row) are computed only where a token is sampled from them, once per
    generated token (the prompt's other positions need none). shared (B,): the prompt tokens a row reads
    from an earlier copy's pass (shared_prompt_tokens), which neither they nor the first logits run again."""
    fed = attn_mask.sum(1).double() - 1  # (B,) tokens through the trunk; the i-th attends to i keys
    skip = torch.zeros_like(fed) if shared is None else torch.tensor(shared, dtype=torch.float64)
    sampled = gen_mask.sum().double() - (skip > 0).sum()  # logits computed: one set per generated token
    return float(2 * (n_params - head_params) * (fed - skip).sum() + 2 * head_params * sampled
                 + 4 * n_layer * n_embd * (fed * (fed + 1) / 2 - skip * (skip + 1) / 2).sum())


def shared_prompt_tokens(prompts):
    """Per row, the prompt tokens generate does not run again: all of a prompt that an earlier row holds
    too (its copy reads that row's pass), none of a prompt's first row."""
    seen, out = set(), []
    for p in map(tuple, prompts):
        out.append(len(p) if p in seen else 0)
        seen.add(p)
    return out


def sampling_speed(fn, model, prompts):
    """One timed call of fn (generate or generate_plain) -> (generated tokens/s, forward FLOP/s)."""
    g = torch.Generator(device=env.device).manual_seed(seed)
    sync()
    t0 = time.perf_counter()
    with autocast(gen_dtype):
        _, attn, gen = fn(model, prompts, gen_new_tokens, temperature=1.0, generator=g)
    sync()
    dt = time.perf_counter() - t0
    cfg = model.config
    flops = forward_flops(model.get_num_params(), model.lm_head.weight.numel(), cfg.n_layer, cfg.n_embd, attn,
                          gen, shared_prompt_tokens(prompts) if fn is generate else None)  # plain: every row
    return gen.sum().item() / dt, flops / dt


def sampling_table(model, peak):
    """Per batch size, yielded as soon as it is timed (a default run spends minutes here, so each row is
    shown as it comes): (batch, generate tok/s, plain tok/s, median ratio, generate FLOP/s, its fraction
    of peak)."""
    for b in gen_batches:
        g = torch.Generator().manual_seed(seed + b)
        distinct = -(-b // gen_copies)  # prompts, each gen_copies times in a row (the last may be cut)
        lens = torch.randint(gen_prompt_lens[0], gen_prompt_lens[1] + 1, (distinct,), generator=g).tolist()
        prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lens]
        prompts = [p for p in prompts for _ in range(gen_copies)][:b]
        sampling_speed(generate, model, prompts), sampling_speed(generate_plain, model, prompts)  # warm up
        new, plain = [], []
        for _ in range(gen_repeats):  # in turns, so a busy spell of the machine slows both
            new.append(sampling_speed(generate, model, prompts))
            plain.append(sampling_speed(generate_plain, model, prompts))
        ratio = statistics.median(a[0] / p[0] for a, p in zip(new, plain))
        flops = statistics.median(a[1] for a in new)
        yield (b, statistics.median(a[0] for a in new), statistics.median(p[0] for p in plain), ratio, flops,
               None if peak is None else flops / peak)


def out_of_memory(e):
    """Whether e is torch failing to allocate: OutOfMemoryError on a GPU, the CPU allocator's RuntimeError
    (Linux, Windows) or MPS's. Any other RuntimeError is a bug to show in full."""
    return isinstance(e, torch.OutOfMemoryError) or any(s in str(e) for s in (
        "DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory",
        "MPS backend out of memory"))


def main():
    global env, vocab_size
    cores = os.cpu_count() or 1
    # configure checks that a tuple option is a tuple; each element's type and range is checked here, so
    # that a bad one stops the bench at once rather than after the training benchmark has run
    configure(globals(), ranges={
        # more threads than cores only makes them wait on each other; far more crashes torch (segfault)
        "threads": (lambda v: 0 <= v <= cores, f"between 0 and {cores}, this machine's cores"),
        "dtypes": (lambda v: len(v) > 0 and all(d in ("float32", "bfloat16", "float16") for d in v),
                   "a non-empty tuple of float32, bfloat16, float16"),
        "gen_dtype": (lambda v: v in ("float32", "bfloat16", "float16"), "one of float32, bfloat16, float16"),
        **dict.fromkeys(("block_size", "n_layer", "n_head", "n_embd", "train_iters", "gen_new_tokens",
                         "gen_repeats", "gen_copies"), (lambda v: v >= 1, ">= 1")),
        "matmul_size": (lambda v: v >= 256, ">= 256: a smaller product is too brief to measure a peak"),
        "vocab_size": (lambda v: v >= 0, ">= 0 (0: the world tokenizer's)"),
        "gen_batches": (lambda v: len(v) > 0 and all(type(b) is int and b >= 1 for b in v), "ints >= 1"),
        "gen_prompt_lens": (lambda v: len(v) == 2 and all(type(n) is int for n in v) and 1 <= v[0] <= v[1],
                            "(shortest, longest), ints with 1 <= shortest <= longest"),
    })
    if n_embd % n_head:
        raise SystemExit(f"error: n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
    # generate clips the reply to the room the context leaves: every row must get all gen_new_tokens, or
    # the table would time shorter replies than its header says
    room = max(block_size, GPTConfig.block_size)  # the sampling model's context (see c below)
    if gen_prompt_lens[1] + gen_new_tokens > room:
        raise SystemExit(f"error: --gen_prompt_lens={gen_prompt_lens!r} is out of range with "
                         f"--gen_new_tokens={gen_new_tokens}: the longest prompt plus the new tokens must be "
                         f"<= {room}, the sampling model's block_size")

    env = setup(device, "float32", seed)
    if threads > 0:
        torch.set_num_threads(threads)
    vocab_size = vocab_size or get_tokenizer().n_vocab
    try:
        benchmark()
    except RuntimeError as e:  # dims too large for this machine: one line, not the allocator's traceback
        if not out_of_memory(e):
            raise
        raise SystemExit(f"error: out of memory on {env.device} with --n_layer={n_layer} --n_head={n_head} "
                         f"--n_embd={n_embd} --vocab_size={vocab_size} --batch_size={batch_size} "
                         f"--block_size={block_size} --gen_batches={gen_batches!r} "
                         f"--matmul_size={matmul_size}: lower them") from None


def benchmark():
    """The bench proper, its options checked: the training table per precision, then the sampling table."""
    torch.set_grad_enabled(True)
    c = dims(block_size=max(block_size, GPTConfig.block_size))
    n_params = GPT(c).get_num_params()  # built before anything is printed: dims too large stop here
    cpu = f", CPU capability {torch.backends.cpu.get_cpu_capability()}" if env.device_type == "cpu" else ""
    print(f"device {env.device}{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model: {c.n_layer} layers, {c.n_head} heads, n_embd {c.n_embd}, vocab {c.vocab_size}, "
          f"{n_params / 1e6:.2f}M params{', torch.compile' if compile else ''}")
    peaks = {d: matmul_flops(ptdtype[d], env.device, matmul_size, iters=5, min_seconds=0.5)  # real speed here
             for d in dict.fromkeys(("float32", *dtypes, gen_dtype))}
    # a CPU without bf16/fp16 matmul units emulates them well below its fp32 speed (the rule runtime.setup
    # warns by): that is no peak to compare with
    emulated = [d for d in peaks
                if d != "float32" and env.device_type == "cpu" and 2 * peaks[d] < peaks["float32"]]
    print(f"\ntraining, batch {batch_size} x {block_size}, {train_iters} timed steps")
    print(f"{'dtype':<14} {'tokens/s':>10} {'GFLOP/s':>9} {'peak GFLOP/s':>13} {'fraction':>9}")
    for dtype in dtypes:
        tps, flops = train_speed(dtype)
        peak = "n/a" if dtype in emulated else f"{peaks[dtype] / 1e9:.1f}"
        fraction = "n/a" if dtype in emulated else f"{flops / peaks[dtype]:.1%}"
        print(f"{label(dtype):<14} {tps:>10,.0f} {flops / 1e9:>9.1f} {peak:>13} {fraction:>9}", flush=True)
    for d in emulated:
        print(f"{d}: this CPU has no {d} matmul units ({d} matmul {peaks[d] / 1e9:.1f} GFLOP/s, under half "
              f"of fp32's {peaks['float32'] / 1e9:.1f}): {d} is emulated, there is no {d} peak to take a "
              "fraction of")

    torch.manual_seed(seed)
    model = GPT(c).to(env.device).eval()
    for blk in model.transformer.h if compile else ():  # the batch and the keys change size: dynamic shapes
        blk.compile(dynamic=True)
    # the sampling model has the stages' context (or --block_size if longer): the header says so, since the
    # training rows above use --block_size itself
    print(f"\nsampling ({label(gen_dtype)}, KV cache, context {c.block_size} = max(--block_size, "
          f"{GPTConfig.block_size})): prompts of {gen_prompt_lens[0]}-{gen_prompt_lens[1]} tokens, "
          f"left-padded, {gen_new_tokens} new tokens each, "
          + f"{gen_copies} samples per prompt, " * (gen_copies > 1)
          + f"random weights; medians of {gen_repeats} turns")
    print(f"{'batch':>5} {'generate tok/s':>15} {'plain tok/s':>12} {'speed-up':>9} {'GFLOP/s':>8} "
          f"{'of peak':>8}")
    gen_peak = None if gen_dtype in emulated else peaks[gen_dtype]
    for b, new, plain, ratio, flops, fraction in sampling_table(model, gen_peak):  # each row once timed
        fraction = "n/a" if fraction is None else f"{fraction:.1%}"
        print(f"{b:>5} {new:>15,.0f} {plain:>12,.0f} {ratio:>8.2f}x {flops / 1e9:>8.1f} {fraction:>8}",
              flush=True)  # piped to a file or tee, a row would otherwise wait in the buffer until the end


if __name__ == "__main__":
    run(main)
