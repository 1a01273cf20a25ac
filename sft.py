"""
Stage 1: supervised fine-tuning on demonstrations -> out/sft.pt

InstructGPT step 1: "a labeler demonstrates the desired output behavior". The base model continues documents;
after SFT it answers in the chat template and closes its turn with <|end|>. The loss counts only the
assistant's tokens (data/chat.py's mask): the model learns what to say and when to stop, never to imitate the
user. The demonstrations are imperfect (rude, verbose, sometimes wrong or harmful), so SFT copies their
habits too: it lands near the demonstrators' gold (~0.69 of ideal), which is what stages 2-3 improve on.

    python sft.py                                  # ~2 min on a laptop CPU; builds out/base.pt first if missing
    python sft.py --data=my_chats.jsonl            # your own {"messages": [...]} conversations
    python sft.py --init=path/to/gpt2              # start from GPT-2 weights (Hugging Face layout) instead
    torchrun --nproc_per_node=2 sft.py             # DDP (gloo on CPU, nccl on GPUs)
"""
import dataclasses
import os
import time

import torch
from tqdm import tqdm

import model as M
import runtime
from data import world
from data.chat import render, sft_example
from rollout import score
from data.readers import DataError, read_messages
from data.tokenizer import get_tokenizer

# -----------------------------------------------------------------------------
# config (every name can be overridden with --name=value)
out_dir = "out"            # reads out_dir/base.pt, writes out_dir/sft.pt and out_dir/sft.jsonl
init = ""                  # "" = out_dir/base.pt (made by pretrain.py if missing); or a GPT-2 dir / weights file
data = ""                  # "" = the world's demonstrations; or a JSONL file of {"messages": [...]} per line
seed = 1337                # same seed, same run (on CPU)
device = "auto"            # auto: cuda > mps > cpu
dtype = "auto"             # auto: bf16 on CUDA if supported, else fp16; fp32 on CPU
compile = False            # torch.compile the model (CUDA)
dropout = 0.1              # ~1300 conversations seen ~11 times: a little dropout keeps samples fluent
batch_size = 32            # conversations per micro-batch (per process)
grad_accum = 1             # micro-batches per optimizer step
max_iters = 450            # optimizer steps (~11 passes over the demonstrations; < 2 min on 2 CPU cores)
lr, min_lr = 3e-3, 3e-4    # peak learning rate, cosine-decayed to min_lr (1e-3 left the model unfluent in budget)
warmup_iters = 20
weight_decay = 0.1
beta1, beta2 = 0.9, 0.95
grad_clip = 1.0            # clip the global gradient norm (0 = off)
eval_interval = 50         # held-out loss and checkpoint every this many steps
eval_iters = 20            # at most this many batches of held-out conversations per loss estimate
resume = False             # continue from out_dir/sft.pt (model, optimizer, step, RNG)
stop_at = 0                # end after this step as if killed (0 = max_iters): split a run, or test resume
compare = True             # at the end, sample held-out prompts from base and SFT and grade them
max_new_tokens = 48        # reply length when sampling at the end
temperature = 1.0          # sampling temperature at the end (1.0: the policy as it is, what RL starts from)
# -----------------------------------------------------------------------------
config = runtime.configure(globals())
base_path = os.path.join(out_dir, "base.pt")
ck_path = os.path.join(out_dir, "sft.pt")
log_path = os.path.join(out_dir, "sft.jsonl")
rt = runtime.setup(device, dtype, seed)


def load_base():
    """The model SFT starts from and is compared with: (model, model_args, tokenizer name)."""
    if not init:
        runtime.ensure_checkpoint(base_path, "pretrain.py", out_dir)
        ckpt = runtime.load_checkpoint(base_path, "base")
        return runtime.model_from_checkpoint(ckpt, dropout=dropout), ckpt["model_args"], ckpt.get("tokenizer", "world")
    gpt2 = runtime.load_gpt2(init, dropout=dropout)
    # GPT-2 knows 50257 tokens; our chat markers (<|user|> ...) are new rows of the tied embedding, started at
    # the mean embedding so their first logits are ordinary rather than random
    n_vocab = get_tokenizer("gpt2").n_vocab
    sd = gpt2.state_dict()
    sd.pop("lm_head.weight")  # the same tensor as wte (tied)
    wte = sd.pop("transformer.wte.weight")
    sd["transformer.wte.weight"] = torch.cat([wte, wte.mean(0, keepdim=True).repeat(n_vocab - wte.size(0), 1)])
    args = {**dataclasses.asdict(gpt2.config), "vocab_size": n_vocab}
    return runtime.load_weights(M.GPT(M.GPTConfig(**args)), sd), args, "gpt2"


# ---- data: read first, so a bad file is reported before any model is built
if data:
    try:
        convs = read_messages(data)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    if len(convs) < 2:
        raise SystemExit(f"error: {data} needs at least 2 conversations (one is held out)")
else:
    convs = world.demonstrations()  # train prompts only: world.prompts("eval") stays unseen

# ---- model, optimizer, resume
start = 0
ckpt = runtime.load_checkpoint(ck_path, "sft") if resume else None
if ckpt:
    model, model_args, tokenizer = runtime.model_from_checkpoint(ckpt), ckpt["model_args"], ckpt["tokenizer"]
else:
    model, model_args, tokenizer = load_base()
    model_args = {**model_args, "dropout": dropout}
model.to(rt.device)
enc = get_tokenizer(tokenizer)
eot = enc.eot_token  # <|endoftext|>
block_size = model.config.block_size
optimizer = runtime.configure_optimizer(model, weight_decay, lr, (beta1, beta2), rt.device_type)
if ckpt:
    start = runtime.restore(ckpt, model, optimizer, rt.scaler)
    print(f"resuming from {ck_path} at step {start}")
raw_model = model
model = runtime.wrap(model, rt, compile)

# ---- data, tokenized: (ids, targets) rows; the last 5% of conversations are held out
n_long = sum(len(render(enc, c)[0]) - 1 > block_size for c in convs)
if n_long and rt.master:
    print(f"warning: {n_long} of {len(convs)} conversations are longer than block_size={block_size} tokens "
          "and were cut (their later turns are not learned)")
n_val = max(1, len(convs) // 20)
examples = {"train": [sft_example(enc, c, block_size) for c in convs[:-n_val]],
            "val": [sft_example(enc, c, block_size) for c in convs[-n_val:]]}


def sft_batch(examples, pad_id):
    """[(ids, targets)] -> (ids (B, T), targets (B, T), attention_mask (B, T)), padded on the right; padding
    positions get target -1, so they add nothing to the loss."""
    ids, attn = M.pad_rows([x for x, _ in examples], pad_id)
    targets, _ = M.pad_rows([y for _, y in examples], -1)
    return ids, targets, attn


def get_batch(it, micro):
    """batch_size random training conversations. The generator is seeded by (seed, step, micro-step, rank), so
    a resumed run draws exactly the batches an uninterrupted run would have drawn."""
    key = ((seed * 1_000_003 + it + 1) * 64 + micro) * 1024 + rt.rank
    g = torch.Generator().manual_seed(key % 2**62)
    ix = torch.randint(len(examples["train"]), (batch_size,), generator=g).tolist()
    return [t.to(rt.device) for t in sft_batch([examples["train"][i] for i in ix], eot)]


@torch.no_grad()
def held_out_loss():
    """Mean loss per assistant token over the held-out conversations (the same ones every time)."""
    model.eval()
    total, count = 0.0, 0
    rows = examples["val"]
    for i in range(0, min(len(rows), eval_iters * batch_size), batch_size):
        x, y, attn = [t.to(rt.device) for t in sft_batch(rows[i:i + batch_size], eot)]
        with rt.ctx:
            loss = model(x, y, attention_mask=attn)[1]
        n = (y != -1).sum().item()
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / max(1, count)


def save(step):
    runtime.save_checkpoint(ck_path, {**runtime.training_state(raw_model, optimizer, rt.scaler), "config": config,
                                "model_args": model_args, "kind": "sft", "step": step, "tokenizer": tokenizer})


# ---- training loop
if rt.master and not resume and os.path.exists(log_path):
    os.remove(log_path)  # a fresh run starts a fresh log
if rt.master:
    n_tok = sum(sum(t != -1 for t in y) for _, y in examples["train"])
    print(f"{sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters, {len(examples['train'])} "
          f"training conversations ({n_tok:,} assistant tokens), {len(examples['val'])} held out, "
          f"{batch_size * grad_accum * rt.world_size} conversations per step, device {rt.device}, dtype {rt.dtype}")
t0 = time.time()
model.train()
bar = tqdm(range(start, max_iters), initial=start, total=max_iters, disable=not rt.master, desc="sft")
for it in bar:
    for group in optimizer.param_groups:
        group["lr"] = runtime.get_lr(it, warmup_iters, max_iters, lr, min_lr)
    n_targets = 0
    for micro in range(grad_accum):
        x, y, attn = get_batch(it, micro)
        if rt.ddp:  # all-reduce gradients only on the last micro-step
            model.require_backward_grad_sync = micro == grad_accum - 1
        with rt.ctx:
            # cross-entropy on assistant tokens only (targets -1 elsewhere); 0.0, not NaN, if none are left
            _, loss = model(x, y, attention_mask=attn)
        rt.scaler.scale(loss / grad_accum).backward()
        n_targets += (y != -1).sum().item()
    runtime.optimizer_step(model, optimizer, rt.scaler, grad_clip)
    if rt.ddp:  # the log counts the assistant tokens of every process
        n_targets = torch.tensor(n_targets, device=rt.device)
        torch.distributed.all_reduce(n_targets)
        n_targets = n_targets.item()
    last = it + 1 in (max_iters, stop_at)
    val = held_out_loss() if (it + 1) % eval_interval == 0 or last else None
    if rt.master:
        bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val:.3f}" if val is not None else "-")
        runtime.append_jsonl(log_path, {"iter": it + 1, "loss": loss.item(), "val_loss": val,
                                  "lr": optimizer.param_groups[0]["lr"], "targets": n_targets,
                                  "time": time.time() - t0})
        if val is not None:
            save(it + 1)
    if it + 1 == stop_at:
        break
if rt.master and start >= max_iters:
    print(f"{ck_path} is already at step {start} >= max_iters={max_iters}; nothing to train")

# ---- before and after: the base model and the SFT model answer the same held-out prompts
if rt.master and compare:
    raw_model.eval()
    base = load_base()[0].to(rt.device).eval()
    g = torch.Generator(device=rt.device).manual_seed(seed)
    # held-out prompts: the world's eval prompts, or the held-out conversations without their last reply
    prompts = world.prompts("eval") if not data else \
        [c[:-1] for c in convs[-n_val:] if len(c) > 1 and c[-2]["role"] == "user" and c[-1]["role"] == "assistant"]
    prompts = [p for p in prompts if len(render(enc, p)[0]) < block_size]
    with rt.ctx:
        res = {name: score(m, enc, prompts, max_new_tokens, temperature, generator=g)
               for name, m in (("base", base), ("sft", raw_model))}
    print(f"\nheld-out prompts, one sample each (temperature {temperature}):")
    for i, p in enumerate(prompts[:3]):
        print("  " + " / ".join(m["content"] for m in p))  # earlier turns too, for follow-ups
        for name in ("base", "sft"):
            print(f"    {name:>4}: {res[name]['samples'][i]['text'].strip()[:160]!r}")
    if not data:  # gold() grades the world's language only
        for name in ("base", "sft"):
            r = res[name]
            print(f"{name:>4}: mean gold {r['gold']:.3f} of ideal 1.0, ends its turn {r['ended']:.0%}, "
                  f"fluency {r['fluency']:.0%} ({r['n']} prompts)")
        demo = sum(world.gold(c[:-1], c[-1]["content"]) for c in convs) / len(convs)
        print(f"demonstrations: mean gold {demo:.3f} (SFT imitates them; reward.py + ppo.py/dpo.py aim higher)")
runtime.cleanup()
