"""
Stage 3': Direct Preference Optimization on the same comparisons, starting from SFT -> out/dpo.pt

Rafailov et al. 2023, https://arxiv.org/abs/2305.18290. The KL-regularised objective that PPO maximises,
max_pi E_{x, y~pi}[r(x, y)] - beta KL(pi(.|x) || pi_ref(.|x)), has the optimal policy
pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x). Solved for the reward,
r = beta log pi*/pi_ref + beta log Z(x), and put into Bradley-Terry, Z(x) cancels, and the reward model's
loss becomes a loss on the policy itself (eq. 7):

    L_DPO = -E log sigma( beta log pi(y_w|x) / pi_ref(y_w|x) - beta log pi(y_l|x) / pi_ref(y_l|x) )

The default is the paper's recipe: offline, on reward.py's comparisons (a ranking of K answers gives all its
K(K-1)/2 pairs, the higher-ranked answer chosen), the SFT model as the reference, the sigmoid loss. No reward
model is loaded and nothing is sampled while training; the frozen reference scores each answer once, up front.

    python dpo.py                        # builds sft.pt and comparisons.jsonl first if missing
    python dpo.py --loss=ipo             # IPO instead of the sigmoid loss
    python dpo.py --label_smoothing=0.1  # conservative DPO: assume 10% of the labels are flipped
    python dpo.py --rpo_alpha=1          # + RPO's NLL term on the chosen answers
    python dpo.py --online_rounds=8      # online DPO after the offline pass (reads out_dir/reward.pt)
    python dpo.py --data=prefs.jsonl     # TRL {"prompt", "chosen", "rejected"} or Anthropic HH pairs
    torchrun --nproc_per_node=2 dpo.py   # DDP (gloo on CPU, nccl on GPUs)

Departures from the paper, each a flag and off by default:
  --loss=ipo          IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036): regress the log-ratio margin
                      to 1/(2 beta) instead of pushing it to infinity, DPO's overfit on deterministic labels.
  --label_smoothing   conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences",
                      https://ericmitchell.ai/cdpo.pdf): the labels are flipped with this probability.
  --rpo_alpha         RPO's NLL term (Pang et al. 2024, https://arxiv.org/abs/2404.19733): DPO only asks that
                      chosen beat rejected; the chosen answers' per-token NLL keeps them likely outright.
  --online_rounds     iterative DPO (Xiong et al. 2024, https://arxiv.org/abs/2312.11456; Dong et al. 2024,
                      https://arxiv.org/abs/2405.07863): offline DPO never sees the answers it comes to
                      write. Each round the policy answers online_prompts training prompts online_k times;
                      the reward model ranks them (not ending costs no_end_penalty, as in PPO), and
                      best-vs-worst pairs feed the same loss.
The paper's optimizer (RMSprop, lr 1e-6, batch 64, 150 warmup steps; App. B) is replaced by AdamW, a cosine
schedule, a larger lr, batches of 32 and 10 warmup steps: a small model's settings.
"""
import json
import os
import time
import zlib

import torch
import torch.nn.functional as F
from tqdm import tqdm

import runtime
from data import world
from data.chat import render_prompt, render_response
from data.readers import or_exit, read_rankings
from rollout import (by_length, compare_to_sft, prompts_fit, respond, response_logps, response_rows,
                     reward_scores)

# -----------------------------------------------------------------------------
# config (every name can be overridden with --name=value)
out_dir = "out"            # reads sft.pt and comparisons.jsonl here, writes dpo.pt and dpo.jsonl
data = ""                  # "" = out_dir/comparisons.jsonl (reward.py); or a TRL / Anthropic HH JSONL
seed = 1337                # the pairs' order and the online rounds' samples
device = "auto"            # auto: cuda > mps > cpu
dtype = "auto"             # fp32 on CPU; log-probs and losses are always fp32
compile = False            # torch.compile the policy (CUDA)
loss = "sigmoid"           # "sigmoid" (DPO, the paper) or "ipo" (a departure)
beta = 0.5                 # KL strength: the paper's TL;DR value (0.1 for its dialogue task, App. B); here
                           # 0.1 at this lr drifted from SFT and lost fluency (docs/experiments.md)
label_smoothing = 0.0      # conservative DPO: the probability that a label is flipped (sigmoid loss only)
rpo_alpha = 0.0            # weight of the chosen answers' per-token NLL (RPO, a departure); 0 = pure DPO
batch_size = 32            # preference pairs per micro-batch (per process); each pair is two sequences
grad_accum = 1             # micro-batches per optimizer step
epochs = 0.5               # passes over the pairs (if max_iters = 0): each answer is in K - 1 of them
max_iters = 0              # optimizer steps; 0 = as many as `epochs` takes
lr, min_lr = 1e-4, 1e-5    # peak learning rate, cosine-decayed to min_lr; higher ones (or a smaller beta)
                           # let pure DPO drift onto text neither answer contained and lose fluency
warmup_iters = 10          # linear warmup while Adam's moment estimates are still noisy
weight_decay = 0.0         # the pull toward SFT is the KL term's job, not weight decay's
grad_clip = 1.0            # clip the global gradient norm (0 = off)
eval_fraction = 0.1        # share of prompts whose pairs are held out (chosen by a hash of the prompt)
eval_interval = 50         # held-out pairs evaluated and checkpoint written every this many steps
max_new_tokens = 48        # answer length in the final SFT-vs-DPO comparison (and in the online rounds)
eval_samples = 1           # answers per held-out world prompt in that comparison
n_eval = 0                 # held-out world prompts in that comparison (0 = all of them)
online_rounds = 0          # rounds of online DPO after the offline pass (a departure; reads reward.pt)
online_prompts = 256       # training prompts per round, taken in turn (more: slower, no better)
online_k = 6               # answers sampled per prompt, ranked by the reward model (>= 2 x online_pairs;
                           # more: slower, no better; docs/experiments.md)
online_pairs = 2           # pairs per prompt: best vs worst, second best vs second worst (<= online_k / 2)
online_lr = 2e-4           # online steps' lr, decayed linearly to a quarter; above the offline lr (capped by
                           # drift onto text neither answer held): these pairs are the policy's own answers
no_end_penalty = 1.0       # online ranking: taken off the normalised score of an answer that never ends
resume = False             # continue from out_dir/dpo.pt (model, optimizer, step, online round, RNG)
# -----------------------------------------------------------------------------

def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, label_smoothing=0.0):
    """DPO's loss per pair, eq. 7 of Rafailov et al. 2023 (https://arxiv.org/abs/2305.18290):
    -log sigma(beta h), h = log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x), from summed answer
    log-probs (all (B,) fp32). label_smoothing eps > 0 is conservative DPO (Mitchell 2023,
    https://ericmitchell.ai/cdpo.pdf): the same cross-entropy against a soft label, each label flipped with
    probability eps: -(1 - eps) log sigma(beta h) - eps log sigma(-beta h). Returns (B,)."""
    h = (pi_c - ref_c) - (pi_r - ref_r)  # log-ratio margin: how much more the policy moved toward chosen
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(pi_c, pi_r, ref_c, ref_r, beta):
    """IPO's loss per pair, (h - 1/(2 beta))^2 (Azar et al. 2023, Sec. 5, https://arxiv.org/abs/2310.12036),
    h as in dpo_loss, from SUMMED log-probs as in the paper (TRL averages over tokens for IPO). A squared loss
    regresses h toward 1/(2 beta) from either side, a finite optimum: a pair ranked by more than that is
    pulled back, where DPO keeps pushing h up on every pair. (B,)."""
    return ((pi_c - ref_c) - (pi_r - ref_r) - 1 / (2 * beta)) ** 2


def nll_term(pi_c, n_tokens):
    """RPO's NLL term per pair (Pang et al. 2024, Sec. 2, https://arxiv.org/abs/2404.19733):
    -log pi(y_w|x) / |y_w|, the chosen answer's per-token NLL over its tokens (its <|end|> if it ended its
    turn, none of the prompt's), weighted by alpha as TRL's rpo_alpha (TRL pools a whole batch's tokens). An
    empty answer (stopped at once, without ending its turn) has log-prob 0, its count is clamped to 1: 0."""
    return -pi_c / n_tokens.clamp(min=1)


def implicit_reward(pi, ref, beta):
    """DPO's implicit reward r(x, y) = beta log pi(y|x) / pi_ref(y|x) (Rafailov et al. 2023, eq. 5 without
    the beta log Z(x) that cancels in every comparison, https://arxiv.org/abs/2305.18290). Returns (B,)."""
    return beta * (pi - ref)


def preference_loss(pi_c, pi_r, ref_c, ref_r, n_c, loss_type, beta, label_smoothing, rpo_alpha):
    """The training objective, means over the pairs: (total, preference part), where total = DPO or IPO
    + rpo_alpha * NLL of the chosen answers (n_c: their token counts)."""
    if loss_type == "sigmoid":
        pref = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, label_smoothing).mean()
    elif loss_type == "ipo":
        pref = ipo_loss(pi_c, pi_r, ref_c, ref_r, beta).mean()
    else:
        raise ValueError(f"unknown loss {loss_type!r}: expected 'sigmoid' or 'ipo'")
    total = pref + rpo_alpha * nll_term(pi_c, n_c).mean() if rpo_alpha else pref  # RPO adds the NLL term
    return total, pref


def held_out(prompt, fraction):
    """In the held-out ~fraction? By a hash of the prompt's text: the same everywhere, for all its pairs."""
    return zlib.crc32(json.dumps(prompt, sort_keys=True).encode()) % 1000 < 1000 * fraction


def load_pairs(path):
    """Preference data as (responses [(prompt, text, ended)], pairs [(prompt, chosen index, rejected index)]).
    A ranking of K answers gives all K(K-1)/2 pairs, the higher-ranked one chosen: each pair is a
    Bradley-Terry observation implied by the Plackett-Luce ranking, as in InstructGPT's reward model."""
    responses, pairs = [], []
    for row in read_rankings(path):  # a TRL / HH pair is a ranking of two
        base, r = len(responses), row["ranking"]
        responses += [(row["prompt"], t, e) for t, e in zip(row["responses"], row["ended"])]
        pairs += [(row["prompt"], base + r[i], base + r[j])
                  for i in range(len(r)) for j in range(i + 1, len(r))]
    # two identical answers carry no preference (their log-ratios cancel exactly): drop them
    pairs = [p for p in pairs if responses[p[1]][1:] != responses[p[2]][1:]]
    return responses, pairs


def best_and_worst(scores, replies, k, n=1, no_end_penalty=0.0):
    """Online DPO's pairs: for each prompt's k consecutive replies, (chosen, rejected) indices by score, a
    reply that never ended its turn losing no_end_penalty (as in PPO): the best against the worst, then
    (n = 2) the second best against the second worst, and so on (n <= k/2, so no reply is in two pairs). Two
    replies that tie, or are the same text (the policy wrote one answer twice), give no pair."""
    s = [x - no_end_penalty * (not r["ended"]) for x, r in zip(scores, replies)]
    pairs = []
    for i in range(0, len(replies), k):
        order = sorted(range(i, i + k), key=lambda j: -s[j])
        for b, w in zip(order[:n], order[::-1][:n]):
            same = (replies[b]["text"], replies[b]["ended"]) == (replies[w]["text"], replies[w]["ended"])
            if s[b] > s[w] and not same:
                pairs.append((b, w))
    return pairs


def epoch_batches(pair_len, batch_size, seed, epoch):
    """One epoch's micro-batches of pair indices. Rows are padded to the longest in their batch, so pairs of
    similar length go together (HF's group_by_length) rather than pad short answers to long ones: shuffle,
    sort windows of 50 batches by length, cut into batches, shuffle the batches."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm, win = torch.randperm(len(pair_len), generator=g).tolist(), 50 * batch_size
    perm = [i for s in range(0, len(perm), win) for i in sorted(perm[s:s + win], key=pair_len.__getitem__)]
    cut = [perm[s:s + batch_size] for s in range(0, len(perm), batch_size)]
    return [cut[i] for i in torch.randperm(len(cut), generator=g).tolist()]


@torch.no_grad()
def answer_logps(model, rows, masks, pad_id, rt, desc=None):
    """Summed answer log-probs without gradients, (N,) fp32, batched by length (by_length); desc labels
    a progress bar. The frozen reference scores each answer ONCE, up front: at every step it would add a
    forward pass to each step's forward and backward."""
    out = torch.zeros(len(rows), device=rt.device)
    for idx in tqdm(by_length(rows, 64), desc=desc, disable=not (rt.master and desc), leave=False):
        with rt.ctx:
            lp = response_logps(model, [rows[i] for i in idx], [masks[i] for i in idx], pad_id, rt.device)
        out[idx] = lp.float()
    return out


def pair_logps(policy, pb, answers, pad_id, device):
    """(pi_c, pi_r, ref_c, ref_r, n_c) of a batch of pairs (B, 2) in ONE forward, chosen rows over rejected
    rows; answers = (rows, masks, ref_logps) of every answer; n_c = the chosen answers' token counts."""
    rows, masks, ref_logps = answers
    c, r = pb[:, 0].tolist(), pb[:, 1].tolist()
    both = c + r
    logps = response_logps(policy, [rows[i] for i in both], [masks[i] for i in both], pad_id, device).float()
    n_c = torch.tensor([float(sum(masks[i])) for i in c], device=device)
    return logps[:len(c)], logps[len(c):], ref_logps[pb[:, 0]], ref_logps[pb[:, 1]], n_c


def pair_stats(pref, pi_c, pi_r, ref_c, ref_r, beta):
    """The logged statistics. "loss" is the preference part (DPO's or IPO's) alone, so that runs with and
    without --rpo_alpha compare: the NLL term RPO adds is minimised, not logged."""
    rc, rr = implicit_reward(pi_c, ref_c, beta).detach(), implicit_reward(pi_r, ref_r, beta).detach()
    return {"loss": pref.item(), "rewards/chosen": rc.mean().item(), "rewards/rejected": rr.mean().item(),
            # strict: with policy = reference both rewards are 0, no pair is won yet
            "accuracy": (rc > rr).float().mean().item(), "margin": (rc - rr).mean().item(),
            "logps/chosen": pi_c.mean().item(), "logps/rejected": pi_r.mean().item()}


@torch.no_grad()
def evaluate_pairs(policy, val_pairs, answers, pad_id, rt, hp):
    """Preference loss, accuracy and margin on all the held-out pairs. An answer ranked among K is in K - 1
    pairs, so each distinct answer is scored once."""
    if len(val_pairs) == 0:
        return {"loss": None, "accuracy": None, "margin": None}
    rows, masks, ref = answers
    ids = sorted(set(val_pairs.flatten().tolist()))
    pi = torch.zeros(len(rows), device=rt.device)  # the policy's summed log-prob of each answer scored
    policy.eval()
    pi[ids] = answer_logps(policy, [rows[i] for i in ids], [masks[i] for i in ids], pad_id, rt)
    policy.train()
    c, r = val_pairs[:, 0], val_pairs[:, 1]
    n_c = torch.tensor([float(sum(masks[i])) for i in c.tolist()], device=rt.device)
    _, pref = preference_loss(pi[c], pi[r], ref[c], ref[r], n_c, **hp)
    s = pair_stats(pref, pi[c], pi[r], ref[c], ref[r], hp["beta"])
    return {k: s[k] for k in ("loss", "accuracy", "margin")}


def train_step(policy, optimizer, rt, micro_batches, answers, pad_id, lr_now, grad_clip, step, hp):
    """One optimizer step over the micro-batches of pairs ((B, 2) index tensors); stops the stage at the first
    non-finite loss or gradient norm. Returns the means of the logged statistics."""
    for group in optimizer.param_groups:
        group["lr"] = lr_now
    acc, total_sum = [], 0.0
    for m, pb in enumerate(micro_batches):
        if rt.ddp:  # all-reduce gradients only on the last micro-step
            policy.require_backward_grad_sync = m == len(micro_batches) - 1
        with rt.ctx:
            pi_c, pi_r, ref_c, ref_r, n_c = pair_logps(policy, pb, answers, pad_id, rt.device)
        total, pref = preference_loss(pi_c, pi_r, ref_c, ref_r, n_c, **hp)
        rt.scaler.scale(total / len(micro_batches)).backward()
        total_sum += total.item()
        acc.append(pair_stats(pref, pi_c, pi_r, ref_c, ref_r, hp["beta"]))
    norm = runtime.optimizer_step(policy, optimizer, rt.scaler, grad_clip)  # the one step; returns |grad|
    runtime.check_finite("dpo", step, "a lower --lr or a larger --beta", loss=total_sum, grad_norm=norm)
    return {k: sum(a[k] for a in acc) / len(acc) for k in acc[0]}


def save(path, policy, optimizer, rt, config, sft_ck, step, rnd=0, per_round=0):
    state = runtime.training_state(policy, optimizer, rt.scaler, os.path.splitext(path)[0] + ".jsonl")  # log
    runtime.save_checkpoint(path, {**state, "config": config, "kind": "dpo", "step": step, "round": rnd,
                                   "per_round": per_round, "sft_fingerprint": sft_ck["fingerprint"],
                                   "model_args": sft_ck["model_args"],
                                   "tokenizer": sft_ck.get("tokenizer", "world")})


def online_round(policy, ref, rm, rm_ck, enc, prompts, rnd, answers, rt, n_prompts, k, n_pairs,
                 max_new_tokens, no_end_penalty, block_size, seed, lap=lambda phase: None):
    """One round of online DPO: this rank's share of n_prompts training prompts (taken in turn), k answers
    each sampled from the policy at temperature 1, ranked by the reward model (not ending costs
    no_end_penalty), n_pairs best-vs-worst pairs per prompt. Returns NEW answers (rows, masks, ref_logps)
    extended by the round's, the round's pairs (P, 2) as indices into them, and the mean reward score."""
    rows, masks, ref_logps = answers  # every answer so far: token ids, answer mask, reference log-prob
    mine = [prompts[(rnd * n_prompts + i) % len(prompts)] for i in range(rt.rank, n_prompts, rt.world_size)]
    convs = [p for p in mine for _ in range(k)]
    g = torch.Generator(device=rt.device).manual_seed(seed + 1000 * (rnd + 1) + rt.rank)
    chunks = tqdm(range(0, len(convs), 256), f"round {rnd + 1} sampling", disable=not rt.master, leave=False)
    replies = [r for s in chunks  # (generate samples in eval mode and restores the mode)
               for r in respond(policy, enc, convs[s:s + 256], max_new_tokens, 1.0, generator=g)]
    lap("sampling")
    new_rows, new_masks = map(list, zip(*(render_response(enc, c, r["text"], r["ended"], block_size)
                                          for c, r in zip(convs, replies))))
    new_ref = answer_logps(ref, new_rows, new_masks, enc.eot_token, rt, f"round {rnd + 1} reference")
    scores = reward_scores(rm, enc, convs, replies, rm_ck["gain"], rm_ck["bias"],
                           lm_weight=rm_ck.get("lm_weight", 0.0), sft=ref)
    pairs = best_and_worst(scores.tolist(), replies, k, n_pairs, no_end_penalty)
    lap("scoring")
    pairs = torch.tensor([(len(rows) + b, len(rows) + w) for b, w in pairs], dtype=torch.long).view(-1, 2)
    return (rows + new_rows, masks + new_masks, torch.cat([ref_logps, new_ref])), pairs, scores.mean().item()


def main():
    # ---- 1. options, then the inputs: sft.pt and the comparisons (built if missing)
    config = runtime.configure(globals(), ranges={
        "loss": (lambda v: v in ("sigmoid", "ipo"), "'sigmoid' or 'ipo'"), "beta": (lambda v: v > 0, "> 0"),
        "online_prompts": (lambda v: v >= int(os.environ.get("WORLD_SIZE", 1)), ">= 1 per process"),
        "data": (lambda v: not v or os.path.exists(v) and not os.path.isdir(v),  # a pipe too: read once
                 "a preference file that exists (\"\": comparisons)")})
    if online_rounds and online_pairs > online_k // 2:  # (they matter only with online rounds)
        raise SystemExit(f"error: --online_pairs={online_pairs} must be <= online_k / 2 = {online_k // 2}")
    if label_smoothing and loss != "sigmoid":
        raise SystemExit("error: --label_smoothing is conservative DPO's; it needs --loss=sigmoid")
    sft_path, ck_path = os.path.join(out_dir, "sft.pt"), os.path.join(out_dir, "dpo.pt")
    rm_path, log_path = os.path.join(out_dir, "reward.pt"), os.path.join(out_dir, "dpo.jsonl")
    data_path = data or os.path.join(out_dir, "comparisons.jsonl")
    loaded = or_exit(load_pairs, data_path) if data else None  # a bad file is one line before SFT is built
    if not data and os.path.isfile(rm_path) and not os.path.isfile(data_path):  # a --data reward model
        raise SystemExit(f"error: {data_path} not found beside {rm_path}: pass the --data it was trained on")
    if data and online_rounds and not os.path.isfile(rm_path):
        raise SystemExit(f"error: the online rounds need a reward model trained on {data}: `python reward.py "
                         f"--data={data} --out_dir={out_dir}` writes {rm_path} (or --online_rounds=0)")
    # read before the inputs: a missing or broken checkpoint must not first build SFT and the comparisons
    ck = runtime.load_checkpoint(ck_path, "dpo", need=runtime.RESUME) if resume else None
    rt = runtime.setup(device, dtype, seed)
    if not data:  # reward.py writes the comparisons (and builds SFT first if missing)
        runtime.ensure_checkpoint(data_path, "reward.py", out_dir)
    responses, pairs = loaded or or_exit(load_pairs, data_path)

    # ---- 2. policy and reference: both start as the SFT model; the reference never changes
    # (and, for the online rounds, the frozen reward model), as ppo.py and grpo.py load them
    ref, enc, sft_ck, rm, rm_ck = runtime.load_rl_inputs(out_dir, online_rounds > 0, rt)
    if resume:  # another network or SFT model: one line, before the reference scores every answer
        runtime.trained_from(ck_path, ck, sft_ck, remedy="start afresh without --resume")
    policy = runtime.model_from_checkpoint(sft_ck, sft_path, dropout=0.0).to(rt.device)
    pad_id, block_size = enc.eot_token, sft_ck["model_args"]["block_size"]

    # ---- 3. pairs split by prompt; each distinct answer tokenised and scored by the reference once
    split = torch.tensor([held_out(p, eval_fraction) for p, _, _ in pairs], dtype=torch.bool)
    both = torch.tensor([(c, r) for _, c, r in pairs], dtype=torch.long).view(-1, 2)  # (chosen, rejected)
    val_pairs, train_pairs = both[split], both[~split]
    if len(train_pairs) == 0:
        raise SystemExit(f"error: {data_path} has no usable training pairs")
    # what steps 6 and 7 answer, checked now rather than after training: the world's held-out prompts must
    # fit; the online rounds answer the training prompts that leave room for a reply (--data's may not)
    evals = world.prompts("eval")[:n_eval or None] if sft_ck.get("tokenizer", "world") == "world" else []
    prompts_fit("", evals, enc, block_size, max_new_tokens)
    if online_rounds:
        trained_on = [p for (p, _, _), held in zip(pairs, split.tolist()) if not held]
        prompts = list({json.dumps(p, sort_keys=True): p for p in trained_on}.values())  # distinct, in order
        fit = [p for p in prompts if len(render_prompt(enc, p)) + max_new_tokens <= block_size]
        if not fit:
            raise SystemExit(f"error: no training prompt of {data_path} leaves room for the online rounds' "
                             f"--max_new_tokens={max_new_tokens} (block_size {block_size})")
        if rt.master and len(fit) < len(prompts):
            print(f"online rounds: {len(prompts) - len(fit)} of {len(prompts)} training prompts leave no "
                  f"room for --max_new_tokens={max_new_tokens}; they are trained on offline only")
    rows, masks = response_rows(enc, responses, block_size, data_path, rt.master)  # too long: keeps its end
    watch = runtime.Stopwatch(rt.device_type, rt.master)  # where the time goes, phase by phase
    answers = (rows, masks, answer_logps(ref, rows, masks, pad_id, rt, "reference log-probs"))
    watch.lap("scoring")

    # ---- 4. optimizer, the order of the micro-batches, resume
    hp = dict(loss_type=loss, beta=beta, label_smoothing=label_smoothing, rpo_alpha=rpo_alpha)
    pairs_per_step = batch_size * grad_accum * rt.world_size
    n_batches = -(-len(train_pairs) // batch_size)  # micro-batches per epoch (the last one may be short)
    n_iters = max_iters or max(1, round(epochs * n_batches / (grad_accum * rt.world_size)))
    pair_len = [max(len(rows[c]), len(rows[r])) for c, r in train_pairs.tolist()]
    n_micro = n_iters * grad_accum * rt.world_size
    plan = [b for e in range(-(-n_micro // n_batches)) for b in epoch_batches(pair_len, batch_size, seed, e)]
    optimizer = runtime.configure_optimizer(policy, weight_decay, lr, (0.9, 0.95), rt.device_type)
    per_round = -(-online_prompts * online_pairs // pairs_per_step)  # online: a step slot for every pair
    start = start_round = 0
    if resume:
        start, start_round = runtime.restore(ck, policy, optimizer, rt.scaler), ck.get("round", 0)
        if start_round and (n_iters > start or ck.get("per_round", per_round) != per_round):  # log's steps
            raise SystemExit(f"error: --resume: {ck_path} is in online rounds after {start} offline steps; "
                             "resume with its --max_iters, --online_prompts, --online_pairs, batch size")
        if rt.master:
            print(f"resuming from {ck_path} at step {start}, online round {start_round}")
    raw_policy, policy = policy, runtime.wrap(policy, rt, compile)
    n_off = max(n_iters, start)  # the offline steps taken when the online rounds begin

    # ---- 5. offline DPO: minimise the loss over the comparisons' pairs
    if rt.master:  # the run has started: a fresh log, or a resumed run's rows up to its checkpoint
        runtime.start_log(log_path, start + start_round * per_round if resume else None, ck)
        print(f"{len(train_pairs)} training pairs, {len(val_pairs)} held out, from {len(responses)} answers "
              f"in {data_path}; {n_iters} steps of {pairs_per_step} pairs; loss {loss}, beta {beta}")
    runtime.warn_short_schedule(n_iters, warmup_iters, rt.master and not max_iters)  # a count from the data
    # "logps/chosen" often FALLS as the margin grows (no bug): the loss sees only the DIFFERENCE of the
    # log-ratios, and when two answers share most tokens, pushing both down (rejected faster) is cheapest.
    t0 = time.time()
    policy.train()
    bar = tqdm(range(start, n_iters), initial=start, total=n_iters, disable=not rt.master, desc="dpo")
    for it in bar:
        lr_now = runtime.get_lr(it, warmup_iters, n_iters, lr, min_lr)
        # by global micro-batch number: the plan depends only on (seed, step), so a resumed run sees the
        # pairs an unbroken run would
        ks = [(it * grad_accum + m) * rt.world_size + rt.rank for m in range(grad_accum)]
        micro = [train_pairs[plan[k]] for k in ks]
        means = train_step(policy, optimizer, rt, micro, answers, pad_id, lr_now, grad_clip, it + 1, hp)
        watch.lap("training")
        due = rt.master and ((it + 1) % eval_interval == 0 or it == n_iters - 1)
        val = evaluate_pairs(raw_policy, val_pairs, answers, pad_id, rt, hp) if due else None
        if rt.master:
            row = {"iter": it + 1, **means, "lr": lr_now}
            row.update({f"val/{k}": (val or {}).get(k) for k in ("loss", "accuracy", "margin")})
            runtime.append_jsonl(log_path, {**row, "time": time.time() - t0})
            bar.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "accuracy", "margin")})
            if val is not None:
                save(ck_path, raw_policy, optimizer, rt, config, sft_ck, it + 1)
        watch.lap("held-out & checkpoints")
    bar.close()
    if rt.master and start >= n_iters and start_round >= online_rounds:
        print(f"{ck_path} is already at step {start} >= {n_iters} steps; nothing to train")

    # ---- 6. (departure) online DPO: rounds of fresh answers from the policy, ranked by the reward model
    if online_rounds > start_round:
        for rnd in range(start_round, online_rounds):
            answers, round_pairs, mean_score = online_round(
                raw_policy, ref, rm, rm_ck, enc, fit, rnd, answers, rt, online_prompts, online_k,
                online_pairs, max_new_tokens, no_end_penalty, block_size, seed, watch.lap)
            runtime.check_finite("dpo", n_off + rnd * per_round + 1, "--dtype=float32", score=mean_score)
            n_round = torch.tensor(float(len(round_pairs)), device=rt.device)
            if rt.ddp:  # every rank must take the same number of steps: skip the round if one has no pair
                torch.distributed.all_reduce(n_round, op=torch.distributed.ReduceOp.MIN)
            if n_round.item() == 0:  # no step and no checkpoint: the policy is the one last saved
                if rt.master:
                    print(f"online round {rnd + 1}: every answer pair was identical or tied; no update")
                continue
            # the pairs in a random order, cycled: ties and repeats leave fewer pairs than there are slots
            g = torch.Generator().manual_seed(seed + rnd)
            order = torch.randperm(len(round_pairs), generator=g).tolist()
            steps = tqdm(range(per_round), desc=f"round {rnd + 1} steps", disable=not rt.master, leave=False)
            for k in steps:
                lr_now = online_lr * (1 - 0.75 * (rnd + k / per_round) / online_rounds)
                take = [order[(k * grad_accum * batch_size + j) % len(order)]
                        for j in range(batch_size * grad_accum)]
                micro = [round_pairs[take[m * batch_size:(m + 1) * batch_size]] for m in range(grad_accum)]
                step = n_off + rnd * per_round + k + 1
                means = train_step(policy, optimizer, rt, micro, answers, pad_id, lr_now, grad_clip, step, hp)
                if rt.master:
                    runtime.append_jsonl(log_path, {"iter": step, "round": rnd + 1, **means, "lr": lr_now,
                                                    "time": time.time() - t0})
            if rt.master:  # with several processes: the score and the pairs of this process's share
                save(ck_path, raw_policy, optimizer, rt, config, sft_ck, n_off, rnd + 1, per_round)
                print(f"online round {rnd + 1}/{online_rounds}: {online_prompts} prompts x {online_k} "
                      f"answers, RM score {mean_score:+.3f}, {len(round_pairs)} pairs, loss "
                      f"{means['loss']:.3f}, accuracy {means['accuracy']:.2f}")
            watch.lap("training")  # the round's steps, its checkpoint and line

    # ---- 7. held-out world prompts: DPO against SFT under the hidden human
    if rt.master and evals:
        print(f"\nheld-out prompts ({len(evals)} x {eval_samples} samples, temperature 1):")
        compare_to_sft("dpo", raw_policy.eval(), ref, enc, evals * eval_samples, max_new_tokens,
                       torch.Generator(device=rt.device).manual_seed(seed), lap=watch.lap)
    watch.report("dpo")


if __name__ == "__main__":
    runtime.run(main)
