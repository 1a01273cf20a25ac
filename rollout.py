"""
Chat replies as RLHF uses them: sample them with the KV cache, take their log-probs, score them with a reward
model, pick the best of N, and compare a tuned policy with SFT under the world's hidden human.

Every stage after SFT samples or scores replies the same way, so these live once, here. A reply is the dict
that respond() returns: {"text", "ended", "ids", "logprob"}; "ended" means it closed its turn with <|end|>.
"""
import math
import os

import torch
from tqdm import tqdm

from data import world
from data.chat import render_prompt, render_response
from data.readers import or_exit, read_prompts, row_lines
from data.tokenizer import END, EOT, SPECIALS, special_id
from model import generate, pad_rows, sequence_logprobs


def training_prompts(path):
    """The prompts RL trains on (ppo.py, grpo.py): the world's train prompts, or a JSONL file of
    {"prompt": ...} or {"messages": [...]} per line; a bad file is one line naming file:line. Read before any
    model is; once the policy's tokenizer is known, prompts_fit checks the prompts' lengths."""
    if not path:
        return world.prompts("train")
    prompts = or_exit(read_prompts, path)
    if int(os.environ.get("RANK", 0)) == 0:  # said once, by the first process
        print(f"training on {len(prompts)} prompts from {path}: the hidden human judges the world's language "
              "only, so no gold or win rate is reported")
    return prompts


def prompts_fit(path, prompts, enc, block_size, max_new_tokens):
    """Stop with one line at the first prompt that leaves less than max_new_tokens of the model's block_size
    for its reply (naming path:line for a prompts file read by read_prompts; path "" is the world's): generate
    would refuse it, or cut every reply of its batch short, only when training first drew it."""
    for i, p in enumerate(prompts):
        n = len(render_prompt(enc, p))
        if n + max_new_tokens > block_size:
            where = "a world prompt"
            if path:  # the prompt's line, read again from the file (a pipe cannot be: then its number)
                lines = row_lines(path) if os.path.isfile(path) else []
                where = f"{path}:{lines[i]}: the prompt" if i < len(lines) else f"{path}: prompt {i + 1}"
            raise SystemExit(f"error: {where} is {n} tokens with the chat template; the model's {block_size} "
                             f"have no room for --max_new_tokens={max_new_tokens} more")


def response_rows(enc, answers, block_size, where, say=True):
    """render_response's (ids, masks) of each (conversation, reply text, ended) in answers, for a stage that
    trains on them. A row longer than block_size keeps its last block_size tokens (the prompt's start is cut,
    the reply's end stays); a file's rows may not fit, and how many were cut is said (say), not hidden."""
    full = [render_response(enc, *a) for a in answers]
    n = sum(len(ids) > block_size for ids, _ in full)
    if n and say:
        print(f"warning: {where}: {n} of {len(full)} answers with their prompts are longer than block_size="
              f"{block_size} tokens; each keeps its last {block_size} (the prompt's start is cut)")
    return [ids[-block_size:] for ids, _ in full], [m[-block_size:] for _, m in full]


def respond(model, enc, conversations, max_new_tokens=48, temperature=1.0, top_k=None, top_p=None,
            generator=None, return_batch=False):
    """Sample one assistant reply per conversation with the KV cache. Returns [{"text", "ended", "ids",
    "logprob"}] where ended means the reply closed its turn (<|end|>) before max_new_tokens and logprob is the
    log-probability of the reply as sampled (its tokens and <|end|> if it ended) at the sampling temperature,
    before any top-k/top-p filtering;
    with return_batch also the raw (seq, attn_mask, gen_mask, logprobs) tensors from model.generate, for
    callers that train on them (PPO, GRPO) or measure their KL. Any other special token also stops a reply
    (not ended): decoded, a role marker would become plain text, which the reward model and the hidden human
    would read as other tokens than the policy wrote."""
    end, stops = special_id(enc, END), tuple(special_id(enc, s) for s in SPECIALS)
    prompts = [render_prompt(enc, c) for c in conversations]
    seq, attn, gen, logprobs = generate(model, prompts, max_new_tokens, temperature, top_k, top_p, stops,
                                        pad_id=special_id(enc, EOT), generator=generator,
                                        return_logprobs=True)
    out = []
    for row, g, lps in zip(seq.tolist(), gen.tolist(), logprobs.tolist()):
        ids = [t for t, m in zip(row, g) if m]
        ended = bool(ids) and ids[-1] == end
        text_ids = ids[:-1] if ids and ids[-1] in stops else ids
        logprob = sum([lp for lp, m in zip(lps, g) if m][:len(text_ids) + ended])
        out.append({"text": enc.decode(text_ids), "ended": ended, "ids": ids, "logprob": logprob})
    return (out, (seq, attn, gen, logprobs)) if return_batch else out


# -----------------------------------------------------------------------------
# Log-probs and reward-model scores of replies

def by_length(rows, batch_size):
    """Batches of indices into rows, shortest rows first: each batch is padded to about its own length."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def response_logps(model, rows, masks, pad_id, device):
    """Summed log-prob of each row's response tokens, sum_t mask_t log pi(x_t | x_<t): (B,) fp32, with
    gradients (DPO trains through it). Rows are right-padded; padding sits after every real token, so causal
    attention keeps it out of the real positions, and the mask keeps it (and the prompt) out of the sum."""
    ids, attn = pad_rows(rows, pad_id)
    resp, _ = pad_rows(masks, 0)
    ids, attn, resp = ids.to(device), attn.to(device), resp.to(device)
    lp = sequence_logprobs(model, ids, attn)  # (B, T-1): index t scores ids[:, t+1]
    return (lp * resp[:, 1:]).sum(-1)


def reply_logprobs(model, enc, conversations, replies, batch_size=128):
    """log p(reply | conversation) under model at temperature 1, summed over the reply's tokens (and its
    <|end|> if it ended its turn): (N,) fp32 on the CPU, no gradients. Computed on the reply's text as the
    reward model reads it (render_response: re-encoded, the same tokens however they were sampled), so the
    --lm_feature term of a reward model means the same thing when it is trained, in best-of-N, in PPO and in
    evaluation."""
    device = next(model.parameters()).device
    rows, masks = zip(*(render_response(enc, c, r["text"], r["ended"], model.config.block_size)
                        for c, r in zip(conversations, replies)))
    out = torch.empty(len(rows))
    for idx in by_length(rows, batch_size):
        with torch.no_grad():
            out[idx] = response_logps(model, [rows[i] for i in idx], [masks[i] for i in idx],
                                      special_id(enc, EOT), device).float().cpu()
    return out


def rm_score(rm, ids, attn_mask, gain=1.0, bias=0.0):
    """Reward model score per sequence, (B,) fp32: the scalar head read at the last real token (the
    answer's <|end|> if it ended its turn, else its last token), then normalised as gain * r + bias (mean 0,
    std 1 on SFT answers). Rows may be padded on either side (generate() pads its prompts on the left).
    Goes through rm's forward, so DDP sees the backward pass when the reward model trains."""
    positions = torch.arange(ids.size(1), device=ids.device)
    last = (attn_mask * positions).argmax(1)                      # (B,) index of each row's last real token
    r = rm(ids, attention_mask=attn_mask, return_values=True, with_logits=False)[2]  # (B, T): every position
    return gain * r[torch.arange(ids.size(0), device=ids.device), last] + bias


def score_rows(rm, rows, pad_id, gain=1.0, bias=0.0, batch_size=128):
    """rm_score over token rows in batches (by_length): (N,) fp32 on the CPU, in the rows' order, no
    gradients."""
    device = next(rm.parameters()).device
    out = torch.empty(len(rows))
    for idx in by_length(rows, batch_size):
        ids, attn = pad_rows([rows[i] for i in idx], pad_id)
        with torch.no_grad():
            out[idx] = rm_score(rm, ids.to(device), attn.to(device), gain, bias).float().cpu()
    return out


def reward_scores(rm, enc, conversations, replies, gain=1.0, bias=0.0, batch_size=128, lm_weight=0.0,
                  sft=None):
    """Reward-model score of each (conversation, reply), normalised as gain * r + bias: (N,) fp32 on the CPU.
    A reward model trained with reward.py's --lm_feature has r = head + lm_weight * log p_SFT(reply |
    conversation), the second term computed here with the SFT model, one way for every caller
    (reply_logprobs)."""
    rows = [render_response(enc, c, r["text"], r["ended"], rm.config.block_size)[0]
            for c, r in zip(conversations, replies)]
    scores = score_rows(rm, rows, special_id(enc, EOT), gain, bias, batch_size)
    if lm_weight:
        if sft is None:
            raise ValueError("reward_scores: a reward model with an lm_weight needs the SFT model (sft=...)")
        scores += gain * lm_weight * reply_logprobs(sft, enc, conversations, replies, batch_size)
    return scores


def best_of_n(policy, rm, enc, conversations, n, gain=1.0, bias=0.0, max_new_tokens=48, temperature=1.0,
              generator=None, batch_size=256, lm_weight=0.0, lap=lambda phase: None, desc=None, **sampling):
    """Best-of-n (rejection sampling, Stiennon et al. 2020, https://arxiv.org/abs/2009.01325): sample n
    replies per conversation from policy, keep the one the reward model scores highest. Returns [{"text",
    "ended", "ids", "score", "candidates": the n scored replies}]. policy is the SFT model (also what an
    --lm_feature reward model's lm_weight term is computed with). lap: a runtime.Stopwatch's, to split the
    time into sampling and scoring. desc: a progress bar's label (None: no bar)."""
    out = []
    per = max(1, batch_size // n)  # conversations per generate() call: bounds the KV cache's memory
    bar = tqdm(total=len(conversations), desc=desc, unit="prompt", disable=desc is None)
    for i in range(0, len(conversations), per):
        chunk = [c for c in conversations[i:i + per] for _ in range(n)]
        replies = respond(policy, enc, chunk, max_new_tokens, temperature, generator=generator, **sampling)
        lap("sampling")
        scores = reward_scores(rm, enc, chunk, replies, gain, bias, lm_weight=lm_weight, sft=policy).tolist()
        lap("scoring")
        for j in range(0, len(chunk), n):
            cands = [dict(r, score=s) for r, s in zip(replies[j:j + n], scores[j:j + n])]
            out.append(dict(max(cands, key=lambda r: r["score"]), candidates=cands))
        bar.update(len(chunk) // n)
    bar.close()
    return out


# -----------------------------------------------------------------------------
# Judged by the hidden human (evaluation only: gold is never a training signal)

@torch.no_grad()
def sample_kl(logprobs, ref, seq, attn_mask, gen_mask, temperature=1.0):
    """Monte-Carlo KL(policy || ref) per sequence, (B,) fp32: the sum over sampled response tokens of
    log pi(y_t) - log ref(y_t) (the k1 estimator, http://joschu.net/blog/kl-approx.html; unbiased because the
    tokens were sampled from policy: without top-k/top-p, which would sample from another distribution).
    logprobs (B, L) are the policy's own, recorded by generate while it sampled seq: only ref runs here. At
    temperature 0 (greedy) generate records temperature-1 log-probs (model.sample), and so are ref's; greedy
    tokens are not draws from pi, so there the sum is only a distance along the greedy answer, not a KL."""
    lr = sequence_logprobs(ref, seq, attn_mask, temperature or 1.0)  # (B, L-1): index t scores seq[:, t+1]
    return ((logprobs[:, 1:] - lr) * gen_mask[:, 1:]).sum(1)


def grade(prompts, replies, kls=None):
    """The world's hidden human grades replies to prompts (data.world.gold, 1.0 = ideal; fluency): one sample
    {"prompt", "text", "ended", "kl", "gold", "fluency"} per reply ("kl" from kls, else 0)."""
    return [{"prompt": p, "text": r["text"], "ended": r["ended"], "kl": kl,
             "gold": world.gold(p, r["text"], r["ended"]), "fluency": world.fluency(r["text"])}
            for p, r, kl in zip(prompts, replies, kls or [0.0] * len(prompts))]


def summarise(samples):
    """Graded samples with their means {"gold", "ended", "fluency", "kl"} and "n" (how many)."""
    n = max(1, len(samples))
    mean = {k: sum(s[k] for s in samples) / n for k in ("gold", "ended", "fluency", "kl")}
    return {**mean, "n": len(samples), "samples": samples}


def sample_and_grade(model, enc, prompts, max_new_tokens=48, temperature=1.0, batch_size=64, generator=None,
                     ref=None, lap=lambda phase: None, **sampling):
    """Sample one reply per prompt and grade it with the world's hidden human: summarise(grade(...)), where
    "kl" is KL(model || ref) per answer, estimated on the same samples (0 without ref). lap: a
    runtime.Stopwatch's, to split the time into sampling, scoring and the hidden human."""
    samples = []
    for i in range(0, len(prompts), batch_size):  # chunks bound the memory of a batched KV cache
        chunk = prompts[i:i + batch_size]
        replies, (seq, attn, gen, logprobs) = respond(model, enc, chunk, max_new_tokens, temperature,
                                                      generator=generator, return_batch=True, **sampling)
        lap("sampling")
        kls = None if ref is None else sample_kl(logprobs, ref, seq, attn, gen, temperature).tolist()
        lap("scoring")
        samples += grade(chunk, replies, kls)
        lap("hidden human")
    return summarise(samples)


def percent(x):
    """x as a percentage, or n/a for nan: a win rate's interval over one prompt, which has no spread."""
    return "n/a" if math.isnan(x) else f"{x:.1%}"


def win_rate_against(samples, ref_samples):
    """world.win_rate of scored samples against ref_samples, answers to the same prompts in the same order:
    (rate, 95% half-width), the interval clustered by prompt (one prompt's answers are not independent)."""
    return world.win_rate([s["gold"] for s in samples], [s["gold"] for s in ref_samples],
                          [repr(s["prompt"]) for s in samples])


def compare_to_sft(name, policy, sft, enc, prompts, max_new_tokens=48, generator=None,
                   lap=lambda phase: None):
    """The end-of-stage check of ppo.py, grpo.py and dpo.py: the same held-out prompts answered by SFT and by
    the tuned policy, judged by the hidden human. Prints gold, turn ending, fluency, the policy's gold win
    rate against SFT (ties count half, 95% interval clustered by prompt) and KL(policy || SFT) on its own
    samples; returns the numbers."""
    sft_res = sample_and_grade(sft, enc, prompts, max_new_tokens, generator=generator, lap=lap)
    res = sample_and_grade(policy, enc, prompts, max_new_tokens, generator=generator, ref=sft, lap=lap)
    rate, ci = win_rate_against(res["samples"], sft_res["samples"])
    for who, r in (("sft", sft_res), (name, res)):
        print(f"  {who}: gold {r['gold']:.3f} of ideal 1.0, ended {r['ended']:.1%}, "
              f"fluency {r['fluency']:.1%}")
    print(f"  {name} wins {rate:.1%} +- {percent(ci)} against SFT (ties count half); KL({name} || sft) = "
          f"{res['kl']:.2f} nats per answer" + (" (a mean of samples' log pi - log sft: below 0 by chance)"
                                                if res["kl"] < 0 else ""))
    for s in res["samples"][:3]:
        print(f"  {s['prompt'][-1]['content']} -> {s['text']!r} (gold {s['gold']:.2f})")
    return {"win_rate": rate, "win_ci": ci, "gold": res["gold"], "sft_gold": sft_res["gold"], "kl": res["kl"],
            "ended": res["ended"], "fluency": res["fluency"]}
