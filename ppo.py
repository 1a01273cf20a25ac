"""
Stage 3: KL-penalised PPO against the reward model, starting from SFT -> out/ppo.pt

InstructGPT step 3: "the policy generates an output; the reward model calculates a reward; the reward is used
to update the policy using PPO". We maximise the KL-regularised objective (InstructGPT eq. 2 without its
pretraining term, Ziegler et al. 2019 eq. 2)

    max_pi  E_{x, y~pi} [ r(x, y) ]  -  beta * KL( pi(.|x) || pi_SFT(.|x) )

The KL term keeps the policy close to SFT, where the reward model is trustworthy; without it the policy finds
what the reward model overrates (reward hacking: try --beta=0 --max_iters=120 and watch gold fall while the RM
score climbs). One iteration, as in the RLHF references:
    1. rollouts     sample an answer per prompt from pi; log-probs of pi, pi_SFT and values V on its tokens
    2. rewards      r_t = -beta * KL_t on every answer token, + the RM score on the last one (token_rewards);
                    an answer that never ends its turn loses no_end_penalty (the "EOS trick" of Huang
                    et al. 2024, https://arxiv.org/abs/2403.17031, which sets such a score to -1)
    3. advantages   GAE over the answer tokens (gae), whitened over the batch (masked_whiten)
    4. PPO epochs   minibatch steps on the clipped surrogate (ppo_clip_loss) + clipped value loss
    5. KL control   optionally adapt beta toward target_kl (adaptive_kl_coef)

    python ppo.py                          # builds base, sft, comparisons and reward model first if missing
    python ppo.py --reward=gold            # "PPO-GT": the hidden human's score as the reward (a ceiling)
    python ppo.py --target_kl=3 --kl_horizon=1280   # adaptive beta (Ziegler et al.'s controller), 3 nats
    python ppo.py --resume=True            # continue from out/ppo.pt exactly where it was saved
    python ppo.py --prompts=my.jsonl       # RL on your own prompts, against a reward model from
                                           # `python reward.py --data=prefs.jsonl`
    torchrun --nproc_per_node=2 ppo.py     # each rank samples its own rollouts, gradients are averaged

Departures from InstructGPT:
- the value function is a scalar head on the policy's own trunk, reading detached features with its own
  learning rate (vf_lr), instead of a separate critic initialised from the reward model: one network instead
  of two halves the cost, and the detach keeps the value loss's gradient out of the trunk (only the clip of
  the global gradient norm, grad_clip, still sees the head's gradient with the policy's);
- no pretraining-mix term (PPO-ptx): InstructGPT's plain "PPO" models have none either;
- options: --reward=gold (the hidden human's score as the reward, less the missing-end penalty as every
  score here; --no_end_penalty=0 for gold alone), --kl_estimator=k3. A reward model trained with
  reward.py --lm_feature brings its likelihood term as part of its sequence score (rollout.reward_scores).
"""
import os
import random
import time

import torch
from tqdm import tqdm

import model as M
import runtime
from data import world
from rollout import compare_to_sft, prompts_fit, respond, reward_scores, training_prompts

# -----------------------------------------------------------------------------
# config (every name can be overridden with --name=value)
out_dir = "out"            # reads out_dir/sft.pt and reward.pt, writes out_dir/ppo.pt and out_dir/ppo.jsonl
reward = "rm"              # "rm": the learned reward model; "gold": the hidden human's score (PPO-GT
                           # baseline; no_end_penalty still applies)
prompts = ""               # "" = the world's train prompts; or a JSONL file of
                           # {"prompt": ...} / {"messages": ...}
seed = 1337                # same seed, same run (on CPU)
device = "auto"            # auto: cuda > mps > cpu
dtype = "auto"             # fp32 on CPU; log-probs, KL, advantages and losses are always fp32
compile = False            # torch.compile the policy (CUDA)
max_iters = 40             # PPO iterations (one rollout batch each): the hidden human's score on the
                           # rollouts levels off within them; further ones spend KL and can lose gold
batch_size = 128           # prompts (= episodes) per rollout batch, per process
minibatch_size = 64        # episodes per gradient step: with much smaller minibatches the steps were too
                           # noisy to buy more reward with the KL they spent
ppo_epochs = 2             # passes over each rollout batch: fewer epochs on more, fresher batches beat more
                           # epochs on fewer batches, in about the same time
lr = 1.5e-4                # the policy's learning rate: about the largest whose KL did not run away
                           # (docs/experiments.md)
max_new_tokens = 32        # longest answer; answers that never end their turn are penalised (the "EOS trick")
temperature = 1.0          # pure sampling (no top-k/top-p): the sampled tokens give an unbiased KL estimate
beta = 0.2                 # KL coefficient (initial value when target_kl is set); InstructGPT: 0.02. With a
                           # reward model this rough, smaller ones let some runs drift to where it is wrong
                           # and lose gold (0.05 did on some seeds and CPUs: docs/experiments.md)
target_kl = 0.0            # > 0: adapt beta toward this KL (nats per answer); 0: fixed beta
kl_horizon = 10000         # the controller's horizon (episodes), as in Ziegler et al.'s code, whose runs were
                           # hundreds of horizons long: an update moves beta by at most 20 % x batch_size /
                           # kl_horizon, so in a 40-iteration run beta barely moves; 1280 (K_beta = 0.1 at
                           # batch 128) lets it act within the run
kl_estimator = "k1"        # per-token KL penalty: "k1" = logp - logp_ref, "k3" = (r - 1) - log r with
                           # r = pi_SFT / pi (k3 estimates the KL's value; as a reward its gradient is not
                           # the KL's: kl_k3)
no_end_penalty = 1.0       # subtracted from the score of an answer that never ends its turn: one standard
                           # deviation of the normalised score, so rambling to the limit never pays
gamma, lam = 1.0, 0.95     # GAE discount and bias-variance trade-off, Ziegler et al.'s values (and PPO's
                           # lam): lam < 1 leans on the value head's estimates, lam = 1 is the plain return
cliprange = 0.2            # PPO-clip epsilon for the policy ratio: the PPO paper's best (its Table 1)
cliprange_value = 0.2      # and for the value function, as in Ziegler et al.'s code: returns are on the
                           # normalised score's scale, so 0.2 is a fifth of a standard deviation per update
vf_coef = 0.5              # weight of the value loss. It trains only the value head, which has its own Adam
                           # group, and Adam's step ignores a loss's scale: vf_coef only sets the head's share
                           # of the global gradient norm that grad_clip clips (vf_lr sets how fast it learns)
vf_lr = 1e-3               # learning rate of the value head: a fresh linear probe needs far larger steps
grad_clip = 1.0            # clip the global gradient norm (0 = off): one outlier minibatch cannot throw
                           # the policy far in a single step
sample_interval = 20       # print a few samples every this many iterations
save_interval = 20         # checkpoint every this many iterations (and at the end): a save writes the policy
                           # and its optimizer moments, too slow for every iteration; a kill loses no more
eval_samples = 4           # answers per held-out prompt in the final PPO-vs-SFT comparison
n_eval = 0                 # held-out prompts in that comparison (0 = all of them)
resume = False             # continue from out_dir/ppo.pt (policy, optimizer, beta, iteration, every RNG)
# -----------------------------------------------------------------------------


def masked_mean(x, mask):
    """Mean over positions where mask is 1. torch.where (not x * mask) so that even an inf or NaN at a padding
    position cannot leak into the result: a loss term such as exp(log-ratio) may overflow there. (Log-probs
    and values, finite at every position of a finite network, are masked by a product elsewhere.)"""
    return torch.where(mask > 0, x, 0.0).sum() / mask.sum().clamp(min=1)


def masked_whiten(x, mask):
    """Advantages normalised to mean 0, std 1 over the real (masked-in) tokens only; padding stays 0. Not in
    the PPO paper's equations but in its reference code, and in Ziegler et al. 2019's RLHF code, which
    whitens each rollout batch's advantages (https://arxiv.org/abs/1909.08593)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return torch.where(mask > 0, (x - mean) * torch.rsqrt(var + 1e-8), 0.0)


def kl_k1(logp, logp_ref):
    """k1 = log pi(y) - log ref(y) on a token y ~ pi: unbiased for KL(pi || ref), but negative on some tokens.
    Schulman, "Approximating KL divergence" (2020), http://joschu.net/blog/kl-approx.html"""
    return logp - logp_ref


def kl_k3(logp, logp_ref):
    """k3 = (r - 1) - log r with r = ref(y) / pi(y) on a token y ~ pi: unbiased for KL(pi || ref) and never
    negative (log r <= r - 1), with lower variance when pi is close to ref. Schulman, "Approximating KL
    divergence" (2020), http://joschu.net/blog/kl-approx.html. Its value, not its gradient: as the reward of
    one token, E_pi[k3 grad log pi] = grad KL(pi || ref) - grad KL(ref || pi), not grad KL(pi || ref) as k1
    gives (over an answer, the same at each state pi visits; Tang & Munos 2025, "On a few pitfalls in KL
    divergence gradient estimation for RL", arXiv 2506.09477)."""
    log_r = logp_ref - logp
    # expm1, not exp - 1: near pi = ref, exp(log r) - 1 in fp32 cancels to a few digits, even below zero
    return torch.expm1(log_r) - log_r


def kl_penalty(logp, logp_ref, estimator):
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi: estimator "k1" or "k3"."""
    return kl_k1(logp, logp_ref) if estimator == "k1" else kl_k3(logp, logp_ref)


def token_rewards(scores, kl, action, kl_coef):
    """Per-token rewards (B, T): -beta * KL_t on every answer token, plus the sequence score r(x, y) on the
    answer's last token, so (at gamma = 1) the return of an answer is r(x, y) - beta * sum_t KL_t = R(x, y) of
    Ziegler et al. 2019 eq. 2 (https://arxiv.org/abs/1909.08593) and InstructGPT eq. 2
    (https://arxiv.org/abs/2203.02155).
    scores (B,), kl and action (B, T), action 1 on the answer's tokens."""
    rewards = torch.where(action > 0, -kl_coef * kl, 0.0)  # nothing (not even a NaN) off the answer
    last = action.size(1) - 1 - action.flip(1).argmax(1)  # index of each answer's last token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards, values, mask, gamma, lam):
    """Generalised Advantage Estimation over answer tokens, Schulman et al. 2016 eq. 16
    (https://arxiv.org/abs/1506.02438):
        delta_t = r_t + gamma V_{t+1} - V_t
        A_t = sum_l (gamma lam)^l delta_{t+l} = delta_t + gamma lam A_{t+1}
    mask (B, T) is 1 on action tokens; after the last action the episode is over (V = 0, A = 0), and masked
    positions are skipped so padding never leaks into an advantage. Returns (advantages, returns = A + V)."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    next_v = torch.zeros(B, device=rewards.device)
    next_a = torch.zeros(B, device=rewards.device)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        a = delta + gamma * lam * next_a
        adv[:, t] = torch.where(m > 0, a, 0.0)  # where, not a * m: a NaN in padding stays out
        next_v = torch.where(m > 0, values[:, t], next_v)  # carry across masked positions unchanged
        next_a = torch.where(m > 0, a, next_a)
    return adv, torch.where(mask > 0, adv + values, 0.0)


def ppo_clip_loss(logp, old_logp, adv, mask, cliprange):
    """PPO's clipped surrogate, Schulman et al. 2017 eq. 7 (https://arxiv.org/abs/1707.06347), as a loss:
        L = E_t[ max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps)) ],   ratio_t = pi(a_t) / pi_old(a_t)
    averaged over the answer tokens (mask). Returns (loss, stats): the clipped fraction, the approximate KL
    to pi_old (0.5 * E[(log ratio)^2]) and the mean ratio, as floats for the log."""
    ratio = torch.exp(torch.where(mask > 0, logp - old_logp, 0.0))  # exactly 1 off the answer
    loss = masked_mean(torch.max(-adv * ratio, -adv * ratio.clamp(1 - cliprange, 1 + cliprange)), mask)
    stats = {"clipfrac": masked_mean(((ratio - 1).abs() > cliprange).float(), mask).item(),
             "approx_kl": masked_mean(0.5 * (logp - old_logp).detach() ** 2, mask).item(),
             "ratio": masked_mean(ratio.detach(), mask).item()}
    return loss, stats


def clipped_value_loss(values, old_values, returns, mask, cliprange_value):
    """The value loss L^VF = (V - R)^2 of Schulman et al. 2017 eq. 9 (https://arxiv.org/abs/1707.06347),
    clipped like the policy as in PPO's reference code (Engstrom et al. 2020 sec. 3,
    https://arxiv.org/abs/2005.12729), averaged over the answer tokens:
        0.5 * E_t[ max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2) ]"""
    v_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


def adaptive_kl_coef(kl_coef, kl, target, n_steps, horizon):
    """Ziegler et al. 2019 sec. 2.2 (https://arxiv.org/abs/1909.08593), a log-space proportional controller:
        e = clip(KL / KL_target - 1, -0.2, 0.2),   beta <- beta * (1 + K_beta * e)
    with K_beta = n_steps / horizon (this batch's episodes over the horizon), as in their released code."""
    err = max(-0.2, min(0.2, kl / target - 1))
    return kl_coef * (1 + err * n_steps / horizon)


def explained_variance(values, returns, mask):
    """1 - Var[R - V] / Var[R] over the answer tokens: 1 = the value head predicts the returns perfectly,
    <= 0 = no better than their mean (a diagnostic for the log)."""
    resid = returns - values
    var_resid = masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
    return 1 - var_resid / masked_mean((returns - masked_mean(returns, mask)) ** 2, mask).clamp(min=1e-8)


def forward_policy(policy, seq, attn, temperature):
    """Per-token log-probs of seq[:, 1:] at the sampling temperature, values of the states before each token,
    and the policy's entropy, all (B, L-1) fp32, from ONE pass through the shared trunk. The value head reads
    detached features: with Adam even a tiny value-loss gradient moves every trunk weight by about lr, so a
    value loss flowing into the trunk would change the policy's text."""
    logits, _, values = policy(seq, attention_mask=attn, return_values=True, detach_values=True)
    logits = logits[:, :-1].float() / temperature
    logp = M.token_logprobs(logits, seq[:, 1:])
    with torch.no_grad():  # logged only: no graph (with GPT-2's 50k vocabulary it would be large)
        probs = torch.softmax(logits, -1)
        entropy = torch.logsumexp(logits, -1) - (probs * logits).sum(-1)
    return logp, values[:, :-1], entropy


def main():
    # ---- 0. options (checked before anything is read or written), models, optimizer, resume
    config = runtime.configure(globals(), ranges={
        "minibatch_size": (lambda v: 1 <= v <= batch_size, "between 1 and --batch_size"),
        "reward": (lambda v: v in ("rm", "gold"), "'rm' or 'gold'"), "max_iters": (lambda v: v >= 1, ">= 1"),
        "kl_estimator": (lambda v: v in ("k1", "k3"), "'k1' or 'k3'"),
        "save_interval": (lambda v: v >= 1, ">= 1"),
        # K_beta = episodes / horizon <= 1: one update moves beta by at most 20 %, so it stays above 0
        "kl_horizon": (lambda v: not target_kl or v >= batch_size * int(os.environ.get("WORLD_SIZE", 1)),
                       ">= --batch_size x processes with --target_kl, so an update moves beta by <= 20 %")})
    if reward == "gold" and prompts:
        raise SystemExit("error: --reward=gold judges the world's language only; drop it with --prompts")
    if target_kl > 0 and beta == 0:  # the controller multiplies beta: from 0 it would never move
        raise SystemExit("error: --target_kl adapts beta by factors, so it needs --beta > 0 to start from")
    train_prompts = training_prompts(prompts)  # a bad file is one line, before anything is loaded
    world_prompts = not prompts  # the hidden human judges the world's prompts only
    ck_path, log_path = os.path.join(out_dir, "ppo.pt"), os.path.join(out_dir, "ppo.jsonl")
    # read before the inputs: a missing or broken checkpoint must not first build base, SFT and reward model
    ck = runtime.load_checkpoint(ck_path, "ppo", need=runtime.RESUME + ("rank_rng", "kl_coef")) \
        if resume else None
    rt = runtime.setup(device, dtype, seed)
    hint = "a lower --lr or --temperature closer to 1"
    # the frozen SFT reference and reward model, each built by its stage first if missing
    ref, enc, sft_ck, rm, rm_ck = runtime.load_rl_inputs(out_dir, reward == "rm", rt)
    prompts_fit(prompts, train_prompts, enc, sft_ck["model_args"]["block_size"], max_new_tokens)
    # the policy starts as SFT, with a fresh scalar head on its trunk as the value function (a departure)
    policy = runtime.model_from_checkpoint(sft_ck, os.path.join(out_dir, "sft.pt"), dropout=0.0,
                                           scalar_head=True).to(rt.device)
    head = list(policy.scalar_head.parameters())
    trunk = [p for n, p in policy.named_parameters() if not n.startswith("scalar_head.")]
    optimizer = torch.optim.AdamW([{"params": trunk, "lr": lr}, {"params": head, "lr": vf_lr}],
                                  betas=(0.9, 0.95), weight_decay=0.0, fused=rt.device_type == "cuda")
    rng = random.Random(seed + rt.rank)  # the prompt sampler: each rank draws its own prompts
    kl_coef, start = beta, 0
    if resume:
        runtime.trained_from(ck_path, ck, sft_ck, remedy="start afresh without --resume")
        start = runtime.restore(ck, policy, optimizer, rt.scaler)  # with this run's lr and vf_lr
        kl_coef = ck["kl_coef"] if target_kl > 0 else beta  # an adapted beta resumes; a fixed one is --beta
        runtime.set_rank_rng_states(rng, ck["rank_rng"], rt)
        if rt.master and start < max_iters:
            print(f"resuming from {ck_path} at iteration {start}")
        if rt.master and start >= max_iters:
            print(f"{ck_path} is already at iteration {start} >= --max_iters={max_iters}: nothing to train "
                  "(raise --max_iters to continue); evaluating it")
    raw_policy = policy
    policy = runtime.wrap(policy, rt, compile)
    if rt.master:  # the run is known to start: a fresh log, or a resumed run's rows up to its checkpoint
        runtime.start_log(log_path, start if resume else None, ck)

    bar = tqdm(range(start, max_iters), initial=start, total=max_iters, disable=not rt.master, desc="ppo")
    t0, watch = time.time(), runtime.Stopwatch(rt.device_type, rt.master)  # watch: where the time goes
    for it in bar:
        # ---- 1. rollouts: sample answers with the KV cache; log-probs under pi and pi_SFT, values (no grad)
        batch_prompts = [train_prompts[rng.randrange(len(train_prompts))] for _ in range(batch_size)]
        replies, batch = respond(raw_policy, enc, batch_prompts, max_new_tokens, temperature,
                                 return_batch=True)
        watch.lap("sampling")
        seq, attn, gen = (x.to(rt.device) for x in batch[:3])
        action = gen[:, 1:].float()  # (B, L-1): 1 where seq[:, t+1] was sampled by the policy
        with torch.no_grad(), rt.ctx:  # the values need this pass anyway; pi_old's log-probs come with them
            old_logp, old_values, _ = forward_policy(policy, seq, attn, temperature)
            ref_logp = M.sequence_logprobs(ref, seq, attn, temperature)
        old_values = old_values * action
        ended = torch.tensor([r["ended"] for r in replies], dtype=torch.float, device=rt.device)
        watch.lap("scoring")
        golds = torch.tensor([world.gold(p, r["text"], r["ended"]) for p, r in zip(batch_prompts, replies)]) \
            if world_prompts else torch.zeros(len(replies))  # logged only: gold never trains the policy
        watch.lap("hidden human")

        # ---- 2. rewards: the score (less the missing-end penalty) at the last token, -beta KL at every token
        if reward == "gold":
            scores = golds
        else:
            scores = reward_scores(rm, enc, batch_prompts, replies, rm_ck["gain"], rm_ck["bias"],
                                   lm_weight=rm_ck.get("lm_weight", 0.0), sft=ref)
        scores = scores.to(rt.device) - no_end_penalty * (1 - ended)
        kl = kl_penalty(old_logp, ref_logp, kl_estimator)  # (B, L-1)
        rewards = token_rewards(scores, kl, action, kl_coef)
        runtime.check_finite("ppo", it + 1, hint, score=scores, reward=rewards)

        # ---- 3. advantages (GAE) and returns, advantages whitened over the batch's answer tokens (under
        # torchrun, each rank's own batch: its statistics are not gathered)
        adv, returns = gae(rewards, old_values, action, gamma, lam)
        adv = masked_whiten(adv, action)
        watch.lap("scoring")

        # ---- 4. PPO: ppo_epochs passes of minibatch steps on the clipped surrogate and clipped value loss
        stats = []
        for epoch in range(ppo_epochs):
            order = torch.randperm(len(batch_prompts))
            for i in range(0, len(batch_prompts), minibatch_size):
                mb = order[i:i + minibatch_size]
                with rt.ctx:
                    logp, values, entropy = forward_policy(policy, seq[mb], attn[mb], temperature)
                pg_loss, st = ppo_clip_loss(logp, old_logp[mb], adv[mb], action[mb], cliprange)
                vf_loss = clipped_value_loss(values, old_values[mb], returns[mb], action[mb], cliprange_value)
                loss = pg_loss + vf_coef * vf_loss
                runtime.check_finite("ppo", it + 1, hint, pg_loss=pg_loss, vf_loss=vf_loss)
                rt.scaler.scale(loss).backward()
                grad_norm = runtime.optimizer_step(policy, optimizer, rt.scaler, grad_clip)
                runtime.check_finite("ppo", it + 1, hint, grad_norm=grad_norm)
                stats.append({**st, "pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(),
                              "entropy": masked_mean(entropy.detach(), action[mb]).item()})

        watch.lap("training")

        # ---- 5. KL controller: the k1 KL per answer (averaged over ranks) moves beta toward target_kl
        seq_kl = (kl_k1(old_logp, ref_logp) * action).sum(1).mean()
        if rt.ddp:
            torch.distributed.all_reduce(seq_kl)
            seq_kl /= rt.world_size
        if target_kl > 0:
            n_episodes = batch_size * rt.world_size
            kl_coef = adaptive_kl_coef(kl_coef, seq_kl.item(), target_kl, n_episodes, kl_horizon)

        # ---- 6. log, samples, checkpoint
        row = {"iter": it + 1, "score": scores.mean().item(),
               "gold": golds.mean().item() if world_prompts else None,
               "kl": seq_kl.item(), "beta": kl_coef, "length": action.sum(1).mean().item(),
               "ended": ended.mean().item(),
               "value_explained_var": explained_variance(old_values, returns, action).item(),
               "time": time.time() - t0}
        for k in ("entropy", "clipfrac", "approx_kl", "pg_loss", "vf_loss"):
            row[k] = sum(s[k] for s in stats) / len(stats)
        row["first_ratio"] = stats[0]["ratio"]  # exactly 1 up to rounding: pi_old is the policy before step 1
        if rt.master:
            runtime.append_jsonl(log_path, row)
            bar.set_postfix(score=f"{row['score']:.2f}", kl=f"{row['kl']:.2f}",
                            **({"gold": f"{row['gold']:.2f}"} if world_prompts else {}))
            if (it + 1) % sample_interval == 0:
                for p, r in list(zip(batch_prompts, replies))[:2]:
                    tqdm.write(f"  {p[-1]['content']} -> {r['text']!r}")
        if (it + 1) % save_interval == 0 or it + 1 == max_iters:
            rank_rng = runtime.rank_rng_states(rng, rt)  # every rank takes part; rank 0 writes
            if rt.master:
                state = runtime.training_state(raw_policy, optimizer, rt.scaler, log_path)
                runtime.save_checkpoint(ck_path, {
                    **state, "rank_rng": rank_rng, "kl_coef": kl_coef, "config": config, "kind": "ppo",
                    "step": it + 1, "sft_fingerprint": sft_ck["fingerprint"],
                    "model_args": sft_ck["model_args"], "tokenizer": sft_ck.get("tokenizer", "world")})
        watch.lap("logs & checkpoints")

    # ---- 7. held-out comparison with SFT under the hidden human (the world's prompts only)
    if rt.master and world_prompts:
        evals = world.prompts("eval")[:n_eval or None] * eval_samples
        print(f"\nheld-out prompts ({len(evals) // eval_samples} x {eval_samples} samples):")
        compare_to_sft("ppo", raw_policy.eval(), ref, enc, evals, max_new_tokens,
                       torch.Generator(device=rt.device).manual_seed(seed), lap=watch.lap)
    watch.report("ppo")


if __name__ == "__main__":
    runtime.run(main)
