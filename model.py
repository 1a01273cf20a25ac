"""
The network and everything needed to run it, shared by every stage.

1. GPT: a small GPT-2 (pre-LN transformer, tied embeddings) with an optional scalar head that turns it
   into a reward model or gives PPO a value head on the same trunk.
2. generate(): batched sampling from left-padded prompts with a KV cache; per-token log-probs.
3. setup(): device, precision and DDP, nanoGPT style; AdamW; learning-rate schedule.
4. Checkpoints (atomic save, checked load), RNG state, --key=value overrides, GPT-2 weight import.
"""
import ast
import json
import math
import os
import random
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# The network

@dataclass
class GPTConfig:
    block_size: int = 256       # longest sequence the position table covers
    vocab_size: int = 1024
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True           # biases in Linear and LayerNorm, as in GPT-2
    scalar_head: bool = False   # add a Linear(n_embd, 1) head: reward model / value head

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head, self.dropout = cfg.n_head, cfg.dropout

    def forward(self, x, mask=None, cache=None):
        # mask: None (plain causal) or bool (B, 1, T, Tk), True where a query may look at a key
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            # cache is this layer's dict; the first call (the prompt) allocates room for the whole sequence,
            # later calls write their T new keys/values after the Tk - T already stored
            if "k" not in cache:
                cache["k"] = k.new_zeros(B, self.n_head, cache["len"], C // self.n_head)
                cache["v"] = torch.zeros_like(cache["k"])
            end = mask.size(-1)
            cache["k"][:, :, end - T:end], cache["v"][:, :, end - T:end] = k, v
            k, v = cache["k"][:, :, :end], cache["v"][:, :, :end]  # (B, nh, Tk, hs)
        p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # fast path
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))

class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's tanh GELU

class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), mask, cache)  # pre-LN: the residual stream is never normalised
        return x + self.mlp(self.ln_2(x))

def padding_attn_mask(attention_mask, T):
    """(B, Tk) 1/0 key mask -> bool (B, 1, T, Tk) for the last T queries: causal AND key is a real token."""
    Tk = attention_mask.size(1)
    q = torch.arange(Tk - T, Tk, device=attention_mask.device)[:, None]  # absolute query positions (T, 1)
    k = torch.arange(Tk, device=attention_mask.device)[None, :]          # (1, Tk)
    allowed = (k <= q) & attention_mask.bool()[:, None, :]               # (B, T, Tk)
    # a padding query would see no key at all and softmax would give NaN; let every query see itself
    return (allowed | (k == q))[:, None]

class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one matrix reads and writes tokens
        self.scalar_head = nn.Linear(cfg.n_embd, 1) if cfg.scalar_head else None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: keep the residual stream's variance flat in depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if self.scalar_head is not None:  # zero head: a fresh reward model says r = 0, so BT loss starts at ln 2
            nn.init.zeros_(self.scalar_head.weight)
            nn.init.zeros_(self.scalar_head.bias)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def get_num_params(self, non_embedding=True):
        """Parameter count; the position table is left out by default (it costs no matmul FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden(self, idx, attention_mask=None, kv_cache=None):
        """idx (B, T) -> final-LN hidden states (B, T, C).
        attention_mask (B, Tk): 1 real / 0 padding; with kv_cache it covers the cached tokens too (Tk >= T)."""
        B, T = idx.size()
        if kv_cache is not None and attention_mask is None:
            attention_mask = torch.ones_like(idx)
        Tk = T if attention_mask is None else attention_mask.size(1)
        if Tk > self.config.block_size:
            raise ValueError(f"sequence of {Tk} tokens is longer than block_size {self.config.block_size}")
        if attention_mask is None:
            pos, mask = torch.arange(T, device=idx.device), None  # (T,)
        else:
            # count real tokens so a left-padded row still starts at position 0
            pos = (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, Tk - T:]  # (B, T)
            mask = padding_attn_mask(attention_mask, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, None if kv_cache is None else kv_cache[i])
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, attention_mask=None, ignore_index=-1, return_values=False, detach_values=False):
        """-> (logits (B, T, V), loss or None), plus values (B, T) fp32 from the scalar head if return_values
        (read from detached hidden states if detach_values, so the value loss cannot move the trunk).
        Going through forward (not hidden/scalar) is what lets DDP all-reduce the gradients."""
        h = self.hidden(idx, attention_mask)
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            # mean over the targets that count; sum/clamp gives 0.0 (still in the graph) when none count
            n = (targets != ignore_index).sum().clamp(min=1)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=ignore_index, reduction="sum") / n
        if return_values:
            return logits, loss, self.scalar_head(h.detach() if detach_values else h).squeeze(-1).float()
        return logits, loss


# -----------------------------------------------------------------------------
# Sampling and log-probs

def token_logprobs(logits, tokens, temperature=1.0):
    """log softmax(logits / temperature) at tokens: (B, T, V), (B, T) -> (B, T) fp32."""
    logits = logits.float() / temperature
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)

def sequence_logprobs(model, seq, attn_mask=None, temperature=1.0):
    """log p(seq[:, t+1] | seq[:, :t+1]) at index t: (B, L) -> (B, L-1) fp32. Keeps the graph (call under
    no_grad for a frozen reference)."""
    logits, _ = model(seq, attention_mask=attn_mask)
    return token_logprobs(logits[:, :-1], seq[:, 1:], temperature)



def rm_score(rm, ids, attn_mask, gain=1.0, bias=0.0):
    """Reward model score per sequence, (B,) fp32: the scalar head read at the last real token (the <|end|> that
    closes the answer), for right-padded rows, then normalised as gain * r + bias (mean 0, std 1 on SFT answers)."""
    last = attn_mask.sum(1) - 1                                   # (B,) index of each row's last real token
    r = rm(ids, attention_mask=attn_mask, return_values=True)[2]  # (B, T) scalar head at every position
    return gain * r[torch.arange(ids.size(0), device=ids.device), last] + bias

@torch.no_grad()
def sample_kl(policy, ref, seq, attn_mask, gen_mask, temperature=1.0):
    """Monte-Carlo KL(policy || ref) per sequence, (B,) fp32: the sum over sampled response tokens of
    log pi(y_t) - log ref(y_t) (the k1 estimator; unbiased because the tokens were sampled from policy)."""
    lp = sequence_logprobs(policy, seq, attn_mask, temperature)
    lr = sequence_logprobs(ref, seq, attn_mask, temperature)
    return ((lp - lr) * gen_mask[:, 1:]).sum(1)

@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_ids=(), pad_id=0,
             generator=None, use_cache=True, return_logprobs=False):
    """Sample continuations of a batch of token-id lists.

    Returns seq (B, P+n) long, attn_mask (B, P+n) 1 on real tokens, gen_mask (B, P+n) 1 on generated tokens
    (a stop token included); with return_logprobs also logprobs (B, P+n) fp32: log-prob of seq[:, t] under
    softmax(logits / temperature) before top-k/top-p filtering (temperature 0 records temperature 1), 0 elsewhere.
    Prompts are left-padded to P = longest prompt; n <= max_new_tokens (clipped to block_size, early stop)."""
    model = getattr(model, "module", model)  # DDP wraps the model; the cache path lives on the module itself
    device, block_size = model.lm_head.weight.device, model.config.block_size
    B, P = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("generate: every prompt needs at least one token")
    if P >= block_size:
        raise ValueError(f"generate: a prompt of {P} tokens leaves no room to generate (block_size {block_size})")
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
    cache = [{"len": L} for _ in model.transformer.h] if use_cache else None
    was_training = model.training
    model.eval()
    for t in range(P, L):
        # with the cache only the new token goes through the network (the whole prompt on the first step)
        start = t - 1 if (use_cache and t > P) else 0
        h = model.hidden(seq[:, start:t], attn[:, :t], kv_cache=cache)[:, -1]  # (B, C)
        logits = model.lm_head(h).float()                                          # (B, V)
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
                drop = probs.cumsum(-1) - probs > top_p  # the mass before a token already reaches top_p
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


# -----------------------------------------------------------------------------
# Device, precision, DDP, optimizer

def setup(device="auto", dtype="auto", seed=1337):
    """Read torchrun's environment, pick device and precision, seed. Returns a namespace the stages use:
    device, device_type, dtype, ptdtype, ctx (autocast or nullcontext), scaler, ddp, rank, local_rank,
    world_size, master."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device_type = device.split(":")[0]
    if ddp and device_type == "cuda":
        device = f"cuda:{local_rank}"  # one process per GPU
        torch.cuda.set_device(device)
    if ddp:
        torch.distributed.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    if dtype == "auto":
        dtype = "float32" if device_type != "cuda" else "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # free speed on Ampere+
    # autocast runs matmuls in low precision and keeps reductions in fp32; fp16 also needs loss scaling
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)  # each rank draws different data and samples
    return SimpleNamespace(device=device, device_type=device_type, dtype=dtype, ptdtype=ptdtype, ctx=ctx,
                           scaler=scaler, ddp=ddp, rank=rank, local_rank=local_rank, world_size=world_size,
                           master=(rank == 0))

def cleanup():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

def wrap(model, rt, compile=False):
    """The model a training loop calls: torch.compile'd if asked, then DDP under torchrun (gradients all-reduced
    in backward). Keep the unwrapped one for saving, evaluation and generation."""
    model = torch.compile(model) if compile else model
    if rt.ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    return model

def configure_optimizer(model, weight_decay, lr, betas, device_type):
    """AdamW; decay only matrices (weights, embeddings), never biases or LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    extra = {"fused": True} if device_type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **extra)

def optimizer_step(model, optimizer, scaler, grad_clip):
    """One update after backward(): unscale fp16 gradients (a no-op otherwise) so the clip sees true norms, clip
    the global gradient norm (0 = off), step (skipped by the scaler if fp16 overflowed), zero the gradients."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

def get_lr(it, warmup, max_iters, lr, min_lr):
    """Linear warmup, then cosine decay from lr to min_lr at max_iters."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it >= max_iters:
        return min_lr
    ratio = (it - warmup) / max(1, max_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


# -----------------------------------------------------------------------------
# Checkpoints, RNG state, metrics

def clean_state_dict(sd):
    """Drop the prefixes torch.compile ('_orig_mod.') and DDP ('module.') put on every key."""
    out = {}
    for k, v in sd.items():
        while k.startswith(("_orig_mod.", "module.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out

def save_checkpoint(path, ckpt):
    """Write to a temp file in the same directory, then rename: a kill mid-write leaves the old file intact."""
    if isinstance(ckpt.get("model"), dict):
        ckpt = {**ckpt, "model": clean_state_dict(ckpt["model"])}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX and Windows

def load_checkpoint(path, kinds=None, map_location="cpu"):
    """torch.load(weights_only=True) with one-line errors for a missing, unreadable or wrong-kind file."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})")
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    if kinds is not None and ckpt.get("kind") not in kinds:
        raise SystemExit(f"error: {path} is a {ckpt.get('kind')!r} checkpoint; expected one of {', '.join(kinds)}")
    return ckpt

def load_weights(model, sd):
    """load_state_dict that lets the scalar head be new (base -> reward model) or dropped (reward -> policy)
    and lm_head be absent (it is wte)."""
    sd = clean_state_dict(sd)
    if model.scalar_head is None:
        sd = {k: v for k, v in sd.items() if not k.startswith("scalar_head.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad = [k for k in missing if not k.startswith(("scalar_head.", "lm_head."))] + list(unexpected)  # lm_head = wte
    if bad:
        raise ValueError(f"state dict does not fit the model: {bad[:5]}")
    return model

def model_from_checkpoint(ckpt, **overrides):
    """GPT built from ckpt['model_args'] (updated with overrides, e.g. dropout=0.0, scalar_head=True)."""
    return load_weights(GPT(GPTConfig(**{**ckpt["model_args"], **overrides})), ckpt["model"])

def rng_state():
    """Python, numpy and torch RNG states as plain lists and tensors (weights_only-loadable)."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    d = {"python": [version, list(mt), gauss], "torch": torch.get_rng_state(),
         "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        d["cuda"] = torch.cuda.get_rng_state_all()
    return d

def set_rng_state(d):
    random.setstate((d["python"][0], tuple(d["python"][1]), d["python"][2]))
    keys, pos, has_gauss, cached = d["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(d["torch"])
    if "cuda" in d and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(d["cuda"])

def training_state(model, optimizer, scaler):
    """The part of a checkpoint that --resume needs besides config and step (restore() reads it back)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "rng": rng_state()}

def restore(ckpt, model, optimizer, scaler=None):
    """--resume: weights, optimizer moments, loss scale and every RNG stream from a checkpoint; returns its step,
    so the loop continues exactly where the saved run was."""
    load_weights(model, ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None:
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return ckpt["step"]

def ensure_checkpoint(path, script, out_dir):
    """A stage's input is missing: say which command makes it, then run that stage with its defaults, so that
    `python ppo.py` works on a fresh clone (each stage in turn builds what it needs)."""
    if os.path.isfile(path) or int(os.environ.get("RANK", 0)) != 0 and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return
    cmd = [sys.executable, script] + ([f"--out_dir={out_dir}"] if out_dir != "out" else [])
    print(f"{path} not found: running `{' '.join(['python'] + cmd[1:])}` to make it")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    if subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), env=env).returncode != 0 or not os.path.isfile(path):
        raise SystemExit(f"error: `python {script}` did not produce {path}")


def load_model(path, kinds, **overrides):
    """(model, tokenizer, checkpoint) from a stage checkpoint; overrides change GPTConfig (e.g. dropout=0.0)."""
    from data.tokenizer import get_tokenizer  # model.py stays usable without the data package
    ckpt = load_checkpoint(path, kinds)
    return model_from_checkpoint(ckpt, **overrides), get_tokenizer(ckpt.get("tokenizer", "world")), ckpt


def pad_rows(rows, pad_id, left=False):
    """List of token-id lists -> (ids (B, T) long, attention_mask (B, T) long), padded right (or left)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask


def append_jsonl(path, obj):
    """One metrics object per line; tensors and numpy scalars become floats."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=float) + "\n")


# -----------------------------------------------------------------------------
# --key=value overrides (nanoGPT's configurator, with type checks)

def configure(g, argv=None):
    """Apply --name=value overrides to a script's config globals g; returns {name: value} of the config."""
    keys = [k for k, v in g.items() if not k.startswith("_") and (v is None or type(v) in (int, float, bool, str, tuple, list))]
    for arg in sys.argv[1:] if argv is None else argv:
        if arg.startswith("--") and arg[2:] in keys and isinstance(g[arg[2:]], bool):
            arg += "=True"  # a bare --flag switches a bool option on: --sweep means --sweep=True
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"error: arguments must look like --name=value, got {arg!r}")
        name, raw = arg[2:].split("=", 1)
        if name not in keys:
            raise SystemExit(f"error: unknown option --{name}; valid options: {', '.join(keys)}")
        old = g[name]
        try:
            new = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            new = raw  # a bare word: fine for a str option, a type error for the others
        if isinstance(old, str) and not isinstance(new, str):
            new = raw  # --out_dir=123 means the directory "123"
        elif isinstance(old, float) and type(new) is int:
            new = float(new)
        elif isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)):
            new = type(old)(new)
        if old is not None and type(new) is not type(old):
            raise SystemExit(f"error: --{name} expects {type(old).__name__}, got {type(new).__name__} {raw!r}")
        g[name] = new
    return {k: g[k] for k in keys}


def load_gpt2(path, **overrides):
    """GPT from Hugging Face GPT-2 weights on disk (data/gpt2.py reads and converts them); overrides change
    GPTConfig, e.g. dropout or scalar_head."""
    from data.gpt2 import read_gpt2
    sd, args = read_gpt2(path)
    return load_weights(GPT(GPTConfig(**{**args, **overrides})), sd)
