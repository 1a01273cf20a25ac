"""
Chat template and SFT loss mask.

    <|endoftext|> <|system|> ...text... <|end|> <|user|> ...text... <|end|> <|assistant|> ...text... <|end|> ...
    mask:    0        0          0          0       0         0         0          0           1 ... 1      1

The model is trained only where the mask is 1: the assistant's words and the <|end|> that closes them, so it
learns what to say and when to stop, but never to imitate the user or to predict where a user turn begins.
"""

from data.tokenizer import ASSISTANT, END, EOT, SYSTEM, USER, special_id

ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


def check_messages(messages) -> None:
    """Raise ValueError naming the first thing wrong with a messages list."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list, got {type(messages).__name__}"
                         + (" (empty)" if isinstance(messages, list) else ""))
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with role and content, got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(m.get('content')).__name__}")


def render(enc, messages) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation, and the 0/1 loss mask (1 on assistant content and its <|end|>)."""
    check_messages(messages)
    ids, mask = [special_id(enc, EOT)], [0]  # BOS: every conversation starts fresh, like a new document
    for m in messages:
        body = enc.encode_ordinary(m["content"]) + [special_id(enc, END)]  # ordinary: typed "<|end|>" stays text
        train = int(m["role"] == "assistant")
        ids += [special_id(enc, ROLES[m["role"]])] + body
        mask += [0] + [train] * len(body)  # the role marker is given, never predicted
    return ids, mask


def render_prompt(enc, messages) -> list[int]:
    """Ids of a conversation so far (ending with a user turn) plus <|assistant|>, ready for generate()."""
    check_messages(messages)
    if messages[-1]["role"] != "user":
        raise ValueError(f"the last message must be from the user, got {messages[-1]['role']!r}")
    return render(enc, messages)[0] + [special_id(enc, ASSISTANT)]


def render_response(enc, messages, response) -> tuple[list[int], list[int]]:
    """(prompt + response + <|end|>) ids and a mask that is 1 on the response and its <|end|> only: what reward
    models score and what DPO/PPO take log-probs of."""
    prompt = render_prompt(enc, messages)
    reply = enc.encode_ordinary(response) + [special_id(enc, END)]
    return prompt + reply, [0] * len(prompt) + [1] * len(reply)

def respond(model, enc, conversations, max_new_tokens=48, temperature=1.0, top_k=None, top_p=None, generator=None,
            return_batch=False):
    """Sample one assistant reply per conversation with the KV cache. Returns [{"text", "ended", "ids", "logprob"}]
    where ended means the reply closed its turn (<|end|>) before max_new_tokens and logprob is the log-probability
    of the reply as sampled (its tokens and <|end|> if it ended) at the sampling temperature; with return_batch also
    the raw (seq, attn_mask, gen_mask) tensors from model.generate for callers that train on them (PPO)."""
    from model import generate  # lazy: data/ stays importable without torch's model code
    stops = (special_id(enc, END), special_id(enc, EOT))
    prompts = [render_prompt(enc, c) for c in conversations]
    seq, attn, gen, logprobs = generate(model, prompts, max_new_tokens, temperature, top_k, top_p, stops,
                                        pad_id=special_id(enc, EOT), generator=generator, return_logprobs=True)
    out = []
    for row, g, lps in zip(seq.tolist(), gen.tolist(), logprobs.tolist()):
        ids = [t for t, m in zip(row, g) if m]
        ended = bool(ids) and ids[-1] == stops[0]
        text_ids = ids[:-1] if ids and ids[-1] in stops else ids
        logprob = sum([lp for lp, m in zip(lps, g) if m][:len(text_ids) + ended])
        out.append({"text": enc.decode(text_ids), "ended": ended, "ids": ids, "logprob": logprob})
    return (out, (seq, attn, gen)) if return_batch else out


def sft_example(enc, messages, block_size=None) -> tuple[list[int], list[int]]:
    """One SFT training row: (input ids, targets), where targets[t] is the token after ids[t] if that token is
    learned (mask 1) and -1 (ignored by the loss) otherwise. Both are cut to block_size tokens."""
    ids, mask = render(enc, messages)
    targets = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]  # predict token t+1, only where it is learned
    return ids[:-1][:block_size], targets[:block_size]


def sft_batch(examples, pad_id):
    """[(ids, targets)] -> (ids (B, T), targets (B, T), attention_mask (B, T)), padded on the right; padding
    positions get target -1, so they add nothing to the loss."""
    from model import pad_rows
    ids, attn = pad_rows([x for x, _ in examples], pad_id)
    targets, _ = pad_rows([y for _, y in examples], -1)
    return ids, targets, attn


def score(model, enc, prompts, max_new_tokens=48, temperature=1.0, batch_size=64, generator=None, ref=None,
          **sampling):
    """Sample one reply per prompt and grade it with the world's hidden human (data.world.gold; 1.0 = ideal).
    Returns means over prompts {"gold", "ended", "fluency", "n"} and "samples" [{"prompt", "text", "ended",
    "gold", "fluency"}]; with a reference model also "kl": KL(model || ref) per answer, estimated on the same
    samples. For evaluation only: gold() is never a training signal."""
    from data import world
    from model import sample_kl
    samples = []
    for i in range(0, len(prompts), batch_size):  # chunks bound the memory of a batched KV cache
        chunk = prompts[i:i + batch_size]
        replies, (seq, attn, gen) = respond(model, enc, chunk, max_new_tokens, temperature, generator=generator,
                                            return_batch=True, **sampling)
        kls = sample_kl(model, ref, seq, attn, gen, temperature).tolist() if ref is not None else [0.0] * len(chunk)
        for p, r, kl in zip(chunk, replies, kls):
            samples.append({"prompt": p, "text": r["text"], "ended": r["ended"], "kl": kl,
                            "gold": world.gold(p, r["text"], r["ended"]), "fluency": world.fluency(r["text"])})
    n = max(1, len(samples))
    mean = {k: sum(s[k] for s in samples) / n for k in ("gold", "ended", "fluency", "kl")}
    return {**mean, "n": len(samples), "samples": samples}


def scored_ids(enc, messages, text, ended=True, block_size=None):
    """Ids a reward model reads: prompt + reply + <|end|>, without <|end|> if the reply never ended its turn (its
    score is then read at its last token, and the model must learn that running on is bad). Rows longer than
    block_size keep their end, where the score is read."""
    ids, _ = render_response(enc, messages, text)
    ids = ids if ended else ids[:-1]
    return ids[-block_size:] if block_size else ids


def score_rows(rm, rows, pad_id, gain=1.0, bias=0.0, batch_size=128):
    """model.rm_score over token rows in batches: (N,) fp32 on the CPU, no gradients. Rows go through shortest
    first, so each batch is padded to a length close to its own rows'; the result is in the rows' order."""
    import torch
    from model import pad_rows, rm_score
    device = next(rm.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = torch.empty(len(rows))
    for s in range(0, len(rows), batch_size):
        idx = order[s:s + batch_size]
        ids, attn = pad_rows([rows[i] for i in idx], pad_id)
        with torch.no_grad():
            out[idx] = rm_score(rm, ids.to(device), attn.to(device), gain, bias).float().cpu()
    return out


def response_logps(model, rows, masks, pad_id, device):
    """Summed log-prob of each row's response tokens, sum_t mask_t log pi(x_t | x_<t): (B,) fp32, with gradients
    (DPO trains through it). Rows are right-padded; padding sits after every real token, so causal attention keeps
    it out of the real positions, and the mask keeps it (and the prompt) out of the sum."""
    from model import pad_rows, sequence_logprobs
    ids, attn = pad_rows(rows, pad_id)
    resp, _ = pad_rows(masks, 0)
    ids, attn, resp = ids.to(device), attn.to(device), resp.to(device)
    lp = sequence_logprobs(model, ids, attn)  # (B, T-1): index t scores ids[:, t+1]
    return (lp * resp[:, 1:]).sum(-1)


def reply_logprobs(model, enc, conversations, replies, batch_size=128):
    """log p(reply | conversation) under model at temperature 1, summed over the reply's tokens (and its <|end|>
    if it ended its turn): (N,) fp32 on the CPU, no gradients. reward.py's --lm_feature adds a multiple of this,
    under the frozen SFT model, to the reward model's score."""
    import torch
    device = next(model.parameters()).device
    rows, masks = [], []
    for c, r in zip(conversations, replies):
        ids, mask = render_response(enc, c, r["text"])
        ids, mask = (ids, mask) if r["ended"] else (ids[:-1], mask[:-1])  # a reply cut off never said <|end|>
        rows.append(ids[-model.config.block_size:])
        masks.append(mask[-model.config.block_size:])
    with torch.no_grad():
        return torch.cat([response_logps(model, rows[s:s + batch_size], masks[s:s + batch_size],
                                         special_id(enc, EOT), device).float().cpu()
                          for s in range(0, len(rows), batch_size)])


def reward_scores(rm, enc, conversations, replies, gain=1.0, bias=0.0, batch_size=128, lm_weight=0.0, sft=None,
                  sft_logprobs=None):
    """Reward-model score of each (conversation, reply), replies as respond() returns them ({"text", "ended"}),
    normalised as gain * r + bias: (N,) fp32 on the CPU. A reward model trained with --lm_feature has
    r = head + lm_weight * log p_SFT(reply | conversation): computed with the SFT model, or taken from
    sft_logprobs when the caller already has them (replies sampled from SFT at temperature 1)."""
    import torch
    rows = [scored_ids(enc, c, r["text"], r["ended"], rm.config.block_size) for c, r in zip(conversations, replies)]
    scores = score_rows(rm, rows, special_id(enc, EOT), gain, bias, batch_size)
    if lm_weight:
        lp = (reply_logprobs(sft, enc, conversations, replies, batch_size) if sft_logprobs is None
              else torch.as_tensor(sft_logprobs, dtype=torch.float))
        scores += gain * lm_weight * lp
    return scores


def best_of_n(policy, rm, enc, conversations, n, gain=1.0, bias=0.0, max_new_tokens=48, temperature=1.0,
              generator=None, batch_size=256, lm_weight=0.0, **sampling):
    """Best-of-n (rejection sampling): sample n replies per conversation from policy, keep the one the reward
    model scores highest. Returns [{"text", "ended", "ids", "score", "candidates": the n scored replies}].
    policy is the SFT model (also what an --lm_feature reward model's lm_weight term is computed with)."""
    out = []
    per = max(1, batch_size // n)  # conversations per generate() call: bounds the KV cache's memory
    for i in range(0, len(conversations), per):
        chunk = [c for c in conversations[i:i + per] for _ in range(n)]
        replies = respond(policy, enc, chunk, max_new_tokens, temperature, generator=generator, **sampling)
        # at temperature 1 the log-probs SFT sampled the replies with are log p_SFT: no second pass
        sampled = [r["logprob"] for r in replies] if temperature == 1 else None
        scores = reward_scores(rm, enc, chunk, replies, gain, bias, lm_weight=lm_weight, sft=policy,
                               sft_logprobs=sampled).tolist()
        for j in range(0, len(chunk), n):
            cands = [dict(r, score=s) for r, s in zip(replies[j:j + n], scores[j:j + n])]
            out.append(dict(max(cands, key=lambda r: r["score"]), candidates=cands))
    return out


def compare_to_sft(name, policy, sft, enc, prompts, max_new_tokens=48, generator=None):
    """The end-of-stage check of ppo.py and dpo.py: the same held-out prompts answered by SFT and by the tuned
    policy, judged by the hidden human. Prints gold, turn ending, fluency, the policy's gold win rate against SFT
    (ties count half, 95% interval) and KL(policy || SFT) on its own samples; returns the numbers."""
    from data import world
    sft_res = score(sft, enc, prompts, max_new_tokens, generator=generator)
    res = score(policy, enc, prompts, max_new_tokens, generator=generator, ref=sft)
    rate, ci = world.win_rate([s["gold"] for s in res["samples"]], [s["gold"] for s in sft_res["samples"]])
    for who, r in (("sft", sft_res), (name, res)):
        print(f"  {who}: gold {r['gold']:.3f} of ideal 1.0, ended {r['ended']:.1%}, fluency {r['fluency']:.1%}")
    print(f"  {name} wins {rate:.1%} +- {ci:.1%} against SFT (ties count half); KL({name} || sft) = "
          f"{res['kl']:.2f} nats per answer")
    for s in res["samples"][:3]:
        print(f"  {s['prompt'][-1]['content']} -> {s['text']!r} (gold {s['gold']:.2f})")
    return {"win_rate": rate, "win_ci": ci, "gold": res["gold"], "sft_gold": sft_res["gold"], "kl": res["kl"],
            "ended": res["ended"], "fluency": res["fluency"]}
