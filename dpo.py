"""
Stage 3': Direct Preference Optimization on the same comparisons, starting from SFT -> out/dpo.pt

Rafailov et al. (2023): the KL-regularised objective that PPO maximises,

    max_pi  E_{x, y~pi} [ r(x, y) ]  -  beta * KL( pi(.|x) || pi_ref(.|x) ),

has the optimal policy pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x) in closed form. Solved for the reward,
r(x, y) = beta log pi*(y|x) / pi_ref(y|x) + beta log Z(x), and put into Bradley-Terry, Z(x) cancels: preference
learning becomes binary classification with the policy's own log-ratios as the logits. Offline, on a fixed set
of pairs, DPO needs no reward model, samples nothing, and scores each answer with the reference only once.

The loss also carries RPO's NLL term on the chosen answers (Pang et al. 2024; TRL's rpo_alpha). DPO only asks
that chosen beat rejected, and on this tiny model pure DPO (--rpo_alpha=0) soon moves probability onto
misspelt, never-ending text that neither answer contained: at lr 5e-4, 15 nats of KL, fluency 91% -> 66% and no
gain in gold. The NLL term keeps the chosen answers likely in absolute terms.

Online rounds (the default; Guo et al. 2024, TRL's OnlineDPOTrainer). Every answer in the comparisons was
written by SFT, so offline DPO never sees the answers it comes to write itself: what it learns about SFT's
answers does not reach the misspelt or off-topic tails of its own, which stay at SFT's rate. So after a short
offline pass over the comparisons, each round samples online_k = 6 answers to online_prompts = 256 training
prompts from the current policy and lets the reward model trained on the same comparisons rank each prompt's six.
The best-vs-worst and second-best-vs-second-worst answers become pairs for the same loss and reference: 16 steps
of 32 pairs, a slot for each of the 512 possible pairs (ties and repeated answers give no pair; the rest fill the
slots in turn). This is no longer reward-model free, but it uses no labels beyond the comparisons. On the world
(122 held-out prompts x 8, against SFT, three seeds): offline DPO alone 70.4 / 69.8 / 67.5 %, about 1.1 nats of
KL, as fluent as SFT (94 %); the default 76.3 / 76.2 / 76.0 %, 2.7-2.9 nats, 96.4-96.5 % fluent, in 90-105 s on two
CPU cores.

    python dpo.py                              # builds base, sft, comparisons and the reward model if missing
    python dpo.py --online_rounds=0 --epochs=0.5
                                               # offline DPO, the paper's recipe: the comparisons alone
    python dpo.py --online_rounds=0 --epochs=0.5 --loss=ipo --lr=1e-4 --min_lr=1e-5
                                               # IPO (Azar et al. 2023): regress the margin to 1/(2 beta). Its
                                               # squared loss never saturates as DPO's does: at DPO's lr of 1e-3
                                               # the margins overshoot and the model degrades (KL 3 nats, 78 %
                                               # fluent); at 1e-4 it lands near DPO (0.89 gold, 0.65 nats)
    python dpo.py --label_smoothing=0.1        # conservative DPO: assume 10% of the labels are flipped
    python dpo.py --data=prefs.jsonl           # TRL {"prompt", "chosen", "rejected"} or Anthropic HH pairs; the
                                               # online rounds need `python reward.py --data=prefs.jsonl` first
    torchrun --nproc_per_node=2 dpo.py         # DDP (gloo on CPU, nccl on GPUs)
"""
import functools
import json
import os
import sys
import time
import zlib

import torch
import torch.nn.functional as F
from tqdm import tqdm

import runtime
from data import world
from data.chat import render_response
from rollout import compare_to_sft, respond, response_logps, reward_scores
from data.readers import DataError, read_comparisons, read_preferences

# -----------------------------------------------------------------------------
# config (every name can be overridden with --name=value)
out_dir = "out"            # reads sft.pt and comparisons.jsonl here, writes dpo.pt and dpo.jsonl
data = ""                  # "" = out_dir/comparisons.jsonl (reward.py); or a TRL / Anthropic HH preference JSONL
seed = 1337
device = "auto"            # auto: cuda > mps > cpu
dtype = "auto"             # fp32 on CPU; log-probs and losses are always fp32
compile = False
loss = "sigmoid"           # "sigmoid" (DPO) or "ipo"
beta = 0.1                 # KL strength: small beta lets the policy move far from SFT
label_smoothing = 0.0      # conservative DPO: the probability that a label is flipped (sigmoid loss only)
rpo_alpha = 1.0            # weight of the chosen answers' per-token NLL (RPO); 0 = pure DPO / IPO
batch_size = 32            # preference pairs per micro-batch (per process); each pair is two sequences
grad_accum = 1
epochs = 0.15              # passes over the training pairs (sets max_iters when max_iters = 0); a ranking of 8
                           # gives 28 overlapping pairs, so 0.15 pass shows every answer about once (offline
                           # DPO alone, --online_rounds=0, does best with 0.5: every answer ~3.5 times)
max_iters = 0              # optimizer steps; 0 = as many as `epochs` takes
lr, min_lr = 1e-3, 1e-4    # peak learning rate, cosine-decayed to min_lr
warmup_iters = 10
weight_decay = 0.0         # the pull toward SFT is the KL term's job, not weight decay's
grad_clip = 1.0
eval_fraction = 0.1        # share of prompts whose pairs are held out (chosen by a hash of the prompt)
eval_interval = 50         # held-out pairs evaluated and checkpoint written every this many steps
max_new_tokens = 48        # answer length in the final SFT-vs-DPO comparison
eval_samples = 1           # answers per held-out world prompt in that comparison
n_eval = 0                 # held-out world prompts in that comparison (0 = all of them)
online_rounds = 8          # rounds of online DPO after the offline pass (see above), reading out_dir/reward.pt
online_prompts = 256       # training prompts per round, taken in turn
online_k = 6               # answers sampled per prompt, ranked by the reward model
online_pairs = 2           # pairs per prompt from those: best vs worst, second best vs second worst (<= online_k/2)
online_lr = 2e-4           # learning rate of the online steps, decayed linearly to a quarter of it by the end
resume = False             # continue from out_dir/dpo.pt (model, optimizer, step, online round, RNG)
# -----------------------------------------------------------------------------


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair losses from summed response log-probs (all (B,) fp32). Returns (mean loss, chosen rewards,
    rejected rewards), the rewards being DPO's implicit r = beta * log pi / pi_ref (detached, for logging)."""
    h = (pi_c - ref_c) - (pi_r - ref_r)  # log-ratio margin: how much more the policy moved toward chosen
    if loss_type == "sigmoid":
        # DPO: -log sigma(beta h), Bradley-Terry on the implicit rewards. Conservative DPO (label smoothing eps)
        # is the same cross-entropy against a soft label: -(1-eps) log sigma(beta h) - eps log sigma(-beta h)
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        # IPO (Azar et al.): (h - 1/(2 beta))^2. A squared loss has a finite optimum, so unlike DPO it does not
        # keep pushing h to infinity on pairs it already ranks right (DPO's overfitting to deterministic labels).
        # h is built from SUMMED log-probs, log pi(y|x) as in the paper, so h, beta and the logged rewards mean
        # the same for every loss type. (TRL averages over tokens for IPO instead: the target 1/(2 beta) is then
        # per token and length-blind; with sums a long answer reaches it by moving each token a little.)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss {loss_type!r}: expected 'sigmoid' or 'ipo'")
    return losses.mean(), beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()


def encode(enc, prompt, text, ended, block_size):
    """(ids, mask) of prompt + answer, mask 1 on the answer's tokens. An answer that ended its turn keeps its
    <|end|>; one that was cut off never said it, so scoring an <|end|> would credit it with stopping. Too long:
    keep the first block_size tokens (the answer loses its tail)."""
    ids, mask = render_response(enc, prompt, text)
    if not ended:
        ids, mask = ids[:-1], mask[:-1]
    return ids[:block_size], mask[:block_size]


def held_out(prompt, fraction):
    """Is this prompt in the held-out ~fraction? A hash of its text: the same split on every run and machine,
    and all pairs of one prompt fall on the same side."""
    return zlib.crc32(json.dumps(prompt, sort_keys=True).encode()) % 1000 < 1000 * fraction


def load_pairs(path):
    """Preference data as (responses [(prompt, text, ended)], pairs [(prompt, chosen index, rejected index)]).
    A ranking of K answers gives all K(K-1)/2 pairs, the higher-ranked one chosen: each pair is a Bradley-Terry
    observation implied by the Plackett-Luce ranking, as in InstructGPT's reward model."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        ranked = "ranking" in json.loads(first)
    except json.JSONDecodeError:
        ranked = False  # let the reader report the bad line
    responses, pairs = [], []
    if ranked:
        for row in read_comparisons(path):
            base = len(responses)
            responses += [(row["prompt"], t, e) for t, e in zip(row["responses"], row["ended"])]
            r = row["ranking"]
            pairs += [(row["prompt"], base + r[i], base + r[j]) for i in range(len(r)) for j in range(i + 1, len(r))]
    else:
        for row in read_preferences(path):
            responses += [(row["prompt"], row["chosen"], True), (row["prompt"], row["rejected"], True)]
            pairs.append((row["prompt"], len(responses) - 2, len(responses) - 1))
    # two identical answers carry no preference (their log-ratios cancel exactly): drop them
    pairs = [p for p in pairs if responses[p[1]][1:] != responses[p[2]][1:]]
    return responses, pairs


def best_and_worst(scores, replies, k, n=1):
    """Online DPO's pairs: for each prompt's k consecutive replies, (chosen, rejected) indices by reward-model
    score: the best against the worst, then (n = 2) the second best against the second worst, and so on (n <= k/2,
    so no reply is in two pairs). Two replies that tie, or are the same text (the policy wrote one answer twice),
    give no pair."""
    pairs = []
    for s in range(0, len(replies), k):
        order = sorted(range(s, s + k), key=lambda i: -scores[i])
        for b, w in zip(order[:n], order[::-1][:n]):
            same = (replies[b]["text"], replies[b]["ended"]) == (replies[w]["text"], replies[w]["ended"])
            if scores[b] > scores[w] and not same:
                pairs.append((b, w))
    return pairs


def main():
    config = runtime.configure(globals())
    rt = runtime.setup(device, dtype, seed)
    sft_path, ck_path = os.path.join(out_dir, "sft.pt"), os.path.join(out_dir, "dpo.pt")
    log_path = os.path.join(out_dir, "dpo.jsonl")
    if loss not in ("sigmoid", "ipo"):
        raise SystemExit(f"error: --loss must be 'sigmoid' or 'ipo', got {loss!r}")
    if not 0 <= label_smoothing < 0.5 or beta <= 0:
        raise SystemExit("error: need beta > 0 and 0 <= label_smoothing < 0.5")
    if online_rounds < 0 or online_rounds and (online_prompts < 1 or not 1 <= online_pairs <= online_k // 2):
        raise SystemExit("error: need online_rounds >= 0; to use them, online_prompts >= 1 and "
                         "1 <= online_pairs <= online_k / 2")
    data_path = data or os.path.join(out_dir, "comparisons.jsonl")
    if rt.master:
        runtime.ensure_checkpoint(sft_path, "sft.py", out_dir)
        if not data and (online_rounds or not os.path.isfile(data_path)):  # reward.py writes comparisons.jsonl too
            runtime.ensure_checkpoint(os.path.join(out_dir, "reward.pt"), "reward.py", out_dir)
    if rt.ddp:
        torch.distributed.barrier()
    if online_rounds and not os.path.isfile(os.path.join(out_dir, "reward.pt")):
        raise SystemExit(f"error: the online rounds need a reward model trained on {data_path}: "
                         f"`python reward.py --data={data_path} --out_dir={out_dir}` writes {out_dir}/reward.pt "
                         "(or --online_rounds=0: offline DPO on the pairs alone)")
    if not os.path.isfile(data_path):
        hint = "" if data else "; `python reward.py` writes it"
        raise SystemExit(f"error: preference file {data_path} not found{hint}")
    try:
        responses, pairs = load_pairs(data_path)
    except DataError as e:
        sys.exit(f"error: {e}")

    # ---- policy and reference: both start as the SFT model; the reference never changes
    ref, enc, sft_ck = runtime.load_model(sft_path, "sft", dropout=0.0)
    ref.to(rt.device).eval().requires_grad_(False)
    policy = runtime.model_from_checkpoint(sft_ck, dropout=0.0).to(rt.device)
    eot, block_size = enc.eot_token, sft_ck["model_args"]["block_size"]

    # ---- tokenise every distinct answer once: prompt + answer (+ <|end|> if it ended its turn), mask on the answer
    rows, masks = map(list, zip(*(encode(enc, p, text, ended, block_size) for p, text, ended in responses)))
    n_tokens = torch.tensor([sum(m) for m in masks], dtype=torch.float, device=rt.device)
    pairs = [p for p in pairs if sum(masks[p[1]]) and sum(masks[p[2]])]  # a prompt that fills the block: no answer
    split = [held_out(p, eval_fraction) for p, _, _ in pairs]
    val_pairs = sorted([(c, r) for (_, c, r), v in zip(pairs, split) if v], key=lambda p: len(rows[p[0]]))
    val_pairs = torch.tensor(val_pairs, dtype=torch.long).view(-1, 2)  # by length: little padding when scored
    train_pairs = torch.tensor([(c, r) for (_, c, r), v in zip(pairs, split) if not v], dtype=torch.long).view(-1, 2)
    if len(train_pairs) == 0:
        raise SystemExit(f"error: {data_path} has no usable training pairs")

    # ---- the reference's summed log-probs, computed ONCE for every answer: pi_ref is frozen, so recomputing
    # them each step would only double the cost of training
    def reference_logps(some_rows, their_masks):
        out = torch.zeros(len(some_rows), device=rt.device)
        by_len = sorted(range(len(some_rows)), key=lambda i: len(some_rows[i]))  # similar lengths: little padding
        with torch.no_grad(), rt.ctx:
            for s in tqdm(range(0, len(some_rows), 64), desc="reference log-probs", disable=not rt.master, leave=False):
                idx = by_len[s:s + 64]
                out[idx] = response_logps(ref, [some_rows[i] for i in idx], [their_masks[i] for i in idx], eot,
                                          rt.device)
        return out

    ref_logps = reference_logps(rows, masks)

    # ---- optimizer, resume
    pairs_per_step = batch_size * grad_accum * rt.world_size
    n_batches = -(-len(train_pairs) // batch_size)  # micro-batches per epoch (the last one may be short)
    n_iters = max_iters or max(1, round(epochs * n_batches / (grad_accum * rt.world_size)))
    optimizer = runtime.configure_optimizer(policy, weight_decay, lr, (0.9, 0.95), rt.device_type)
    start = start_round = 0
    if resume:
        ck = runtime.load_checkpoint(ck_path, "dpo")
        start, start_round = runtime.restore(ck, policy, optimizer, rt.scaler), ck.get("round", 0)
        print(f"resuming from {ck_path} at step {start}" + (f", online round {start_round}" if start_round else ""))
    raw_policy = policy
    policy = runtime.wrap(policy, rt, compile)

    # Rows are padded to the longest in their batch, and in a random batch about half of the tokens would be
    # padding; so pairs of similar length go together (HF's group_by_length): shuffle, sort windows of 50
    # batches by length, cut into batches, shuffle the batches.
    pair_len = [max(len(rows[c]), len(rows[r])) for c, r in train_pairs.tolist()]

    @functools.lru_cache(maxsize=2)
    def epoch_batches(epoch):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        perm, win = torch.randperm(len(train_pairs), generator=g).tolist(), 50 * batch_size
        perm = [i for s in range(0, len(perm), win) for i in sorted(perm[s:s + win], key=pair_len.__getitem__)]
        cut = [perm[s:s + batch_size] for s in range(0, len(perm), batch_size)]
        return [cut[i] for i in torch.randperm(len(cut), generator=g).tolist()]

    def batch(it, micro):
        """Pair indices (B, 2) of this step's micro-batch on this rank. It depends only on (seed, step), so a
        resumed run sees exactly the pairs an uninterrupted run would have seen."""
        k = (it * grad_accum + micro) * rt.world_size + rt.rank  # global micro-batch number
        return train_pairs[epoch_batches(k // n_batches)[k % n_batches]]

    def forward(net, pb):
        """Policy log-probs of a batch of pairs (B, 2) in ONE forward: chosen rows stacked over rejected rows."""
        c, r = pb[:, 0].tolist(), pb[:, 1].tolist()
        logps = response_logps(net, [rows[i] for i in c + r], [masks[i] for i in c + r], eot, rt.device)
        return logps[:len(c)], logps[len(c):], ref_logps[pb[:, 0]], ref_logps[pb[:, 1]]

    def stats(loss_value, pi_c, pi_r, rc, rr):
        return {"loss": loss_value, "rewards/chosen": rc.mean().item(), "rewards/rejected": rr.mean().item(),
                # strict: with policy = reference both rewards are 0, no pair is won yet
                "accuracy": (rc > rr).float().mean().item(), "margin": (rc - rr).mean().item(),
                "logps/chosen": pi_c.mean().item(), "logps/rejected": pi_r.mean().item()}

    @torch.no_grad()
    def evaluate_pairs():
        """Loss, accuracy and margin on the held-out pairs (all of them, in fixed batches)."""
        if len(val_pairs) == 0:
            return {"loss": None, "accuracy": None, "margin": None}
        raw_policy.eval()
        out = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
        for i in range(0, len(val_pairs), 2 * batch_size):
            pb = val_pairs[i:i + 2 * batch_size]
            with rt.ctx:
                pi_c, pi_r, ref_c, ref_r = forward(raw_policy, pb)
            l, rc, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, loss, label_smoothing)
            s = stats(l.item(), pi_c, pi_r, rc, rr)
            for k in out:
                out[k] += s[k] * len(pb) / len(val_pairs)
        raw_policy.train()
        return out

    def save(step, rnd=0):
        runtime.save_checkpoint(ck_path, {**runtime.training_state(raw_policy, optimizer, rt.scaler), "config": config,
                                    "model_args": sft_ck["model_args"], "kind": "dpo", "step": step, "round": rnd,
                                    "tokenizer": sft_ck.get("tokenizer", "world")})

    def train_step(get_pairs, lr_now):
        """One optimizer step over grad_accum micro-batches of pairs (get_pairs(micro) -> (B, 2) indices)."""
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        acc = []
        for micro in range(grad_accum):
            if rt.ddp:  # all-reduce gradients only on the last micro-step
                policy.require_backward_grad_sync = micro == grad_accum - 1
            pb = get_pairs(micro)
            with rt.ctx:
                pi_c, pi_r, ref_c, ref_r = forward(policy, pb)
            pref, rc, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, loss, label_smoothing)
            total = pref
            if rpo_alpha > 0:  # RPO: + alpha * mean over pairs of -log pi(chosen) / its length
                total = pref - rpo_alpha * (pi_c / n_tokens[pb[:, 0]]).mean()
            rt.scaler.scale(total / grad_accum).backward()
            acc.append(stats(pref.item(), pi_c, pi_r, rc, rr))
        runtime.optimizer_step(policy, optimizer, rt.scaler, grad_clip)
        return {k: sum(a[k] for a in acc) / len(acc) for k in acc[0]}

    # ---- training loop
    if rt.master and not resume and os.path.exists(log_path):
        os.remove(log_path)
    if rt.master:
        print(f"{len(train_pairs)} training pairs, {len(val_pairs)} held out, from {len(responses)} answers in "
              f"{data_path}; {n_iters} steps of {pairs_per_step} pairs; loss {loss}, beta {beta}")
    # Why "logps/chosen" often FALLS while the margin grows: the loss only sees the DIFFERENCE of the two
    # log-ratios. Probability mass may leave both answers for other sequences; and when chosen and rejected
    # share most of their tokens (here: same topic, same sentence patterns), the cheapest way to widen the
    # margin is to push both down, the rejected one faster. A falling chosen log-prob is not a bug.
    t0 = time.time()
    policy.train()
    bar = tqdm(range(start, n_iters), initial=start, total=n_iters, disable=not rt.master, desc="dpo")
    for it in bar:
        lr_now = runtime.get_lr(it, warmup_iters, n_iters, lr, min_lr)
        means = train_step(functools.partial(batch, it), lr_now)
        last = it == n_iters - 1
        val = evaluate_pairs() if rt.master and ((it + 1) % eval_interval == 0 or last) else None
        if rt.master:
            row = {"iter": it + 1, **means, "lr": lr_now}
            row.update({f"val/{k}": (val or {}).get(k) for k in ("loss", "accuracy", "margin")})
            row["time"] = time.time() - t0
            runtime.append_jsonl(log_path, row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}", margin=f"{row['margin']:.2f}",
                            chosen=f"{row['rewards/chosen']:.2f}", rejected=f"{row['rewards/rejected']:.2f}",
                            val_acc="-" if row["val/accuracy"] is None else f"{row['val/accuracy']:.2f}")
            if val is not None:
                save(it + 1)
    bar.close()
    if rt.master and start >= n_iters and start_round >= online_rounds:
        print(f"{ck_path} is already at step {start} >= {n_iters} steps; nothing to train")

    # ---- online DPO: rounds of fresh answers from the policy, judged by the reward model (see the docstring)
    if online_rounds > start_round:
        rm_ck = runtime.load_checkpoint(os.path.join(out_dir, "reward.pt"), "reward")
        rm = runtime.model_from_checkpoint(rm_ck, dropout=0.0, scalar_head=True).to(rt.device).eval().requires_grad_(False)
        prompts = list({json.dumps(p, sort_keys=True): p for (p, _, _), v in zip(pairs, split) if not v}.values())
        per_round = -(-online_prompts * online_pairs // pairs_per_step)  # steps: a slot for every possible pair
        for rnd in range(start_round, online_rounds):
            t1 = time.time()
            # 1. this round's prompts (each rank its share), online_k answers each from the policy at temperature 1
            mine = [prompts[(rnd * online_prompts + i) % len(prompts)]
                    for i in range(rt.rank, online_prompts, rt.world_size)]
            convs = [p for p in mine for _ in range(online_k)]
            g = torch.Generator(device=rt.device).manual_seed(seed + 1000 * (rnd + 1) + rt.rank)
            raw_policy.eval()
            replies = [r for s in range(0, len(convs), 256)
                       for r in respond(raw_policy, enc, convs[s:s + 256], max_new_tokens, 1.0, generator=g)]
            raw_policy.train()
            # 2. the reference's log-probs, once per answer; the reward model's likelihood feature reuses them
            new_rows, new_masks = map(list, zip(*(encode(enc, c, r["text"], r["ended"], block_size)
                                                  for c, r in zip(convs, replies))))
            new_ref = reference_logps(new_rows, new_masks)
            scores = reward_scores(rm, enc, convs, replies, rm_ck["gain"], rm_ck["bias"],
                                   lm_weight=rm_ck.get("lm_weight", 0.0), sft=ref)
            # 3. best vs worst (and second best vs second worst) of each prompt's answers, as indices into rows
            # extended by this round's answers
            round_pairs = torch.tensor([(len(rows) + b, len(rows) + w)
                                        for b, w in best_and_worst(scores.tolist(), replies, online_k, online_pairs)],
                                       dtype=torch.long).view(-1, 2)
            rows += new_rows
            masks += new_masks
            ref_logps = torch.cat([ref_logps, new_ref])
            n_tokens = torch.cat([n_tokens, torch.tensor([sum(m) for m in new_masks], dtype=torch.float,
                                                         device=rt.device)])
            n_pairs = torch.tensor(float(len(round_pairs)), device=rt.device)
            if rt.ddp:  # every rank must take the same number of steps: skip the round if any rank has no pair
                torch.distributed.all_reduce(n_pairs, op=torch.distributed.ReduceOp.MIN)
            if n_pairs.item() == 0:
                print(f"online round {rnd + 1}: every answer pair was identical or tied; no update")
                continue
            # 4. the pairs in a random order, cycled: ties and repeats leave fewer pairs than the steps have slots for
            # (late rounds, whose answers repeat more, see some pairs twice)
            order = torch.randperm(len(round_pairs), generator=torch.Generator().manual_seed(seed + rnd)).tolist()
            for k in range(per_round):
                lr_now = online_lr * (1 - 0.75 * (rnd + k / per_round) / online_rounds)
                take = [order[((k * grad_accum) * batch_size + j) % len(order)] for j in range(batch_size * grad_accum)]
                means = train_step(lambda micro: round_pairs[take[micro * batch_size:(micro + 1) * batch_size]], lr_now)
                if rt.master:
                    runtime.append_jsonl(log_path, {"iter": n_iters + rnd * per_round + k + 1, "round": rnd + 1, **means,
                                              "lr": lr_now, "time": time.time() - t0})
            if rt.master:
                save(n_iters, rnd + 1)
                # (with several processes: the score and the pairs of this process's share)
                print(f"online round {rnd + 1}/{online_rounds}: {online_prompts} prompts x {online_k} answers, "
                      f"RM score {scores.mean().item():+.3f}, {len(round_pairs)} pairs, loss {means['loss']:.3f}, "
                      f"accuracy {means['accuracy']:.2f}, {time.time() - t1:.1f} s")

    # ---- held-out world prompts: DPO against SFT under the hidden human
    if rt.master and sft_ck.get("tokenizer", "world") == "world":
        evals = world.prompts("eval")[:n_eval or None] * eval_samples
        print(f"\nheld-out prompts ({len(evals) // eval_samples} x {eval_samples} samples, temperature 1):")
        with torch.no_grad():
            compare_to_sft("dpo", raw_policy.eval(), ref, enc, evals, max_new_tokens,
                           torch.Generator(device=rt.device).manual_seed(seed))
    runtime.cleanup()


if __name__ == "__main__":
    main()
