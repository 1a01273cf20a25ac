"""
Stage 2: comparisons and the reward model -> out/comparisons.jsonl, out/reward.pt

InstructGPT step 2 (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155): "a prompt and several model
outputs are sampled; a labeler ranks the outputs from best to worst; this data is used to train our reward
model". The SFT model writes K answers to every train prompt; one of the world's simulated labelers ranks them
(data/world.py: Plackett-Luce over the hidden human's utility, about as noisy as InstructGPT's labelers). The
reward model r_theta(x, y) is the SFT network with a scalar head in place of its unembedding, read at the
answer's last token. A ranking gives K(K-1)/2 pairs, winner y_w above loser y_l, all in one batch (eq. 1):

    loss(theta) = -1 / C(K, 2) * E_{(x, y_w, y_l) ~ D} [ log sigmoid(r_theta(x, y_w) - r_theta(x, y_l)) ]

The loss sees only reward differences, so r is then normalised, gain * r + bias, to mean 0 and std 1 (a known
scale for PPO) on SFT's answers (Ziegler et al. 2019; InstructGPT only shifts it; --data: the file's instead).

    python reward.py                          # K=4 answers to each of 4000 train prompts, ranked; train
    python reward.py --data=prefs.jsonl       # your own TRL / Anthropic HH preference pairs
    python reward.py --bon=16                 # then best-of-16 on held-out prompts, judged by gold
    python reward.py --train=False --bon=16   # best-of-16 with an existing out/reward.pt
    torchrun --nproc_per_node=2 reward.py     # DDP: each rank samples its share of prompts and of every batch

Departures (options; the defaults are InstructGPT's):
    --loss=plackett_luce  the likelihood of the whole ranking (Plackett-Luce) instead of its pairs.
    --lm_feature=True     r = head + w * log p_SFT(answer | prompt), w learned from the rankings (from 0):
                          SFT, trained on demonstrations, knows whether an answer is on topic, which a head
                          learns slowly from rankings (rollout.reply_logprobs computes it).

comparisons.jsonl, one line per prompt: the ranking (dpo.py takes all its K(K-1)/2 pairs), and a TRL
chosen/rejected view, best against worst, for tools that read pairs
    {"prompt": messages, "responses": [K strings], "ended": [K bools], "ranking": [indices, best first],
     "chosen": best response, "rejected": worst response}
"""
import os
import random
import sys
import time

import torch
from torch.nn import functional as F
from tqdm import tqdm

import model as M
import runtime
from data import world
from data.readers import or_exit, read_rankings, write_jsonl
from rollout import (best_of_n, grade, percent, prompts_fit, reply_logprobs, respond, response_rows, rm_score,
                     sample_and_grade, score_rows)

# -----------------------------------------------------------------------------
# config (every name can be overridden with --name=value)
out_dir = "out"            # reads sft.pt, writes comparisons.jsonl, reward.pt, reward.jsonl
data = ""                  # "" = sample comparisons from SFT on the world's train prompts; or a TRL/HH JSONL
collect = True             # sample and rank fresh comparisons; False reuses out_dir/comparisons.jsonl
train = True               # train the reward model; False loads out_dir/reward.pt (e.g. to run --bon)
n_prompts = 4000           # the first n train prompts (0 = all): many distinct prompts, each ranked once
contexts = 2               # copies of each request, each after its own unrelated first exchange (16: ~4x)
K = 4                      # answers ranked per prompt (InstructGPT: 4 to 9); 4 leaves time for more prompts
max_new_tokens = 48        # longest sampled answer; one that is cut off never ended its turn
temperature = 1.0          # 1 = sample the SFT distribution itself, which is where PPO starts
labeler_tau = world.LABELER_TAU  # labelers' Plackett-Luce temperature (data/world.py); 1e-6: rank by gold
gen_batch = 256            # sequences per generate() call (bounds the KV cache's memory)
loss = "bradley_terry"     # all K(K-1)/2 pairs of a ranking (eq. 1); "plackett_luce": the whole ranking
lm_feature = False         # the head alone (InstructGPT); True: head + w * log p_SFT(answer), w learned
seed = 1337                # samples, labelers, held-out split and batches: a run repeats
device = "auto"            # auto: cuda > mps > cpu
dtype = "auto"             # bf16/fp16 autocast on CUDA, fp32 on CPU; rewards and losses are always fp32
compile = False            # torch.compile the reward model (pays off on GPUs only)
dropout = 0.0              # while the reward model trains (scoring is always without); 0.1 was worse here
batch_size = 8             # prompts per step (per process); each brings all K of its answers
epochs = 1                 # passes over the comparisons: one, as in InstructGPT (more learns them by heart)
max_iters = 0              # optimizer steps; 0 = `epochs` passes
lr, min_lr = 3e-4, 3e-5    # peak learning rate, cosine-decayed to min_lr
warmup_iters = 10          # linear warmup while Adam's moment estimates are still noisy
weight_decay = 0.1         # AdamW, on matrices only (runtime.configure_optimizer)
beta1, beta2 = 0.9, 0.95   # nanoGPT's Adam betas
grad_clip = 1.0            # clip the network's global gradient norm (0 = off; --lm_feature's w is not in it)
eval_interval = 50         # held-out metrics and a checkpoint (for --resume) every this many steps
val_fraction = 0.1         # prompts held out to measure the reward model (by seed): new prompts, old tasks
n_train = 0                # train on the first n of the other rankings only (0 = all); the held-out set stays
resume = False             # continue training from out_dir/reward.pt (reuses out_dir/comparisons.jsonl)
stop_at = 0                # end after this step as if killed (0 = run to the end): split a run, test resume
bon = 0                    # > 0: best-of-bon sampling on the held-out eval prompts, judged by gold
# -----------------------------------------------------------------------------


def bradley_terry_loss(r):
    """InstructGPT eq. 1 (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155): for r (B, K), the rewards
    of each prompt's K answers in ranked order, best first, loss = -1/C(K,2) * sum over pairs w ranked above l
    of log sigmoid(r_w - r_l), averaged over prompts. All K(K-1)/2 pairs of a prompt come from ONE forward
    pass over its K answers, so no answer is seen in many batches (InstructGPT: this stops it overfitting)."""
    w, l = torch.triu_indices(r.size(1), r.size(1), 1, device=r.device)  # every pair, winner before loser
    return -F.logsigmoid(r[:, w] - r[:, l]).mean()


def plackett_luce_loss(r):
    """Plackett-Luce (Plackett 1975; Luce 1959): the K-wise ranking likelihood of reward models in Zhu, Jordan
    and Jiao 2023 (https://arxiv.org/abs/2301.11270) and DPO's appendix A.3, https://arxiv.org/abs/2305.18290.
    For r (B, K) in ranked order, best first, P(ranking) = prod_i exp(r_(i)) / sum_{j>=i} exp(r_(j)), and
    loss = -1/(K-1) * sum_i [r_(i) - logsumexp_{j>=i} r_(j)]: the ranking's negative log-likelihood per choice
    (the last is certain), so that K=2 is Bradley-Terry."""
    tail = torch.logcumsumexp(r.flip(1), dim=1).flip(1)  # (B, K): logsumexp of r[:, i:]
    return -(r - tail)[:, :-1].sum(1).mean() / (r.size(1) - 1)


LOSSES = {"bradley_terry": bradley_terry_loss, "plackett_luce": plackett_luce_loss}


def normalisation(r):
    """(gain, bias): gain * r + bias has mean 0 and std 1 over r, the rewards of the SFT policy's own answers,
    as Ziegler et al. 2019 normalise on samples of the initial policy (https://arxiv.org/abs/1909.08593);
    InstructGPT (section 3.5, https://arxiv.org/abs/2203.02155) only adds a bias so that its demonstrations
    score 0 on average. The std is clamped: a constant reward stays finite."""
    gain = 1.0 / r.float().std().clamp(min=1e-6).item()
    return gain, -r.float().mean().item() * gain


def pairwise_accuracy(r, target):
    """Share of pairs r (N, K) orders as target does: target's ties skipped (all: None), r's count 1/2."""
    i, j = torch.triu_indices(r.size(1), r.size(1), 1)
    dr, dt = r[:, i] - r[:, j], target[:, i] - target[:, j]
    agree = (dr * dt.sign() > 0).float() + 0.5 * (dr == 0).float()
    keep = dt.abs() > 1e-9
    return agree[keep].mean().item() if keep.any() else None


def calibration(r, bins=(0.5, 0.6, 0.7, 0.8, 0.9, 1.0)):
    """r (N, K) in the labeler's order, best first. Per bin of the predicted P(win) = sigmoid(r_a - r_b) of
    the answer the model prefers (a tie: 1/2, half right): (lo, hi, pairs, predicted, labeler agreement)."""
    i, j = torch.triu_indices(r.size(1), r.size(1), 1)
    d = r[:, i] - r[:, j]
    p, right = torch.sigmoid(d.abs()).flatten(), ((d > 0).float() + 0.5 * (d == 0).float()).flatten()
    masks = [(lo, hi, (p >= lo) & ((p < hi) if hi < 1 else (p <= hi))) for lo, hi in zip(bins[:-1], bins[1:])]
    return [(lo, hi, int(m.sum()), p[m].mean().item(), right[m].mean().item())
            for lo, hi, m in masks if m.any()]


def accuracy_by_part(r, golds, parts):
    """Which parts of the hidden human a reward model has learnt: r, golds (N, K); parts[n][k] =
    gold_components of answer k. Each pair with distinct gold is filed under the component whose weighted
    difference is largest: {component: (share of its pairs r orders like gold, pairs)}; r's ties count 1/2."""
    hits = {}
    for n in range(r.size(0)):
        for a, b in zip(*torch.triu_indices(r.size(1), r.size(1), 1).tolist()):  # every pair a < b
            dg, dr = golds[n, a] - golds[n, b], r[n, a] - r[n, b]
            if abs(dg) < 1e-9:
                continue
            gap = {k: abs(w * (parts[n][a][k] - parts[n][b][k])) for k, w in world.WEIGHTS.items()}
            part = max(gap, key=gap.get)
            hits.setdefault(part, []).append(1.0 if dr * dg > 0 else 0.5 if dr == 0 else 0.0)
    return {k: (sum(v) / len(v), len(v)) for k, v in sorted(hits.items(), key=lambda kv: -len(kv[1]))}


def collect_comparisons(policy, enc, prompts, rt, generator, K, max_new_tokens, temperature, tau, seed,
                        gen_batch, lap=lambda phase: None):
    """Sample K answers per prompt from SFT and have a labeler (temperature tau) rank them. Each rank does
    prompts[rank::world_size]; the shares are gathered: every rank ends up with all comparisons, in order."""
    mine = list(range(rt.rank, len(prompts), rt.world_size))
    per, rows = max(1, gen_batch // K), []
    for s in tqdm(range(0, len(mine), per), desc="collect", disable=not rt.master):
        idx = mine[s:s + per]
        replies = respond(policy, enc, [prompts[i] for i in idx for _ in range(K)], max_new_tokens,
                          temperature, generator=generator)
        lap("sampling")
        for n, i in enumerate(idx):  # comparison i's own labeler stream: the same however prompts are split
            texts, ended = ([r[key] for r in replies[n * K:(n + 1) * K]] for key in ("text", "ended"))
            ranking = world.rank(prompts[i], texts, random.Random(f"labeler-{seed}-{i}"), ended, tau=tau)
            rows.append((i, {"prompt": prompts[i], "responses": texts, "ended": ended, "ranking": ranking,
                             "chosen": texts[ranking[0]], "rejected": texts[ranking[-1]]}))
        lap("hidden human")
    if rt.ddp:
        torch.distributed.all_gather_object(shares := [None] * rt.world_size, rows)
        rows = [r for share in shares for r in share]
    return [c for _, c in sorted(rows, key=lambda x: x[0])]


def file_comparisons(data, cmp_path):
    """--data's preferences (TRL / HH pairs as rankings of two, or comparisons like these), else an earlier
    run's, read by data.readers; one K for all, and answers that differ (else the spread of rewards is 0)."""
    path = data or cmp_path
    if not data and not os.path.isfile(cmp_path):
        sys.exit(f"error: {cmp_path} not found; a run with --collect=True, not --resume, samples them")
    comps = or_exit(read_rankings, path)
    if len({len(c["ranking"]) for c in comps}) != 1:
        sys.exit(f"error: {path}: every comparison must rank the same number of responses")
    if all(len(set(zip(c["responses"], c["ended"]))) == 1 for c in comps):
        sys.exit(f"error: {path}: no comparison carries a preference (in each, every answer is the same)")
    return comps


def held_out_split(prompts, fraction, n_train, seed):
    """(held-out, train) comparison indices: a seeded `fraction` of the distinct prompts (at least one), with
    ALL their comparisons (a file may rank a prompt often); train: the first n_train (0 = all) of the rest."""
    groups = {}
    for i, p in enumerate(prompts):
        groups.setdefault(repr(p), []).append(i)
    g, n = list(groups.values()), max(1, round(fraction * len(groups)))
    perm = torch.randperm(len(g), generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(i for k in perm[:n] for i in g[k]), [i for k in perm[n:] for i in g[k]][:n_train or None]


def yardsticks(comps, val_idx, seed, tau):
    """What the reward model is measured against on the world, never trained on: gold (N, K), the hidden
    human's utility of every answer, and parts, its components (ranked order; the report also looks at the
    training comparisons); and a second labeler's ranking of the held-out answers as scores (n_val, K)."""
    K = len(comps[0]["ranking"])
    answers = [[(c["prompt"], c["responses"][k], c["ended"][k]) for k in c["ranking"]] for c in comps]
    gold = torch.tensor([[world.gold(*a) for a in row] for row in answers])
    parts = [[world.gold_components(*a) for a in row] for row in answers]
    second = torch.zeros(len(val_idx), K)
    for n, i in enumerate(val_idx):
        c, rng = comps[i], random.Random(f"second-{seed}-{i}")  # another labeler's own stream
        again = world.rank(c["prompt"], c["responses"], rng, ended=c["ended"], tau=tau)
        second[n] = torch.tensor([float(K - again.index(k)) for k in c["ranking"]])  # best highest
    return gold, parts, second


def get_batch(it, train_idx, rows, lp, batch_size, steps_per_epoch, seed, rt, pad_id):
    """Step it's prompts for this rank, all K answers of each in ranked order: ids, attn (B*K, T), padded on
    the right, and log p_SFT (B, K). A fresh permutation per epoch, seeded by it: --resume redraws them. An
    epoch is whole batches, each ranking at most once (% wraps only if one step wants more than there are)."""
    e, s = divmod(it, steps_per_epoch)
    order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed * 1000 + e)).tolist()
    first = (s * rt.world_size + rt.rank) * batch_size
    picks = [train_idx[order[(first + b) % len(order)]] for b in range(batch_size)]
    ids, attn = M.pad_rows([r for i in picks for r in rows[i]], pad_id)
    return ids.to(rt.device), attn.to(rt.device), lp[picks].to(rt.device)


def rewards(rm, rows, lp, lm_weight, pad_id, ctx):
    """The unnormalised reward, head + lm_weight * log p_SFT, of the answers of some comparisons (rows[n]: the
    K token rows of comparison n; lp (N, K)): (N, K) fp32 on the CPU, ranked order, no gradients."""
    rm.eval()  # no dropout while scoring; back to training mode after
    with ctx:
        r = score_rows(rm, [row for rs in rows for row in rs], pad_id, batch_size=256)
    rm.train()
    return r.view(len(rows), -1) + lm_weight * lp


def held_out_metrics(r, loss_fn, first, golds):
    """Loss, and the pairs ordered as the labeler did (first) and as gold does, for rewards r (n_val, K)."""
    return {"val_loss": loss_fn(r).item(), "val_acc": pairwise_accuracy(r, first),
            "val_acc_gold": pairwise_accuracy(r, golds) if golds is not None else None}


def save_reward(path, rm, optimizer, rt, sft_ck, config, step, K, loss, lm_weight, norm=None, metrics=None):
    """The reward checkpoint. Those saved while training (norm None; for --resume) have gain 1, bias 0 and
    "normalised": False, which runtime.load_reward_model refuses; the final one norm = (gain, bias), True."""
    gain, bias = norm or (1.0, 0.0)
    runtime.save_checkpoint(path, {
        **runtime.training_state(rm, optimizer, rt.scaler, os.path.splitext(path)[0] + ".jsonl"),  # its log
        "config": config, "kind": "reward", "step": step,
        "model_args": {**sft_ck["model_args"], "scalar_head": True, "dropout": 0.0},
        "tokenizer": sft_ck.get("tokenizer", "world"), "K": K, "loss": loss, "gain": gain, "bias": bias,
        "normalised": norm is not None, "lm_weight": lm_weight, "metrics": metrics or {},
        "sft_fingerprint": sft_ck["fingerprint"]})  # which SFT model it judges


def report(r, gain, bias, term, loss_fn, comps, val_idx, train_idx, first, gold, parts, second):
    """Print and return how the trained reward r (N, K) does against the labelers and gold, calibration, and
    gold accuracy by component (low on training comparisons too: underfit; high there only: memorised)."""
    K, n_val, golds = r.size(1), len(val_idx), gold[val_idx] if gold is not None else None
    m = {**held_out_metrics(r[val_idx], loss_fn, first, golds), "calibration": calibration(r[val_idx])}
    n_prompts = len({repr(comps[i]["prompt"]) for i in val_idx})  # a file may rank a prompt's answers twice
    print(f"\nreward model on {n_val} held-out rankings of {n_prompts} prompts ({n_val * K * (K - 1) // 2} "
          "pairs):")
    zero = loss_fn(torch.zeros(1, K)).item()  # ln 2 for Bradley-Terry, ln(K!)/(K-1) for Plackett-Luce
    print(f"  held-out loss {m['val_loss']:.3f} (from {zero:.3f} with a zero head)")
    print(f"  agrees with the labelers on {m['val_acc']:.1%} of pairs")
    if gold is not None:
        m["ceiling_labelers"], m["labeler_acc_gold"] = (pairwise_accuracy(first, t) for t in (second, golds))
        print(f"  two labelers agree with each other on {m['ceiling_labelers']:.1%} (the ceiling)")
        shown = ("n/a" if a is None else f"{a:.1%}" for a in (m["val_acc_gold"], m["labeler_acc_gold"]))
        print("  agrees with the gold ordering on {} of pairs with distinct gold; a single labeler does "
              "on {}".format(*shown))  # n/a: every held-out pair ties in gold, nothing to measure
        for key, idx, what in (("acc_gold_by_part", val_idx, "on pairs that differ most in"),
                               ("acc_gold_by_part_train", train_idx, "and on its own training comparisons:")):
            m[key] = accuracy_by_part(r[idx], gold[idx], [parts[i] for i in idx])
            print(f"  ... {what} " + ", ".join(f"{k} {a:.1%} ({n})" for k, (a, n) in m[key].items()))
    print("  calibration: predicted P(labeler agrees) -> observed")
    for lo, hi, n, p, seen in m["calibration"]:
        print(f"    [{lo:.1f}, {hi:.1f}]  {n:4d} pairs  predicted {p:.2f}  observed {seen:.2f}")
    print(f"  normalised as {gain:.3f} * {term} {'-' if bias < 0 else '+'} {abs(bias):.3f} "
          f"(mean 0, std 1 on {r.numel()} ranked answers)")
    for i in val_idx[:3]:
        print(f"  {comps[i]['prompt'][-1]['content'][:160]!r}")  # a file's text: cut, escapes shown
        for place, k in enumerate(comps[i]["ranking"]):
            g = f", gold {gold[i, place]:.2f}" if gold is not None else ""
            print(f"    #{place + 1} by the labeler, reward {gain * r[i, place].item() + bias:+.2f}{g}: "
                  f"{comps[i]['responses'][k][:160]!r}")
    return m


def best_of_n_on_held_out(policy, rm, enc, n, gain, bias, lm_weight, max_new_tokens, temperature, gen_batch,
                          rt, generator):
    """Best-of-n (rejection sampling) on the world's held-out prompts: the reward model picks one of n SFT
    samples; the hidden human judges it against one SFT sample, and against gold's own pick (a perfect RM)."""
    evals = world.prompts("eval")
    with rt.ctx:
        picks = best_of_n(policy, rm, enc, evals, n, gain, bias, max_new_tokens, temperature,
                          generator=generator, batch_size=gen_batch, lm_weight=lm_weight, desc=f"best-of-{n}")
        one = sample_and_grade(policy, enc, evals, max_new_tokens, temperature, gen_batch, generator)
    gold_bon, gold_one = ([s["gold"] for s in samples] for samples in (grade(evals, picks), one["samples"]))
    golds = [[world.gold(p, x["text"], x["ended"]) for x in c["candidates"]] for p, c in zip(evals, picks)]
    rate, ci = world.win_rate(gold_bon, gold_one)
    oracle_rate, _ = world.win_rate(list(map(max, golds)), gold_one)
    res = {"bon": n, "bon_gold": sum(gold_bon) / len(evals), "bon_win_rate": rate, "bon_win_ci": ci,
           "sft_gold": sum(map(sum, golds)) / (n * len(evals)),
           "oracle_gold": sum(map(max, golds)) / len(evals), "oracle_win_rate": oracle_rate}
    print(f"\nbest-of-{n} on {len(evals)} held-out prompts, judged by the hidden human (ideal = 1.0):")
    print(f"  SFT sample mean gold {res['sft_gold']:.3f}; RM's pick {res['bon_gold']:.3f}; "
          f"gold's own pick (the ceiling) {res['oracle_gold']:.3f}")
    print(f"  RM's pick beats a single SFT sample {rate:.1%} +- {percent(ci)} of the time (ties count half; "
          f"gold's own pick would {oracle_rate:.1%})")
    for p, x in list(zip(evals, picks))[:3]:
        print(f"  {p[-1]['content']} -> {x['text']!r} (reward {x['score']:+.2f})")
    return res


def main():
    config = runtime.configure(globals(), ranges={
        "loss": (lambda v: v in LOSSES, f"one of {', '.join(LOSSES)}"),
        "K": (lambda v: v >= 2, ">= 2: a labeler ranks several answers"),
        "bon": (lambda v: v >= 0 and (train or v > 0), ">= 0; > 0 with --train=False (e.g. --bon=16)"),
        "out_dir": (lambda v: runtime.writable_dir(v) or not train and os.path.isdir(v), "writable")})
    sft_path, cmp_path, ck_path, log_path = (os.path.join(out_dir, f) for f in
                                             ("sft.pt", "comparisons.jsonl", "reward.pt", "reward.jsonl"))
    # a file is read, and the prompts counted, first: one line before SFT is built or comparisons rewritten
    comps = file_comparisons(data, cmp_path) if train and (data or not collect or resume) else None
    ck = runtime.load_checkpoint(ck_path, "reward", need=runtime.RESUME) if train and resume else None
    pool = world.prompts("train", contexts=contexts)[:n_prompts or None] if train and comps is None else []
    if pool and max(1, round(val_fraction * len(pool))) >= len(pool):
        sys.exit(f"error: --n_prompts={n_prompts} leaves none to train on with --val_fraction={val_fraction}")
    rt = runtime.setup(device, dtype, seed)
    runtime.ensure_checkpoint(sft_path, "sft.py", out_dir)  # rank 0 builds it if missing, the others wait
    policy, enc, sft_ck = runtime.load_model(sft_path, "sft", dropout=0.0)
    sft_ck["fingerprint"] = runtime.fingerprint(sft_ck["model"])  # once: saved with the reward model
    if ck:  # another network or SFT model: one line, before any answer is read as tokens
        runtime.trained_from(ck_path, ck, sft_ck)
    policy.to(rt.device).eval().requires_grad_(False)
    eot, block = enc.eot_token, sft_ck["model_args"]["block_size"]
    prompts_fit("", pool + world.prompts("eval") * (bon > 0), enc, block, max_new_tokens)  # before sampling
    t0, watch = time.time(), runtime.Stopwatch(rt.device_type, rt.master)  # watch: where the time goes

    if train:
        # ---- 1. comparisons: K answers per prompt from SFT, ranked by a labeler (or pairs from a file)
        if comps is None:
            gen = torch.Generator(device=rt.device).manual_seed(seed + rt.rank)
            comps = collect_comparisons(policy, enc, pool, rt, gen, K, max_new_tokens, temperature,
                                        labeler_tau, seed, gen_batch, watch.lap)
            if rt.master:
                write_jsonl(cmp_path, comps)
                print(f"wrote {len(comps)} rankings of {K} answers to {cmp_path} ({time.time() - t0:.0f}s)")
        Kc = len(comps[0]["ranking"])
        val_idx, train_idx = held_out_split([c["prompt"] for c in comps], val_fraction, n_train, seed)
        if not train_idx:  # e.g. a file of one pair: all of it is held out
            sys.exit(f"error: {data or cmp_path}: nothing left to train on after holding out {len(val_idx)}")
        flat = response_rows(enc, [(c["prompt"], c["responses"][k], c["ended"][k]) for c in comps
                                   for k in c["ranking"]], block, data or cmp_path, rt.master)[0]
        rows = [flat[n * Kc:(n + 1) * Kc] for n in range(len(comps))]  # rows[n]: its answers, best first
        lp = torch.zeros(len(comps), Kc)  # --lm_feature: log p_SFT of all answers (N, K), once: SFT is frozen
        if lm_feature:  # as every stage computes it: rollout.reply_logprobs on the reply's text
            lp = reply_logprobs(policy, enc, [c["prompt"] for c in comps for _ in c["ranking"]],
                                [{"text": c["responses"][k], "ended": c["ended"][k]}
                                 for c in comps for k in c["ranking"]]).view(-1, Kc)
        first = torch.arange(Kc, 0, -1.0).expand(len(val_idx), Kc)  # the labeler's ranking as scores
        gold, parts, second = (None,) * 3 if data else yardsticks(comps, val_idx, seed, labeler_tau)
        golds = gold[val_idx] if gold is not None else None
        watch.lap("tokens & gold yardsticks")

        # ---- 2. the reward model: the SFT network with a scalar head that starts at zero (loss from ln 2)
        raw_rm = runtime.model_from_checkpoint(sft_ck, scalar_head=True, dropout=dropout).to(rt.device)
        optimizer = runtime.configure_optimizer(raw_rm, weight_decay, lr, (beta1, beta2), rt.device_type)
        lm_w = torch.zeros((), device=rt.device, requires_grad=lm_feature)  # the weight w of log p_SFT
        if lm_feature:  # w gets a 100x step: Adam moves a weight about lr per step, too little for w here
            optimizer.add_param_group({"params": [lm_w], "weight_decay": 0.0, "lr_scale": 100.0})
        start, loss_fn = 0, LOSSES[loss]
        if resume:
            start = runtime.restore(ck, raw_rm, optimizer, rt.scaler)
            lm_w.data.fill_(ck.get("lm_weight", 0.0))
            print(f"resuming from {ck_path} at step {start}")
        rm = runtime.wrap(raw_rm, rt, compile)
        steps_per_epoch = max(1, len(train_idx) // (batch_size * rt.world_size))
        iters = max_iters or epochs * steps_per_epoch
        if rt.master:  # the run has started: a fresh log, or a resumed run's rows up to its checkpoint
            runtime.start_log(log_path, start if resume else None, ck if resume else None)
            print(f"{len(train_idx)} train / {len(val_idx)} held-out rankings of {Kc} answers; {iters} steps "
                  f"of {batch_size * rt.world_size} rankings, loss {loss}, device {rt.device}")
        runtime.warn_short_schedule(iters, warmup_iters, rt.master and not max_iters)  # a count from the data
        bar = tqdm(range(start, min(iters, stop_at or iters)), initial=start, total=iters,  # stop_at: killed
                   disable=not rt.master, desc="reward")
        for it in bar:
            for group in optimizer.param_groups:
                group["lr"] = runtime.get_lr(it, warmup_iters, iters, lr, min_lr) * group.get("lr_scale", 1.0)
            ids, attn, lp_b = get_batch(it, train_idx, rows, lp, batch_size, steps_per_epoch, seed, rt, eot)
            with rt.ctx:
                r = rm_score(rm, ids, attn).float().view(batch_size, Kc) + lm_w * lp_b  # (B, K), ranked
            l = loss_fn(r)
            rt.scaler.scale(l).backward()
            if rt.ddp and lm_feature:  # DDP averages the network's gradients; w lives outside it
                torch.distributed.all_reduce(lm_w.grad.div_(rt.world_size))  # a sum of shares: the mean
            norm = runtime.optimizer_step(rm, optimizer, rt.scaler, grad_clip)
            runtime.check_finite("reward", it + 1, "a lower --lr", loss=l.detach(), grad_norm=norm)
            watch.lap("training")
            if rt.master:
                val = dict.fromkeys(("val_loss", "val_acc", "val_acc_gold"))
                if (it + 1) % eval_interval == 0 or it + 1 in (iters, stop_at):
                    r_val = rewards(raw_rm, [rows[i] for i in val_idx], lp[val_idx], lm_w.item(), eot, rt.ctx)
                    val = held_out_metrics(r_val, loss_fn, first, golds)
                    bar.set_postfix(loss=f"{l.item():.3f}", val=f"{val['val_loss']:.3f}")
                acc = pairwise_accuracy(r.detach().cpu(), first[:1].expand(batch_size, Kc))  # this batch
                runtime.append_jsonl(log_path, {
                    "iter": it + 1, "loss": l.item(), "acc": acc, "grad_norm": norm, **val,
                    "lr": optimizer.param_groups[0]["lr"], "time": time.time() - t0})
                if (it + 1) % eval_interval == 0 or it + 1 == stop_at:  # for --resume: not normalised yet
                    save_reward(ck_path, raw_rm, optimizer, rt, sft_ck, config, it + 1, Kc, loss, lm_w.item())
            watch.lap("held-out & checkpoints")
        if 0 < stop_at < iters:  # "killed": no normalisation, report or best-of-N
            return

        if rt.master:
            # ---- 3. normalise on every ranked answer (SFT's, or --data's): gain * r + bias, mean 0, std 1
            lm_weight = lm_w.item()
            r_all = rewards(raw_rm, rows, lp, lm_weight, eot, rt.ctx)  # (N, K): head + w * log p_SFT
            runtime.check_finite("reward", iters, "a lower --lr", reward=r_all)
            gain, bias = normalisation(r_all)
            # ---- 4. report: the reward model against the labelers, against gold, and the labelers' ceiling
            term = f"(head + {lm_weight:.4f} * log p_SFT)" if lm_feature else "r"
            metrics = report(r_all, gain, bias, term, loss_fn, comps, val_idx, train_idx, first, gold, parts,
                             second)
            save_reward(ck_path, raw_rm, optimizer, rt, sft_ck, config, iters, Kc, loss, lm_weight,
                        (gain, bias), {**metrics, "time": time.time() - t0})
            watch.report("reward", last="scoring all & report")  # every answer: the normalisation
    elif rt.master:  # --train=False: the normalised reward model on disk, for best-of-N
        raw_rm, ck = runtime.load_reward_model(ck_path, rt.device, sft_ck)
        gain, bias, lm_weight = ck["gain"], ck["bias"], ck.get("lm_weight", 0.0)

    # ---- 5. best-of-N (rejection sampling) on held-out prompts: the RM picks, the hidden human judges
    if rt.master and bon > 0:
        g = torch.Generator(device=rt.device).manual_seed(seed + 1)
        res = best_of_n_on_held_out(policy, raw_rm.eval(), enc, bon, gain, bias, lm_weight, max_new_tokens,
                                    temperature, gen_batch, rt, g)
        if train:
            ck = runtime.load_checkpoint(ck_path, "reward")
            runtime.save_checkpoint(ck_path, {**ck, "metrics": {**ck["metrics"], **res}})


if __name__ == "__main__":
    runtime.run(main)
