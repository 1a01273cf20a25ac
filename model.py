"""
The network: a small GPT-2 (pre-LN transformer, tied embeddings), nanoGPT style.

1. GPTConfig, attention, MLP, blocks, GPT. An optional scalar head turns the network into a reward model,
   or gives PPO a value head on the policy's own trunk.
2. Per-token log-probs, and generate(): batched sampling from left-padded prompts with a KV cache (prefill
   the prompts, then decode_step() one token per unfinished row, each drawn by sample()).

Everything around the network (devices, precision, checkpoints, config) is in runtime.py; sampling and scoring
chat replies is in rollout.py.
"""
import math
from dataclasses import dataclass

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
        # mask: None (plain causal), bool (B, 1, T, Tk) True where a query may look at a key, or additive
        # (B, 1, T, Tk) float (0 or -inf), which generate keeps for its one-token steps
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        hs = C // self.n_head
        q, k, v = (t.view(B, T, self.n_head, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            # cache is this layer's dict. The first call makes the (B', nh, L, hs) buffers of
            # cache["size"] = (B', L), in k's dtype, zeroed (padding never written stays finite under the
            # mask); a call's rows are their first B, and its T new keys/values go after the Tk - T stored
            if "k" not in cache:
                rows, length = cache["size"]
                cache["k"] = k.new_zeros(rows, self.n_head, length, hs)
                cache["v"] = torch.zeros_like(cache["k"])
            end = mask.size(-1)
            cache["k"][:B, :, end - T:end] = k
            cache["v"][:B, :, end - T:end] = v
            k, v = cache["k"][:B, :, :end], cache["v"][:B, :, :end]  # (B, nh, Tk, hs)
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
        # GPT-2 (Section 2.3) scales the weights of the residual layers by 1/sqrt(N), N = 2 * n_layer of
        # them (attention and MLP in each block), so that together they add O(1) variance to the residual
        # stream however deep the network is
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if self.scalar_head is not None:  # zero head: a fresh reward model says r = 0, BT loss starts at ln 2
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
        attention_mask (B, Tk): 1 real / 0 padding; with kv_cache it also covers the cached tokens.
        kv_cache: a list of one dict per layer, {"size": (B', L)} before the first call: room for B' >= B rows
        (idx's are the first B) and L tokens; the call's keys/values go to columns Tk - T .. Tk-1."""
        B, T = idx.size()
        if kv_cache is not None and attention_mask is None:  # the mask says where the cached keys are
            raise ValueError("hidden: a kv_cache needs the attention_mask over the cached and new tokens")
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

    def forward(self, idx, targets=None, attention_mask=None, ignore_index=-1, return_values=False,
                detach_values=False, with_logits=True):
        """-> (logits (B, T, V), loss or None), plus values (B, T) fp32 from the scalar head if return_values
        (read from detached hidden states if detach_values, so the value loss cannot move the trunk).
        with_logits=False skips the unembedding (logits None): a reward model reads only its scalar head.
        Going through forward (not hidden() and a head directly) is what lets DDP all-reduce the gradients."""
        if targets is not None and not with_logits:
            raise ValueError("forward: a loss over targets needs the logits (with_logits=True)")
        h = self.hidden(idx, attention_mask)
        logits = self.lm_head(h) if with_logits else None
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
# Log-probs, batching and sampling

def token_logprobs(logits, tokens, temperature=1.0):
    """log softmax(logits / temperature) at tokens: (B, T, V), (B, T) -> (B, T) fp32."""
    logits = logits.float() / temperature
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)

def sequence_logprobs(model, seq, attn_mask=None, temperature=1.0):
    """log p(seq[:, t+1] | seq[:, :t+1]) at index t: (B, L) -> (B, L-1) fp32. Keeps the graph (call under
    no_grad for a frozen reference)."""
    logits, _ = model(seq, attention_mask=attn_mask)
    return token_logprobs(logits[:, :-1], seq[:, 1:], temperature)

def pad_rows(rows, pad_id, left=False):
    """List of token-id lists -> (ids (B, T) long, attention_mask (B, T) long), padded right (or left)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask

def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row of logits (B, V) -> (tokens (B,), their log-probs (B,) fp32 under
    softmax(logits / temperature) before top-k/top-p filtering). Temperature 0 is greedy and records the
    temperature-1 log-probs. top-k keeps every token tied with the k-th largest (nanoGPT's rule), so it can
    keep more than k; top-p breaks ties by vocabulary index (a stable sort), on every device alike."""
    logp = F.log_softmax(logits.float() / (temperature or 1.0), dim=-1)  # (B, V)
    if temperature == 0:
        tok = logits.argmax(-1)
    else:
        kept, filtered = logp, top_k is not None or top_p is not None
        if top_k is not None:  # top-k: Fan et al. 2018, arXiv 1805.04833
            kth = torch.topk(kept, min(top_k, kept.size(-1))).values[:, -1:]
            kept = kept.masked_fill(kept < kth, float("-inf"))
        if top_p is not None:  # nucleus, Holtzman et al. 2019, arXiv 1904.09751: the fewest top tokens
            # whose probability mass reaches top_p
            sorted_l, order = torch.sort(kept, descending=True, stable=True)
            probs = F.softmax(sorted_l, dim=-1)
            drop = probs.cumsum(-1) - probs >= top_p  # the mass before a token already reaches top_p
            drop[:, 0] = False  # the most likely token always stays, so some token is left to draw
            kept = kept.scatter(-1, order, sorted_l.masked_fill(drop, float("-inf")))
        # inverse-CDF sampling: one uniform number per row, where multinomial draws one per vocabulary entry.
        # u * total < total, so the first cdf entry above it ends a token of non-zero probability
        cdf = (F.softmax(kept, dim=-1) if filtered else kept.exp()).cumsum(-1)  # (B, V)
        u = torch.rand(cdf.size(0), 1, device=cdf.device, generator=generator) * cdf[:, -1:]
        tok = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.size(-1) - 1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)

def prefill(model, idx, attention_mask, cache, chunk=16):
    """Left-padded prompts (B, P), sorted longest first, through the network into the KV cache -> the logits
    (B, V) after each prompt. The prompt goes in chunks of columns, each run on only the rows with a real
    token in it (a prefix of the rows), so little of the left padding is computed."""
    P, lens = idx.size(1), attention_mask.sum(1)
    chunk = chunk if cache is not None else P  # without a cache, one pass over everything
    # the first chunk takes the P % chunk leftover columns (a full chunk if none), so every later chunk ends
    # on a chunk boundary and the last one ends at P
    for end in range(P % chunk or chunk, P + 1, chunk):
        n = int((lens > P - end).sum())  # the rows whose prompt reaches into columns [end - chunk, end)
        h = model.hidden(idx[:n, max(end - chunk, 0):end], attention_mask[:n, :end], kv_cache=cache)
    return model.lm_head(h[:, -1]).float()  # the last chunk holds every row

def decode_step(model, tok, pos, mask, cache):
    """One new token per row through the network with the KV cache: tok, pos (B,) -> logits (B, V).
    pos counts the row's real tokens before this one; mask (B, 1, 1, Tk) is additive over the Tk keys
    (0: a real token, -inf: padding), the last key being this token, whose key/value the call caches."""
    x = model.transformer.wte(tok[:, None]) + model.transformer.wpe(pos[:, None])  # (B, 1, C)
    for block, layer_cache in zip(model.transformer.h, cache):
        x = block(x, mask, layer_cache)
    return model.lm_head(model.transformer.ln_f(x[:, 0])).float()

@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_ids=(), pad_id=0,
             generator=None, use_cache=True, return_logprobs=False):
    """Sample continuations of a batch of token-id lists.

    Returns seq (B, P+n) long, attn_mask (B, P+n) 1 on real tokens, gen_mask (B, P+n) 1 on generated tokens
    (a stop token included); with return_logprobs also logprobs (B, P+n) fp32: log-prob of seq[:, t] under
    softmax(logits / temperature) before top-k/top-p filtering (temperature 0 records temperature 1), else 0.
    Prompts are left-padded to P = longest prompt; n <= max_new_tokens (clipped to block_size, early stop).
    With the KV cache each step after the prompt feeds one token per unfinished row; use_cache=False
    reruns the whole sequence every step (the reference the cache is tested against). Copies of one prompt
    share its pass; rows that finished leave the batch once they are a quarter of it. A fixed generator
    makes the samples repeatable."""
    model = getattr(model, "module", model)  # DDP wraps the model; the cache path lives on the module itself
    cfg, device = model.config, model.lm_head.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("generate: every prompt needs at least one token")
    if P >= cfg.block_size:
        raise ValueError(f"generate: a prompt of {P} tokens leaves no room (block_size {cfg.block_size})")
    L = P + min(max_new_tokens, cfg.block_size - P)
    ids, real = pad_rows(prompts, pad_id, left=True)
    seq, attn = F.pad(ids, (0, L - P), value=pad_id).to(device), F.pad(real, (0, L - P)).to(device)  # (B, L)
    gen, logprobs = torch.zeros_like(attn), torch.zeros(B, L, device=device)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    # ---- 1. the prompts, longest first (the cache's row order), into a KV cache with room for all L tokens.
    # A prompt asked for n samples (best-of-n, K answers to rank, a group) goes through the network once
    rows = torch.tensor(sorted(range(B), key=lambda i: -len(prompts[i])), device=device)  # cache row -> row
    slot = {}  # each distinct prompt -> its row in the prompt pass (still longest first)
    src = torch.tensor([slot.setdefault(tuple(prompts[i]), len(slot)) for i in rows.tolist()], device=device)
    cache = [{"size": (len(slot), L)} for _ in model.transformer.h] if use_cache else None
    logits = prefill(model, *(t.to(device) for t in pad_rows(list(slot), pad_id, left=True)), cache)  # (U, V)
    if len(slot) < B:  # copies of a prompt: each takes its prompt's logits and cached keys and values
        logits = logits[src]
        for layer in cache or ():
            layer["k"], layer["v"] = layer["k"][src], layer["v"][src]
    # kept across steps rather than rebuilt: the additive key mask (-inf on the left padding), the positions
    padding = F.pad(attn[rows, :P] == 0, (0, L - P))  # (B, L)
    mask = torch.zeros(B, 1, 1, L, device=device).masked_fill(padding[:, None, None], float("-inf"))
    pos = attn[rows].sum(1)  # (B,) the position of each row's next token: its real tokens so far
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # ---- 2. sample, record, stop; drop finished rows from the batch; feed the new tokens
    for t in range(P, L):
        tok, lp = sample(logits, temperature, top_k, top_p, generator)
        seq[rows, t] = torch.where(done, pad_id, tok)  # a finished row not yet dropped gets padding
        attn[rows, t] = gen[rows, t] = (~done).long()
        logprobs[rows, t] = torch.where(done, 0.0, lp)
        done = done | torch.isin(tok, stop)
        if done.all() or t == L - 1:
            L = t + 1
            break
        if 4 * done.sum() >= len(rows):  # a quarter of the rows finished: stop computing them
            keep = ~done
            rows, tok, pos, mask, done = rows[keep], tok[keep], pos[keep], mask[keep], done[keep]
            for layer in cache or ():
                layer["k"], layer["v"] = layer["k"][keep], layer["v"][keep]
        if use_cache:
            logits = decode_step(model, tok, pos, mask[..., :t + 1], cache)
        else:
            logits = model.lm_head(model.hidden(seq[rows, :t + 1], attn[rows, :t + 1])[:, -1]).float()
        pos = pos + 1
    model.train(was_training)
    out = (seq[:, :L], attn[:, :L], gen[:, :L])
    return out + (logprobs[:, :L],) if return_logprobs else out
