"""
Stage 3: KL-penalised PPO against the reward model, starting from SFT -> out/ppo.pt

InstructGPT step 3: "the policy generates an output; the reward model calculates a reward; the reward is used
to update the policy using PPO". We maximise the KL-regularised objective

    max_pi  E_{x, y~pi} [ r(x, y) ]  -  beta * KL( pi(.|x) || pi_SFT(.|x) )

The KL term keeps the policy close to SFT, where the reward model is trustworthy; without it the policy finds
what the reward model overrates (reward hacking: with a head-only reward model, `python reward.py
--lm_feature=False`, try --beta=0 --max_iters=120 and watch gold fall while the RM score climbs).

    python ppo.py                          # builds base, sft, comparisons and reward model first if missing
    python ppo.py --reward=gold            # "PPO-GT": optimise the hidden human's utility directly (upper bound)
    python ppo.py --target_kl=3            # adaptive beta (Ziegler et al.'s controller) toward 3 nats per answer
    torchrun --nproc_per_node=2 ppo.py     # each rank samples its own rollouts, gradients are averaged
"""
import os
import random
import time

import torch
from tqdm import tqdm

import model as M
import runtime
from data import world
from rollout import compare_to_sft, respond, reward_scores

# -----------------------------------------------------------------------------
# config (every name can be overridden with --name=value)
out_dir = "out"
reward = "rm"              # "rm": the learned reward model; "gold": the hidden human itself (PPO-GT baseline)
seed = 1337
device = "auto"
dtype = "auto"             # fp32 on CPU; log-probs, KL, advantages and losses are always fp32
compile = False
max_iters = 100            # PPO iterations (one rollout batch each)
batch_size = 128           # prompts (= episodes) per rollout batch, per process
minibatch_size = 64        # episodes per gradient step: with 16 (and lr 3e-5) the policy stalled at ~71% against
                           # SFT, its steps too noisy to buy more reward with the KL they spent; 64 reached ~74.5%
ppo_epochs = 2             # passes over each rollout batch (4 steps): 2 epochs x 100 batches won 76.1% against
                           # SFT where 4 epochs x 60 batches won 74.7%, in a little more time (fresher samples)
lr = 1.5e-4                # with 4 epochs 1e-4 was stable and 2e-4 ran away (9.7 nats of KL within 34 batches)
max_new_tokens = 32        # longest answer; answers that never end their turn are penalised (the "EOS trick")
temperature = 1.0          # pure sampling (no top-k/top-p), so the sampled tokens give an unbiased KL estimate
beta = 0.05                # KL coefficient (initial value when target_kl is set)
target_kl = 0.0            # > 0: adapt beta toward this KL (nats per answer); 0: fixed beta
kl_horizon = 10000         # the controller's horizon (episodes), as in Ziegler et al.
kl_estimator = "k1"        # per-token KL penalty: "k1" = logp - logp_ref, "k3" = (ratio - 1) - log ratio
no_end_penalty = 1.0       # subtracted from the score of an answer that never ends its turn
gamma, lam = 1.0, 1.0      # GAE discount and bias-variance trade-off: lam < 1 trusts the value head, a linear
                           # probe that explains well under half of the returns' variance, and bought nothing here
cliprange = 0.2            # PPO-clip epsilon for the policy ratio
cliprange_value = 0.2      # and for the value function
vf_coef = 0.5              # weight of the value loss (it trains only the value head: see below)
vf_lr = 1e-3               # learning rate of the value head
grad_clip = 1.0
sample_interval = 20       # print a few samples every this many iterations
eval_samples = 4           # answers per held-out prompt in the final PPO-vs-SFT comparison
n_eval = 0                 # held-out prompts in that comparison (0 = all of them)
resume = False
# -----------------------------------------------------------------------------


def masked_mean(x, mask):
    """Mean over positions where mask is 1. torch.where (not x * mask) so that even an inf or NaN at a padding
    position cannot leak into the result."""
    return torch.where(mask > 0, x, 0.0).sum() / mask.sum().clamp(min=1)


def masked_whiten(x, mask):
    """Advantages normalised to mean 0, std 1 over the real (masked-in) tokens only; padding stays 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def kl_penalty(logp, logp_ref, estimator):
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi. k1 is unbiased but can be negative on a
    single token; k3 = (r - 1) - log r with r = ref/pi is unbiased and always >= 0 (Schulman's note)."""
    if estimator == "k1":
        return logp - logp_ref
    log_r = logp_ref - logp
    return log_r.exp() - 1 - log_r


def token_rewards(scores, kl, action, kl_coef, lm_logp, lm_coef):
    """Per-token rewards (B, L-1): -beta * KL_t on every answer token, plus the reward model's score on the
    answer's last token. A reward model trained with --lm_feature also has lm_coef * log p_SFT(answer) =
    lm_coef * sum_t log p_SFT(token_t) (lm_logp: the reference's log-probs at temperature 1); being a sum over
    tokens, it is paid token by token like the KL penalty. The return is the same (gamma = 1), but a token's
    advantage no longer carries the likelihood of the tokens before it, which it cannot change: less variance."""
    rewards = (-kl_coef * kl + lm_coef * lm_logp) * action
    last = action.size(1) - 1 - action.flip(1).argmax(1)  # index of each answer's last token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards, values, mask, gamma, lam):
    """Generalised Advantage Estimation over response tokens (Schulman et al. 2016):
        delta_t = r_t + gamma * V_{t+1} - V_t,     A_t = delta_t + gamma * lam * A_{t+1}
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
        adv[:, t] = a * m
        next_v = torch.where(m > 0, values[:, t], next_v)  # carry across masked positions unchanged
        next_a = torch.where(m > 0, a, next_a)
    return adv, (adv + values) * mask


def ppo_losses(logp, old_logp, adv, values, old_values, returns, mask):
    """PPO-clip (Schulman et al. 2017): L = E[ max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps)) ], and the
    clipped value loss 0.5 * E[ max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2) ]."""
    ratio = torch.exp(torch.where(mask > 0, logp - old_logp, 0.0))  # pi / pi_old, exactly 1 off the answer
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cliprange, 1 + cliprange))
    v_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    stats = {"clipfrac": masked_mean(((ratio - 1).abs() > cliprange).float(), mask).item(),
             "approx_kl": masked_mean(0.5 * (logp - old_logp) ** 2, mask).item(),
             "ratio": masked_mean(ratio, mask).item()}
    return masked_mean(pg, mask), masked_mean(vf, mask), stats


def forward_policy(policy, seq, attn):
    """Per-token log-probs of seq[:, 1:] (at the sampling temperature), values of the states before each token,
    and the policy's entropy, all (B, L-1) fp32, from ONE pass through the shared trunk."""
    logits, _, values = policy(seq, attention_mask=attn, return_values=True, detach_values=True)
    logits = logits[:, :-1].float() / temperature
    logp = M.token_logprobs(logits, seq[:, 1:])
    probs = torch.softmax(logits, -1)
    entropy = torch.logsumexp(logits, -1) - (probs * logits).sum(-1)
    return logp, values[:, :-1], entropy


def main():
    config = runtime.configure(globals())
    rt = runtime.setup(device, dtype, seed)
    sft_path, rm_path, ck_path = (os.path.join(out_dir, f) for f in ("sft.pt", "reward.pt", "ppo.pt"))
    log_path = os.path.join(out_dir, "ppo.jsonl")
    if reward not in ("rm", "gold") or kl_estimator not in ("k1", "k3"):
        raise SystemExit("error: --reward must be 'rm' or 'gold' and --kl_estimator 'k1' or 'k3'")
    if rt.master:
        runtime.ensure_checkpoint(sft_path, "sft.py", out_dir)
        if reward == "rm":
            runtime.ensure_checkpoint(rm_path, "reward.py", out_dir)
    if rt.ddp:
        torch.distributed.barrier()

    # Value function: a scalar head on the policy's own final hidden states. One network instead of two halves the
    # cost on a CPU. The head reads DETACHED features: with Adam, even a tiny value-loss gradient moves every trunk
    # weight by about lr, so a value loss flowing into the trunk would change the policy's text; here it cannot.
    # (InstructGPT instead trains a separate critic initialised from the reward model: better values, 2x compute.)
    ref, enc, sft_ck = runtime.load_model(sft_path, "sft", dropout=0.0)
    policy = runtime.model_from_checkpoint(sft_ck, dropout=0.0, scalar_head=True)
    ref.to(rt.device).eval().requires_grad_(False)
    policy.to(rt.device)
    rm, gain, bias, lm_weight = None, 1.0, 0.0, 0.0
    if reward == "rm":
        rm_ck = runtime.load_checkpoint(rm_path, "reward")
        rm = runtime.model_from_checkpoint(rm_ck, dropout=0.0, scalar_head=True).to(rt.device).eval().requires_grad_(False)
        gain, bias, lm_weight = rm_ck["gain"], rm_ck["bias"], rm_ck.get("lm_weight", 0.0)
    # the value head is a fresh linear probe on fixed-scale features: it needs a far larger step than the policy
    head = list(policy.scalar_head.parameters())
    trunk = [p for n, p in policy.named_parameters() if not n.startswith("scalar_head.")]
    optimizer = torch.optim.AdamW([{"params": trunk, "lr": lr}, {"params": head, "lr": vf_lr}], betas=(0.9, 0.95),
                                  weight_decay=0.0, fused=rt.device_type == "cuda")
    kl_coef, start = beta, 0
    if resume:
        ck = runtime.load_checkpoint(ck_path, "ppo")
        kl_coef, start = ck["kl_coef"], runtime.restore(ck, policy, optimizer)
    raw_policy = policy
    policy = runtime.wrap(policy, rt, compile)
    train_prompts = world.prompts("train")

    def save(step):
        runtime.save_checkpoint(ck_path, {"model": raw_policy.state_dict(), "optimizer": optimizer.state_dict(),
                                    "rng": runtime.rng_state(), "config": config, "model_args": sft_ck["model_args"],
                                    "kind": "ppo", "step": step, "kl_coef": kl_coef, "tokenizer": sft_ck.get("tokenizer", "world")})

    if rt.master and not resume and os.path.exists(log_path):
        os.remove(log_path)
    rng = random.Random(seed + rt.rank)
    bar = tqdm(range(start, max_iters), initial=start, total=max_iters, disable=not rt.master, desc="ppo")
    t0 = time.time()
    for it in bar:
        # ---- 1. rollouts: sample answers with the KV cache (no gradients)
        prompts = [train_prompts[rng.randrange(len(train_prompts))] for _ in range(batch_size)]
        replies, (seq, attn, gen) = respond(raw_policy, enc, prompts, max_new_tokens, temperature, return_batch=True)
        seq, attn, gen = seq.to(rt.device), attn.to(rt.device), gen.to(rt.device)
        action = gen[:, 1:].float()  # (B, L-1): 1 where seq[:, t+1] was sampled by the policy
        with torch.no_grad(), rt.ctx:
            old_logp, old_values, _ = forward_policy(policy, seq, attn)
            ref_logp = M.token_logprobs(ref(seq, attention_mask=attn)[0][:, :-1].float() / temperature, seq[:, 1:])
        old_values = old_values * action
        ended = torch.tensor([r["ended"] for r in replies], dtype=torch.float, device=rt.device)
        golds = torch.tensor([world.gold(p, r["text"], r["ended"]) for p, r in zip(prompts, replies)])  # logged only
        # ---- 2. rewards: -beta * KL (and the likelihood term) on every token, the score on the answer's last token
        if reward == "gold":
            scores = golds.to(rt.device)
        else:
            scores = reward_scores(rm, enc, prompts, replies, gain, bias).to(rt.device)
        lm_logp = ref_logp  # log p_SFT per token for the likelihood term: at temperature 1, whatever we sample at
        if lm_weight and temperature != 1:
            with torch.no_grad(), rt.ctx:
                lm_logp = M.sequence_logprobs(ref, seq, attn)
        scores = scores - no_end_penalty * (1 - ended)
        kl = kl_penalty(old_logp, ref_logp, kl_estimator)  # (B, L-1)
        rewards = token_rewards(scores, kl, action, kl_coef, lm_logp.float(), gain * lm_weight)
        lm_score = gain * lm_weight * (lm_logp.float() * action).sum(1)  # logged with the score
        # ---- 3. advantages (GAE), returns, whitening over the batch's real tokens
        adv, returns = gae(rewards, old_values, action, gamma, lam)
        adv = masked_whiten(adv, action)
        # ---- 4. PPO: several epochs of minibatch updates on this batch
        stats = []
        for epoch in range(ppo_epochs):
            order = torch.randperm(len(prompts))
            for i in range(0, len(prompts), minibatch_size):
                mb = order[i:i + minibatch_size]
                with rt.ctx:
                    logp, values, entropy = forward_policy(policy, seq[mb], attn[mb])
                pg_loss, vf_loss, st = ppo_losses(logp, old_logp[mb], adv[mb], values, old_values[mb], returns[mb], action[mb])
                loss = pg_loss + vf_coef * vf_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
                optimizer.step()
                stats.append({**st, "pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(),
                              "entropy": masked_mean(entropy.detach(), action[mb]).item()})
        # ---- 5. adaptive KL coefficient (Ziegler et al. 2019): beta *= 1 + clip(KL/target - 1, +-0.2) * n/horizon
        seq_kl = (kl_penalty(old_logp, ref_logp, "k1") * action).sum(1).mean()
        if rt.ddp:
            torch.distributed.all_reduce(seq_kl)
            seq_kl /= rt.world_size
        if target_kl > 0:
            err = max(-0.2, min(0.2, seq_kl.item() / target_kl - 1))
            kl_coef *= 1 + err * batch_size * rt.world_size / kl_horizon
        # ---- 6. log
        # fraction of the returns' variance the value head explains (1 = perfect, <= 0 = useless)
        resid = returns - old_values
        resid_var = masked_mean((resid - masked_mean(resid, action)) ** 2, action)
        explained_var = 1 - resid_var / masked_mean((returns - masked_mean(returns, action)) ** 2, action).clamp(min=1e-8)
        row = {"iter": it + 1, "score": (scores + lm_score).mean().item(), "gold": golds.mean().item(),
               "kl": seq_kl.item(), "beta": kl_coef, "length": action.sum(1).mean().item(),
               "ended": ended.mean().item(),
               "value_explained_var": explained_var.item(), "time": time.time() - t0}
        for k in ("entropy", "clipfrac", "approx_kl", "pg_loss", "vf_loss"):
            row[k] = sum(s[k] for s in stats) / len(stats)
        row["first_ratio"] = stats[0]["ratio"]
        if rt.master:
            runtime.append_jsonl(log_path, row)
            bar.set_postfix(score=f"{row['score']:.2f}", gold=f"{row['gold']:.2f}", kl=f"{row['kl']:.2f}")
            if (it + 1) % sample_interval == 0:
                for p, r in list(zip(prompts, replies))[:2]:
                    tqdm.write(f"  {p[-1]['content']} -> {r['text']!r}")
            if (it + 1) % 20 == 0 or it + 1 == max_iters:
                save(it + 1)

    # ---- held-out comparison with SFT under the hidden human
    if rt.master:
        evals = world.prompts("eval")[:n_eval or None] * eval_samples
        print(f"\nheld-out prompts ({len(evals) // eval_samples} x {eval_samples} samples):")
        compare_to_sft("ppo", raw_policy.eval(), ref, enc, evals, max_new_tokens,
                       torch.Generator(device=rt.device).manual_seed(seed))
    runtime.cleanup()


if __name__ == "__main__":
    main()
