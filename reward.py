"""
Stage 2: comparisons and the reward model -> out/comparisons.jsonl, out/reward.pt

InstructGPT step 2: "a prompt and several model outputs are sampled; a labeler ranks the outputs from best to
worst; this data is used to train our reward model". The SFT model writes K answers to every train prompt, one of
the world's simulated labelers ranks them (data/world.py: Plackett-Luce over the hidden human's utility, noisy
enough that two labelers agree on only ~73% of pairs), and a copy of the SFT network with a scalar head learns to
score answers so that the better-ranked ones score higher.

By default the reward is that head's score plus w * log p_SFT(answer | prompt), the frozen SFT model's
log-likelihood of the answer, with the weight w learned from the same rankings (it starts at 0). The head alone
(InstructGPT's design, --lm_feature=False) learns politeness and padding from 623 prompts but not whether an answer
is about what was asked; the SFT model, trained on many demonstrations, already knows what an on-topic answer looks
like, and the rankings decide how much to trust it. If the likelihood did not predict the rankings, w would stay
near 0.

    python reward.py                          # collect K=8 answers per train prompt, rank them, train (~2 min CPU)
    python reward.py --loss=plackett_luce     # the whole K-wise ranking likelihood instead of its pairs
    python reward.py --lm_feature=False       # the scalar head alone, as in InstructGPT
    python reward.py --data=prefs.jsonl       # your own TRL / Anthropic HH preference pairs instead of collecting
    python reward.py --bon=16                 # then best-of-16 on held-out prompts, judged by the hidden human
    python reward.py --train=False --bon=16   # best-of-16 with an existing out/reward.pt
    torchrun --nproc_per_node=2 reward.py     # DDP: each rank samples its share of prompts and of every batch

comparisons.jsonl, one line per prompt (the full ranking, plus the TRL prompt/chosen/rejected view that dpo.py and
data.readers.read_preferences read):
    {"prompt": messages, "responses": [K strings], "ended": [K bools], "ranking": [indices, best first],
     "chosen": best response, "rejected": worst response}
"""
import math
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
from data.chat import scored_ids
from rollout import best_of_n, reply_logprobs, respond, rm_score, score_rows
from data.readers import DataError, read_comparisons, read_preferences, write_jsonl

# -----------------------------------------------------------------------------
# config (every name can be overridden with --name=value)
out_dir = "out"
data = ""                  # "" = sample comparisons from SFT on the world's train prompts; or a TRL/HH JSONL
collect = True             # sample and rank fresh comparisons; False reuses out_dir/comparisons.jsonl
train = True               # train the reward model; False loads out_dir/reward.pt (e.g. to run --bon)
n_prompts = 0              # collect on the first n train prompts only (0 = all of them)
K = 8                      # answers per prompt that a labeler ranks (InstructGPT: 4 to 9); 28 pairs each
max_new_tokens = 48        # longest sampled answer; one that is cut off never ended its turn
temperature = 1.0          # 1 = sample the SFT distribution itself, which is where PPO starts
labeler_tau = world.LABELER_TAU  # the labelers' Plackett-Luce temperature: 0.126 makes two of them agree on ~73%
                           # of pairs, like InstructGPT's; 1e-6 = noise-free labelers who rank by gold exactly
gen_batch = 256            # sequences per generate() call (bounds the KV cache's memory)
loss = "bradley_terry"     # "bradley_terry": all K(K-1)/2 pairs of a ranking; "plackett_luce": the whole ranking
lm_feature = True          # r = head + w * log p_SFT(answer | prompt), w learned with the head (from 0); False: the
                           # head alone (held-out gold accuracy 78.7% vs 87.2%, best-of-16 63.8% vs 78.9% win rate)
seed = 1337
device = "auto"            # auto: cuda > mps > cpu
dtype = "auto"             # bf16/fp16 autocast on CUDA, fp32 on CPU; rewards and losses are always fp32
compile = False
dropout = 0.0              # dropout while the reward model trains (scoring is always without); 0.1 trained
                           # a third slower and no better (79.1% vs 80.9% held-out gold accuracy, same data)
batch_size = 8             # prompts per step (per process); each brings all K of its answers
epochs = 3                 # passes over the training comparisons
max_iters = 0              # optimizer steps; 0 = `epochs` passes
lr, min_lr = 3e-4, 3e-5    # peak learning rate, cosine-decayed to min_lr
warmup_iters = 10
weight_decay = 0.1
beta1, beta2 = 0.9, 0.95
grad_clip = 1.0
eval_interval = 50         # held-out metrics and a checkpoint every this many steps
val_fraction = 0.1         # prompts held out to measure the reward model (chosen by seed)
resume = False             # continue training from out_dir/reward.pt (reuses out_dir/comparisons.jsonl)
stop_at = 0                # end after this step as if killed (0 = run to the end): split a run, or test resume
bon = 0                    # > 0: best-of-bon sampling on the held-out eval prompts, judged by gold
# -----------------------------------------------------------------------------


def bradley_terry_loss(r):
    """r (B, K): rewards of each prompt's K answers in ranked order, best first.
    Bradley-Terry (InstructGPT eq. 1): loss = -1/C(K,2) * sum over pairs w above l of log sigmoid(r_w - r_l).
    All K(K-1)/2 pairs of a prompt come from ONE forward pass over its K answers, so no answer is seen in many
    batches (InstructGPT found that this stops the reward model overfitting)."""
    w, l = torch.triu_indices(r.size(1), r.size(1), 1, device=r.device)  # every pair, winner before loser
    return -F.logsigmoid(r[:, w] - r[:, l]).mean()


def plackett_luce_loss(r):
    """r (B, K) in ranked order, best first. Plackett-Luce: P(ranking) = prod_i exp(r_(i)) / sum_{j>=i} exp(r_(j)),
    loss = -1/(K-1) * sum_i [r_(i) - logsumexp_{j>=i} r_(j)]: the negative log-likelihood of the whole ranking,
    divided by its K-1 choices (the last is certain) so that K=2 gives exactly the Bradley-Terry loss."""
    tail = torch.logcumsumexp(r.flip(1), dim=1).flip(1)  # (B, K): logsumexp of r[:, i:]
    return -(r - tail)[:, :-1].sum(1).mean() / (r.size(1) - 1)


LOSSES = {"bradley_terry": bradley_terry_loss, "plackett_luce": plackett_luce_loss}


def pairwise_accuracy(r, target):
    """Fraction of pairs a reward r (N, K) orders the way target (N, K) does; pairs that target ties are skipped,
    ties in r count half."""
    i, j = torch.triu_indices(r.size(1), r.size(1), 1)
    dr, dt = r[:, i] - r[:, j], target[:, i] - target[:, j]
    agree = (dr * dt.sign() > 0).float() + 0.5 * (dr == 0).float()
    keep = dt.abs() > 1e-9
    return agree[keep].mean().item() if keep.any() else float("nan")


def calibration(r, bins=(0.5, 0.6, 0.7, 0.8, 0.9, 1.0)):
    """r (N, K) in the labeler's order, best first. Each pair's predicted P(win) = sigmoid(r_a - r_b) for the
    answer the model prefers, binned, against how often the labeler agreed. Rows: (lo, hi, pairs, predicted, seen)."""
    i, j = torch.triu_indices(r.size(1), r.size(1), 1)
    d = r[:, i] - r[:, j]
    p, right = torch.sigmoid(d.abs()).flatten(), (d > 0).float().flatten()
    rows = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        m = (p >= lo) & ((p < hi) if hi < 1 else (p <= hi))
        if m.any():
            rows.append((lo, hi, int(m.sum()), p[m].mean().item(), right[m].mean().item()))
    return rows


def accuracy_by_part(r, golds, parts):
    """Which parts of the hidden human a reward model has learnt. r, golds (N, K); parts[n][k] = gold_components of
    answer k. Each pair with distinct gold is filed under the component whose weighted difference is largest, and
    the pairs r orders like gold are counted (ties in r count half). Returns {component: (accuracy, pairs)}."""
    hits = {}
    for n in range(r.size(0)):
        for a in range(r.size(1)):
            for b in range(a + 1, r.size(1)):
                dg, dr = golds[n, a] - golds[n, b], r[n, a] - r[n, b]
                if abs(dg) < 1e-9:
                    continue
                part = max(world.WEIGHTS, key=lambda k: abs(world.WEIGHTS[k] * (parts[n][a][k] - parts[n][b][k])))
                hits.setdefault(part, []).append(1.0 if dr * dg > 0 else 0.5 if dr == 0 else 0.0)
    return {k: (sum(v) / len(v), len(v)) for k, v in sorted(hits.items(), key=lambda kv: -len(kv[1]))}


def labeler(which, seed, i):
    """A labeler's private random stream for comparison i: the same ranking however prompts are split over ranks."""
    return random.Random(f"{which}-{seed}-{i}")


def comparison(prompt, texts, ended, ranking):
    return {"prompt": prompt, "responses": texts, "ended": ended, "ranking": ranking,
            "chosen": texts[ranking[0]], "rejected": texts[ranking[-1]]}


def collect_comparisons(policy, enc, prompts, rt, generator):
    """Sample K answers per prompt from SFT and have a labeler rank them. Each rank does prompts[rank::world_size];
    the shares are gathered so that every rank ends up with all comparisons, in prompt order."""
    mine = list(range(rt.rank, len(prompts), rt.world_size))
    per = max(1, gen_batch // K)
    rows = []
    for s in tqdm(range(0, len(mine), per), desc="collect", disable=not rt.master):
        idx = mine[s:s + per]
        replies = respond(policy, enc, [prompts[i] for i in idx for _ in range(K)], max_new_tokens, temperature,
                          generator=generator)
        for n, i in enumerate(idx):
            texts, ended = [r["text"] for r in replies[n * K:(n + 1) * K]], [r["ended"] for r in replies[n * K:(n + 1) * K]]
            ranking = world.rank(prompts[i], texts, labeler("labeler", seed, i), ended=ended, tau=labeler_tau)
            rows.append((i, comparison(prompts[i], texts, ended, ranking)))
    if rt.ddp:
        shares = [None] * rt.world_size
        torch.distributed.all_gather_object(shares, rows)
        rows = [r for share in shares for r in share]
    return [c for _, c in sorted(rows, key=lambda x: x[0])]


def load_comparisons(path):
    """out_dir/comparisons.jsonl, checked (data.readers), all rankings of the same size K."""
    if not os.path.isfile(path):
        sys.exit(f"error: {path} not found; run with --collect=True to sample comparisons")
    try:
        comps = read_comparisons(path)
    except DataError as e:
        sys.exit(f"error: {e}")
    if len({len(c["ranking"]) for c in comps}) != 1:
        sys.exit(f"error: {path}: every comparison must rank the same number of responses")
    return comps


def main():
    config = runtime.configure(globals())
    if loss not in LOSSES:
        sys.exit(f"error: --loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if K < 2:
        sys.exit("error: --K must be at least 2: a labeler ranks several answers")
    if not labeler_tau > 0:
        sys.exit("error: --labeler_tau must be > 0 (1e-6 gives noise-free labelers)")
    if not train and bon <= 0:
        sys.exit("error: nothing to do with --train=False and --bon=0 (add --bon=16 to use an existing reward.pt)")
    rt = runtime.setup(device, dtype, seed)
    sft_path, cmp_path, ck_path, log_path = (os.path.join(out_dir, f) for f in
                                             ("sft.pt", "comparisons.jsonl", "reward.pt", "reward.jsonl"))
    if rt.master:
        runtime.ensure_checkpoint(sft_path, "sft.py", out_dir)
    if rt.ddp:
        torch.distributed.barrier()
    policy, enc, sft_ck = runtime.load_model(sft_path, "sft", dropout=0.0)
    policy.to(rt.device).eval().requires_grad_(False)
    eot, block = enc.eot_token, sft_ck["model_args"]["block_size"]
    gen = torch.Generator(device=rt.device).manual_seed(seed + rt.rank)
    t0 = time.time()

    if train:
        # ---- 1. comparisons: K answers per prompt from SFT, ranked by a labeler (or pairs from a file)
        if data:
            try:
                prefs = read_preferences(data)
            except DataError as e:
                sys.exit(f"error: {e}")
            comps = [comparison(p["prompt"], [p["chosen"], p["rejected"]], [True, True], [0, 1]) for p in prefs]
        elif collect and not resume:
            comps = collect_comparisons(policy, enc, world.prompts("train")[:n_prompts or None], rt, gen)
            if rt.master:
                write_jsonl(cmp_path, comps)
                print(f"wrote {len(comps)} rankings of {K} answers to {cmp_path} ({time.time() - t0:.0f}s)")
        else:
            comps = load_comparisons(cmp_path)
        Kc = len(comps[0]["ranking"])
        # every comparison's answers as token rows in ranked order, best first: the loss wants that order
        rows = [[scored_ids(enc, c["prompt"], c["responses"][k], c["ended"][k], block) for k in c["ranking"]]
                for c in comps]
        perm = torch.randperm(len(comps), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = max(1, round(val_fraction * len(comps)))
        val_idx, train_idx = sorted(perm[:n_val]), perm[n_val:]
        val_rows = [r for i in val_idx for r in rows[i]]
        # --lm_feature: log p_SFT of every answer, once (SFT is frozen), in the same ranked order; zeros otherwise
        lp_all = torch.zeros(len(comps), Kc)
        if lm_feature:
            lp_all = reply_logprobs(policy, enc, [c["prompt"] for c in comps for _ in c["ranking"]],
                                    [{"text": c["responses"][k], "ended": c["ended"][k]} for c in comps
                                     for k in c["ranking"]]).view(len(comps), Kc)
        # held-out yardsticks: the noise-free gold ordering, and a second labeler ranking the same answers
        # (gold components for every comparison, in ranked order: the report also looks at the training ones)
        parts = None if data else [[world.gold_components(c["prompt"], c["responses"][k], c["ended"][k])
                                    for k in c["ranking"]] for c in comps]
        gold_all = None if data else torch.tensor([[world.gold(c["prompt"], c["responses"][k], c["ended"][k])
                                                    for k in c["ranking"]] for c in comps])  # (N, K)
        golds = None if data else gold_all[val_idx]
        first = torch.arange(Kc, 0, -1.0).expand(n_val, Kc)  # the first labeler's ranking as scores, best highest
        second = None
        if not data:
            second = torch.zeros(n_val, Kc)
            for n, i in enumerate(val_idx):
                c = comps[i]
                again = world.rank(c["prompt"], c["responses"], labeler("second", seed, i), ended=c["ended"],
                                   tau=labeler_tau)
                pos = {k: Kc - p for p, k in enumerate(again)}
                second[n] = torch.tensor([float(pos[k]) for k in c["ranking"]])

        # ---- 2. the reward model: the SFT network with a scalar head that starts at zero (loss starts at ln 2)
        rm = runtime.model_from_checkpoint(sft_ck, scalar_head=True, dropout=dropout).to(rt.device)
        optimizer = runtime.configure_optimizer(rm, weight_decay, lr, (beta1, beta2), rt.device_type)
        lm_w = torch.zeros((), device=rt.device, requires_grad=True)  # the weight w of log p_SFT (stays 0 if off)
        if lm_feature:  # one scalar with a 100x step: it must travel ~0.05 in a few hundred steps of lr <= 3e-4
            optimizer.add_param_group({"params": [lm_w], "weight_decay": 0.0, "lr_scale": 100.0})
        start = 0
        if resume:
            ck = runtime.load_checkpoint(ck_path, "reward")
            start = runtime.restore(ck, rm, optimizer, rt.scaler)
            lm_w.data.fill_(ck.get("lm_weight", 0.0))
            print(f"resuming from {ck_path} at step {start}")
        raw_rm = rm
        rm = runtime.wrap(rm, rt, compile)
        loss_fn = LOSSES[loss]
        steps_per_epoch = math.ceil(len(train_idx) / (batch_size * rt.world_size))
        iters = max_iters or epochs * steps_per_epoch

        def get_batch(it):
            """Step it's prompts for this rank: a fresh permutation per epoch, seeded, so resuming redraws them."""
            e, s = divmod(it, steps_per_epoch)
            order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed * 1000 + e)).tolist()
            first_pick = (s * rt.world_size + rt.rank) * batch_size
            picks = [train_idx[order[(first_pick + b) % len(order)]] for b in range(batch_size)]
            ids, attn = M.pad_rows([r for i in picks for r in rows[i]], eot)  # (B*K, T), right-padded
            return ids.to(rt.device), attn.to(rt.device), lp_all[picks].to(rt.device)

        def held_out():
            raw_rm.eval()
            with rt.ctx:
                r = score_rows(raw_rm, val_rows, eot, batch_size=256).view(n_val, Kc) + lm_w.item() * lp_all[val_idx]
            raw_rm.train()
            return r, {"val_loss": loss_fn(r).item(), "val_acc": pairwise_accuracy(r, first),
                       "val_acc_gold": pairwise_accuracy(r, golds) if golds is not None else None}

        def save(step, **extra):
            runtime.save_checkpoint(ck_path, {
                **runtime.training_state(raw_rm, optimizer, rt.scaler), "config": config, "kind": "reward", "step": step,
                "model_args": {**sft_ck["model_args"], "scalar_head": True, "dropout": 0.0},
                "tokenizer": sft_ck.get("tokenizer", "world"), "K": Kc, "loss": loss,
                "gain": 1.0, "bias": 0.0, "lm_weight": lm_w.item(), "metrics": {}, **extra})

        zero_loss = loss_fn(torch.zeros(1, Kc)).item()  # a zero head: ln 2 for Bradley-Terry, ln(K!)/(K-1) for PL
        if rt.master:
            if not resume and os.path.exists(log_path):
                os.remove(log_path)  # a fresh run starts a fresh log
            print(f"{len(train_idx)} train / {n_val} held-out rankings of {Kc} answers, {Kc * (Kc - 1) // 2} pairs "
                  f"each; {iters} steps of {batch_size * rt.world_size} prompts, loss {loss}, device {rt.device}")
            print(f"held-out loss before training {held_out()[1]['val_loss']:.4f} (a zero head gives {zero_loss:.4f})")
        bar = tqdm(range(start, iters), initial=start, total=iters, disable=not rt.master, desc="reward")
        for it in bar:
            for group in optimizer.param_groups:
                group["lr"] = runtime.get_lr(it, warmup_iters, iters, lr, min_lr) * group.get("lr_scale", 1.0)
            ids, attn, lp = get_batch(it)
            with rt.ctx:
                r = rm_score(rm, ids, attn).view(batch_size, Kc) + lm_w * lp  # (B, K) fp32, ranked order
            l = loss_fn(r)
            rt.scaler.scale(l).backward()
            if rt.ddp and lm_feature:  # DDP averages the network's gradients; w lives outside it
                torch.distributed.all_reduce(lm_w.grad)
                lm_w.grad /= rt.world_size
            runtime.optimizer_step(rm, optimizer, rt.scaler, grad_clip)
            if rt.master:
                last = it + 1 in (iters, stop_at)
                val = held_out()[1] if (it + 1) % eval_interval == 0 or last else \
                    dict.fromkeys(("val_loss", "val_acc", "val_acc_gold"))
                acc = pairwise_accuracy(r.detach().cpu(), first[:1].expand(batch_size, Kc))  # this batch's pairs
                row = {"iter": it + 1, "loss": l.item(), "acc": acc, "lr": optimizer.param_groups[0]["lr"], **val,
                       "time": time.time() - t0}
                runtime.append_jsonl(log_path, row)
                if val["val_loss"] is not None:
                    bar.set_postfix(loss=f"{l.item():.3f}", val=f"{val['val_loss']:.3f}", acc=f"{val['val_acc']:.3f}")
                    if (it + 1) % eval_interval == 0 or it + 1 == stop_at:
                        save(it + 1)  # for --resume; only the final save below carries the normalisation
            if it + 1 == stop_at:
                break
        if 0 < stop_at < iters:  # "killed": no normalisation, report or best-of-N
            runtime.cleanup()
            return


        if rt.master:
            # ---- 3. normalise on SFT's own answers (all collected ones): gain * r + bias has mean 0, std 1 there,
            # so PPO's reward and KL penalty have a known scale
            raw_rm.eval()
            with rt.ctx:
                r_all = score_rows(raw_rm, [r for rs in rows for r in rs], eot, batch_size=256)
            r_all += lm_w.item() * lp_all.view(-1)  # the whole reward: head + w * log p_SFT
            gain = 1.0 / r_all.std().clamp(min=1e-6).item()
            bias = -r_all.mean().item() * gain
            # ---- 4. report: the reward model against the labelers, against gold, and the labelers' own ceiling
            r_val = r_all.view(len(comps), Kc)[val_idx]  # (n_val, K), ranked order
            val = {"val_loss": loss_fn(r_val).item(), "val_acc": pairwise_accuracy(r_val, first),
                   "val_acc_gold": pairwise_accuracy(r_val, golds) if golds is not None else None}
            metrics = {**val, "ceiling_labelers": pairwise_accuracy(first, second) if second is not None else None,
                       "labeler_acc_gold": pairwise_accuracy(first, golds) if golds is not None else None,
                       "calibration": calibration(r_val), "time": time.time() - t0}
            if golds is not None:
                def by_part(idx):  # gold accuracy by component on these comparisons (see accuracy_by_part)
                    return accuracy_by_part(r_all.view(len(comps), Kc)[idx], gold_all[idx], [parts[i] for i in idx])
                # the same on the training comparisons: low there too means the model did not fit what the rankings
                # say (underfitting); high there but low on held-out prompts would mean it memorised its prompts
                metrics["acc_gold_by_part"], metrics["acc_gold_by_part_train"] = by_part(val_idx), by_part(train_idx)
            save(iters, gain=gain, bias=bias, metrics=metrics)
            lm_weight = lm_w.item()
            print(f"\nreward model on {n_val} held-out prompts ({n_val * Kc * (Kc - 1) // 2} pairs), {metrics['time']:.0f}s:")
            print(f"  held-out loss {val['val_loss']:.3f} (from {zero_loss:.3f} with the zero head)")
            print(f"  agrees with the labelers on {val['val_acc']:.1%} of pairs", end="")
            if second is not None:
                print(f"; two labelers agree with each other on {metrics['ceiling_labelers']:.1%} (the ceiling)")
                print(f"  agrees with the gold ordering on {val['val_acc_gold']:.1%} of pairs with distinct gold; "
                      f"a single labeler does on {metrics['labeler_acc_gold']:.1%}")
                print("  ... on pairs that differ most in " + ", ".join(
                    f"{k} {a:.1%} ({n})" for k, (a, n) in metrics["acc_gold_by_part"].items()))
                print("  ... and on its own training comparisons: " + ", ".join(
                    f"{k} {a:.1%} ({n})" for k, (a, n) in metrics["acc_gold_by_part_train"].items()))
            else:
                print()
            print("  calibration: predicted P(labeler agrees) -> observed")
            for lo, hi, n, p, seen in metrics["calibration"]:
                print(f"    [{lo:.1f}, {hi:.1f}]  {n:4d} pairs  predicted {p:.2f}  observed {seen:.2f}")
            head = f"(head + {lm_w.item():.4f} * log p_SFT)" if lm_feature else "r"
            print(f"  normalised as {gain:.3f} * {head} + {bias:.3f} (mean 0, std 1 on {len(r_all)} SFT answers)")
            for n, i in enumerate(val_idx[:3]):
                c = comps[i]
                print(f"  {c['prompt'][-1]['content']}")
                for rank_, k in enumerate(c["ranking"]):
                    g = f", gold {golds[n, rank_]:.2f}" if golds is not None else ""
                    print(f"    #{rank_ + 1} by the labeler, reward {gain * r_val[n, rank_].item() + bias:+.2f}{g}: "
                          f"{c['responses'][k]!r}")
    elif rt.master:  # --train=False: the reward model on disk, for best-of-N
        ck = runtime.load_checkpoint(ck_path, "reward")
        raw_rm, gain, bias = runtime.model_from_checkpoint(ck, dropout=0.0).to(rt.device), ck["gain"], ck["bias"]
        metrics, lm_weight = ck.get("metrics", {}), ck.get("lm_weight", 0.0)

    # ---- 5. best-of-N (rejection sampling) on held-out prompts: the RM picks, the hidden human judges
    if rt.master and bon > 0:
        raw_rm.eval()
        evals = world.prompts("eval")
        g = torch.Generator(device=rt.device).manual_seed(seed + 1)
        with rt.ctx:
            picks = best_of_n(policy, raw_rm, enc, evals, bon, gain, bias, max_new_tokens, temperature, generator=g,
                              batch_size=gen_batch, lm_weight=lm_weight)
            singles = [s for i in range(0, len(evals), gen_batch)
                       for s in respond(policy, enc, evals[i:i + gen_batch], max_new_tokens, temperature, generator=g)]
        gold_bon = [world.gold(p, x["text"], x["ended"]) for p, x in zip(evals, picks)]
        gold_one = [world.gold(p, x["text"], x["ended"]) for p, x in zip(evals, singles)]
        gold_cands = [[world.gold(p, x["text"], x["ended"]) for x in pk["candidates"]] for p, pk in zip(evals, picks)]
        rate, ci = world.win_rate(gold_bon, gold_one)
        oracle_rate, _ = world.win_rate(list(map(max, gold_cands)), gold_one)  # what a perfect reward model would get
        res = {"bon": bon, "bon_gold": sum(gold_bon) / len(evals), "sft_gold": sum(map(sum, gold_cands)) / (bon * len(evals)),
               "oracle_gold": sum(map(max, gold_cands)) / len(evals), "bon_win_rate": rate, "bon_win_ci": ci,
               "oracle_win_rate": oracle_rate}
        print(f"\nbest-of-{bon} on {len(evals)} held-out prompts, judged by the hidden human (ideal = 1.0):")
        print(f"  SFT sample mean gold {res['sft_gold']:.3f}; RM's pick {res['bon_gold']:.3f}; "
              f"gold's own pick (the ceiling) {res['oracle_gold']:.3f}")
        print(f"  RM's pick beats a single SFT sample {rate:.1%} +- {ci:.1%} of the time (ties count half; "
              f"gold's own pick would {oracle_rate:.1%})")
        for p, x in list(zip(evals, picks))[:3]:
            print(f"  {p[-1]['content']} -> {x['text']!r} (reward {x['score']:+.2f})")
        if train:
            ck = runtime.load_checkpoint(ck_path, "reward")
            runtime.save_checkpoint(ck_path, {**ck, "metrics": {**metrics, **res}})
    runtime.cleanup()


if __name__ == "__main__":
    main()
