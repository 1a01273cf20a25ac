"""
How fast is the default model on this machine?

- training: tokens/s of a full step (forward, backward, AdamW) on a batch of 16 x 256, per precision, and the
  achieved FLOP/s (nanoGPT's estimate: 6N per token plus attention) as a fraction of the matmul peak measured
  here (a large square matmul in the same dtype) -- a CPU "MFU".
- generation: tokens/s sampling 256 new tokens for 32 prompts of 16 tokens, with and without the KV cache.
  16 + 256 does not fit the default block_size of 256, so generation uses the default model with block_size
  512 (only the position table grows; the per-token work is the same).

    python bench.py                       # under a minute on 2 idle CPU cores
    python bench.py --dtypes="('float32',)" --train_iters=20
"""
import time

import torch

from model import GPT, GPTConfig, generate
from runtime import configure, configure_optimizer, setup

# -----------------------------------------------------------------------------
device = "auto"                        # auto: cuda > mps > cpu
dtypes = ("float32", "bfloat16")       # training precisions to measure (low precision via autocast)
batch_size = 16                        # training batch, sequences of block_size tokens
block_size = 256
train_iters = 10                       # timed training steps per precision (after warmup_iters untimed)
warmup_iters = 2
gen_batch = 32                         # prompts per generation batch
gen_prompt_len = 16
gen_new_tokens = 256
gen_dtype = "float32"                  # precision for the generation benchmark
matmul_size = 2048                     # side of the square matmul that measures the peak
seed = 1337
# -----------------------------------------------------------------------------
config = configure(globals())

env = setup(device, "float32", seed)
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync():
    if env.device_type == "cuda":
        torch.cuda.synchronize()


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


def matmul_peak(dtype):
    a = torch.randn(matmul_size, matmul_size, device=env.device, dtype=ptdtype[dtype])
    b = torch.randn(matmul_size, matmul_size, device=env.device, dtype=ptdtype[dtype])
    dt = timed(lambda: a @ b, iters=5, warmup=1)
    return 2 * matmul_size ** 3 / dt  # multiply-add = 2 FLOPs


def train_speed(dtype):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=block_size)
    model = GPT(cfg).to(env.device)
    opt = configure_optimizer(model, 0.1, 3e-4, (0.9, 0.95), env.device_type)
    x = torch.randint(0, cfg.vocab_size, (batch_size, block_size + 1), device=env.device)

    def step():
        with autocast(dtype):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = timed(step, train_iters, warmup_iters)
    # nanoGPT's estimate: 6N per token for the matmuls (2 forward, 4 backward) + 12 * L * T * C for attention
    flops_per_token = 6 * model.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * block_size
    tokens = batch_size * block_size
    return tokens / dt, flops_per_token * tokens / dt


def gen_speed(use_cache):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=512)).to(env.device).eval()
    prompts = torch.randint(0, model.config.vocab_size, (gen_batch, gen_prompt_len)).tolist()
    g = torch.Generator(device=env.device).manual_seed(seed)
    sync()
    t0 = time.perf_counter()
    with autocast(gen_dtype):
        _, _, gen = generate(model, prompts, gen_new_tokens, temperature=1.0, generator=g, use_cache=use_cache)
    sync()
    return gen.sum().item() / (time.perf_counter() - t0)


torch.set_grad_enabled(True)
print(f"device {env.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
c = GPTConfig()
print(f"model: GPTConfig defaults, {c.n_layer} layers, {c.n_head} heads, n_embd {c.n_embd}, vocab {c.vocab_size}, "
      f"{GPT(c).get_num_params() / 1e6:.2f}M params")
print(f"\ntraining, batch {batch_size} x {block_size}, {train_iters} timed steps")
print(f"{'dtype':<10} {'tokens/s':>10} {'GFLOP/s':>9} {'peak GFLOP/s':>13} {'fraction':>9}")
for dtype in dtypes:
    tps, flops = train_speed(dtype)
    peak = matmul_peak(dtype)
    print(f"{dtype:<10} {tps:>10,.0f} {flops / 1e9:>9.1f} {peak / 1e9:>13.1f} {flops / peak:>9.1%}")

print(f"\ngeneration ({gen_dtype}), batch {gen_batch}, prompt {gen_prompt_len}, {gen_new_tokens} new tokens, "
      f"block_size 512")
with_cache, without = gen_speed(True), gen_speed(False)
print(f"{'KV cache':<10} {'tokens/s':>10}")
print(f"{'yes':<10} {with_cache:>10,.0f}\n{'no':<10} {without:>10,.0f}\nspeed-up {with_cache / without:.1f}x")
