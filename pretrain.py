"""
Stage 0: next-token pretraining on the world corpus -> out/base.pt

The base model learns the world's language and facts from stories, descriptions, dialogues and lists of
instructions. It is a document continuer, not an assistant: given "Describe the fox." it tends to write more
instructions, like GPT-3 in the InstructGPT paper. SFT (sft.py) is what teaches it to answer.

    python pretrain.py                                  # ~2-3 min on a laptop CPU
    python pretrain.py --max_iters=2000 --n_layer=6     # any config name below can be overridden
    torchrun --nproc_per_node=2 pretrain.py             # DDP (gloo on CPU, nccl on GPUs)
    python pretrain.py --data=my_corpus.txt             # your own text (documents separated by blank lines)
"""
import os
import time

import torch
from tqdm import tqdm

import model as M
import runtime
from data import world
from data.tokenizer import get_tokenizer

# -----------------------------------------------------------------------------
# config (every name can be overridden with --name=value)
out_dir = "out"            # checkpoints and metrics go here
data = ""                  # "" = the world corpus; or a UTF-8 text file, documents separated by blank lines
tokenizer = "world"        # "world" (trained here) or "gpt2" (needs tiktoken's cached files)
seed = 1337                # same seed, same run (on CPU)
device = "auto"            # auto: cuda > mps > cpu
dtype = "auto"             # auto: bf16 on CUDA if supported, else fp16; fp32 on CPU
compile = False            # torch.compile the model (CUDA)
n_layer, n_head, n_embd = 4, 4, 128
block_size = 256           # context length; also the length of each training sequence
dropout = 0.0              # the corpus is tiny but the model is too: no dropout needed
batch_size = 16            # sequences per micro-batch (per process)
grad_accum = 1             # micro-batches per optimizer step
max_iters = 500            # optimizer steps
lr, min_lr = 3e-3, 3e-4    # peak learning rate, cosine-decayed to min_lr
warmup_iters = 50
weight_decay = 0.1
beta1, beta2 = 0.9, 0.95
grad_clip = 1.0            # clip the global gradient norm (0 = off)
eval_interval = 100        # held-out loss and checkpoint every this many steps
eval_iters = 10            # batches per held-out loss estimate
resume = False             # continue from out_dir/base.pt (model, optimizer, step, RNG)
stop_at = 0                # end after this step as if killed (0 = max_iters): split a run, or test resume
n_samples = 64             # eval instructions completed at the end to show the base model does not answer
# -----------------------------------------------------------------------------
config = runtime.configure(globals())
ck_path = os.path.join(out_dir, "base.pt")
log_path = os.path.join(out_dir, "pretrain.jsonl")
rt = runtime.setup(device, dtype, seed)
enc = get_tokenizer(tokenizer)
eot = enc.eot_token  # <|endoftext|>

# ---- data: every document starts with <|endoftext|>; the last 5% of documents are held out
if data:
    if not os.path.isfile(data):
        raise SystemExit(f"error: --data file {data} not found")
    try:
        docs = [d.strip() for d in open(data, encoding="utf-8").read().split("\n\n") if d.strip()]
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {data} is not UTF-8 ({e.reason} at byte {e.start})")
    if len(docs) < 2:
        raise SystemExit(f"error: {data} needs at least 2 documents separated by a blank line")
else:
    docs = world.corpus_documents()
n_val = max(1, len(docs) // 20)
streams = {}
for split, part in (("train", docs[:-n_val]), ("val", docs[-n_val:])):
    ids = []
    for d in part:
        ids += [eot] + enc.encode_ordinary(d)
    streams[split] = torch.tensor(ids, dtype=torch.long)
if len(streams["val"]) <= block_size:
    raise SystemExit(f"error: the held-out text has {len(streams['val'])} tokens; need more than block_size={block_size}")


def get_batch(split, it, micro):
    """Random windows of the token stream. The generator is seeded by (seed, step, micro-step, rank), so a
    resumed run draws exactly the batches an uninterrupted run would have drawn."""
    key = (((seed * 1_000_003 + it + 1) * 64 + micro) * 1024 + rt.rank) * 2 + (split == "val")
    g = torch.Generator().manual_seed(key % 2**62)
    s = streams[split]
    ix = torch.randint(len(s) - block_size - 1, (batch_size,), generator=g)
    x = torch.stack([s[i:i + block_size] for i in ix])
    y = torch.stack([s[i + 1:i + 1 + block_size] for i in ix])
    return x.to(rt.device), y.to(rt.device)


# ---- model, optimizer, resume
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, dropout=dropout,
                  vocab_size=enc.n_vocab)
start = 0
ckpt = runtime.load_checkpoint(ck_path, "base") if resume else None
if ckpt:
    model_args = ckpt["model_args"]
model = M.GPT(M.GPTConfig(**model_args)).to(rt.device)
optimizer = runtime.configure_optimizer(model, weight_decay, lr, (beta1, beta2), rt.device_type)
if ckpt:
    start = runtime.restore(ckpt, model, optimizer, rt.scaler)
    print(f"resuming from {ck_path} at step {start}")
raw_model = model
model = runtime.wrap(model, rt, compile)


@torch.no_grad()
def held_out_loss():
    model.eval()
    losses = []
    for k in range(eval_iters):
        x, y = get_batch("val", -1, k)  # the same held-out batches every time
        with rt.ctx:
            losses.append(model(x, y)[1].item())
    model.train()
    return sum(losses) / len(losses)


def save(step):
    runtime.save_checkpoint(ck_path, {**runtime.training_state(raw_model, optimizer, rt.scaler), "config": config,
                                "model_args": model_args, "kind": "base", "step": step, "tokenizer": tokenizer})


# ---- training loop
if rt.master and not resume and os.path.exists(log_path):
    os.remove(log_path)  # a fresh run starts a fresh log
tokens_per_step = batch_size * block_size * grad_accum * rt.world_size
if rt.master:
    print(f"{sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters, {len(streams['train']):,} "
          f"training tokens, {tokens_per_step:,} tokens per step, device {rt.device}, dtype {rt.dtype}")
t0 = time.time()
bar = tqdm(range(start, max_iters), initial=start, total=max_iters, disable=not rt.master, desc="pretrain")
for it in bar:
    for group in optimizer.param_groups:
        group["lr"] = runtime.get_lr(it, warmup_iters, max_iters, lr, min_lr)
    for micro in range(grad_accum):
        x, y = get_batch("train", it, micro)
        if rt.ddp:  # all-reduce gradients only on the last micro-step
            model.require_backward_grad_sync = micro == grad_accum - 1
        with rt.ctx:
            _, loss = model(x, y)
        rt.scaler.scale(loss / grad_accum).backward()
    runtime.optimizer_step(model, optimizer, rt.scaler, grad_clip)
    last = it + 1 in (max_iters, stop_at)
    val = held_out_loss() if (it + 1) % eval_interval == 0 or last else None
    if rt.master:
        bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val:.3f}" if val is not None else "-")
        runtime.append_jsonl(log_path, {"iter": it + 1, "loss": loss.item(), "val_loss": val, "lr": optimizer.param_groups[0]["lr"],
                                  "tokens": (it + 1) * tokens_per_step, "time": time.time() - t0})
        if val is not None:
            save(it + 1)
    if it + 1 == stop_at:
        break
if rt.master and start >= max_iters:
    print(f"{ck_path} is already at step {start} >= max_iters={max_iters}; nothing to train")

# ---- samples: free text, and eval instructions as plain text (the base model continues the document)
if rt.master and tokenizer == "world" and not data and n_samples > 0:
    raw_model.eval()
    g = torch.Generator(device=rt.device).manual_seed(seed)
    stops = (eot,)
    seq, _, gen = M.generate(raw_model, [[eot]] * 32, 64, stop_ids=stops, pad_id=eot, generator=g)
    texts = [enc.decode([t for t, m in zip(r, k) if m and t != eot]) for r, k in zip(seq.tolist(), gen.tolist())]
    sents = [s for t in texts for s in world.sentences(t)]
    fluent = sum(world.sentence_type(s) is not None for s in sents) / max(1, len(sents))
    print(f"\nfree text ({fluent:.1%} of {len(sents)} generated sentences pass the fluency check):")
    for t in texts[:3]:
        print("  " + t.replace("\n", "\n  ") + "\n  ---")
    evals = [p for p in world.prompts("eval") if len(p) == 1][:n_samples]
    prompts = [[eot] + enc.encode_ordinary(p[0]["content"] + "\n") for p in evals]
    seq, _, gen = M.generate(raw_model, prompts, 48, stop_ids=stops, pad_id=eot, generator=g)
    outs = [enc.decode([t for t, m in zip(r, k) if m and t != eot]) for r, k in zip(seq.tolist(), gen.tolist())]
    answered = [world.gold_components(p, o)["helpful"] > 0 for p, o in zip(evals, outs)]
    golds = [world.gold(p, o, ended=False) for p, o in zip(evals, outs)]
    print(f"eval instructions: the base model does not answer {1 - sum(answered) / len(evals):.0%} of {len(evals)} "
          f"(it writes more instructions or other text); mean gold {sum(golds) / len(golds):.3f} of ideal 1.0")
    for p, o in list(zip(evals, outs))[:3]:
        print(f"  {p[0]['content']}\n  -> {o.strip()[:160]!r}")
runtime.cleanup()
