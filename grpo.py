"""
Stage 3'': critic-free policy gradient against the reward model, from SFT -> out/grpo.pt (or out/rloo.pt)

PPO learns a value function to tell a good token from a lucky one. The critic-free methods drop it: sample
a group of G answers to the same prompt and use the group itself as the baseline. Same SFT start, same
reward model, same prompts and the same held-out evaluation as ppo.py, so the two can be compared by the
hidden human.

GRPO (Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300, eq. 3 with outcome supervision;
the KL estimator is its eq. 4):
    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)       the same for every token of answer i
    J = E[ 1/G sum_i 1/|o_i| sum_t ( min(rho_t A_i, clip(rho_t, 1-eps, 1+eps) A_i) - beta D_KL,t ) ]
    D_KL,t = pi_ref/pi - log(pi_ref/pi) - 1                     (k3 estimator, in the loss, not the reward)
RLOO (Ahmadian et al. 2024, "Back to Basics", https://arxiv.org/abs/2402.14740), --baseline=rloo:
    R_i = r_i - beta * sum_t (log pi - log pi_ref)_t            the KL-penalised sequence reward
    A_i = R_i - 1/(G-1) sum_{j != i} R_j                        leave-one-out baseline, no KL in the loss
    grad J = 1/G sum_i A_i grad log pi(o_i | q)                 REINFORCE: the whole answer is one action

    python grpo.py                         # builds base, sft, comparisons and reward model first if missing
    python grpo.py --baseline=rloo         # RLOO
    python grpo.py --prompts=my.jsonl      # RL on your own prompts ({"prompt": ...} or {"messages": [...]})
    torchrun --nproc_per_node=2 grpo.py    # each rank samples its own groups, gradients are averaged

By default each batch gets a single update, as in DeepSeekMath's runs ("a single update following each
exploration stage"): the ratio is then 1 and the clip never acts. --ppo_epochs takes several clipped steps on
the same samples instead (Algorithm 1's mu), and so does a --minibatch_size below the batch even at one
epoch: every minibatch after the first meets a policy already stepped, so the clip can act (and RLOO is no
longer plain REINFORCE).
Departures:
  - the reward is the normalised reward-model score less a missing-end penalty, as in ppo.py;
  - beta and G: GRPO's beta is 0.6 (DeepSeekMath: 0.04) and G = 8 (DeepSeekMath: 64), set in the config;
  - adv_eps in the std's denominator, so that a group whose answers all score the same gets advantage 0.
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
out_dir = "out"            # reads out_dir/sft.pt and reward.pt, writes
                           # out_dir/<baseline>.pt and <baseline>.jsonl
baseline = "grpo"          # "grpo": group-normalised advantage, k3 KL in the loss; "rloo": leave-one-out
reward = "rm"              # "rm": the learned reward model; "gold": the hidden human's score (a ceiling),
                           # less the missing-end penalty as every reward here (--no_end_penalty=0: gold only)
prompts = ""               # "" = the world's train prompts; or a JSONL file of
                           # {"prompt": ...} / {"messages": ...}
seed = 1337                # same seed, same run (on CPU)
device = "auto"            # auto: cuda > mps > cpu
dtype = "auto"             # fp32 on CPU; log-probs, KL, advantages and losses are always fp32
compile = False            # torch.compile the policy (CUDA)
max_iters = 100            # iterations (one batch of groups each): more answers than ppo.py's 40 batches
                           # of 128: RLOO's gold still rose at the end (docs/experiments.md)
group_size = 8             # G answers per prompt: the baseline is their mean, so G >= 2 (DeepSeekMath: 64)
group_prompts = 16         # prompts per batch (per process): group_size x group_prompts answers per iteration
rloo_token_mean = False    # RLOO: average each answer's gradient over its tokens, GRPO's 1/|o_i|, instead
                           # of summing them as the paper does (a departure: biased by the answer's length)
minibatch_size = 0         # answers per gradient step, 0 = the whole batch (groups matter only for the
                           # advantage, so a minibatch may split them)
ppo_epochs = 1             # passes over each batch: one pass over the whole batch is one update per batch
lr = 5e-5                  # the policy's learning rate: at ppo.py's 1.5e-4 the group advantage, one unit of
                           # std per answer and every token alike, pushes the policy far from SFT within a
                           # few dozen batches, for no gain in gold (docs/experiments.md)
beta = None                # KL weight; None = each baseline's own, as they weigh different KLs: GRPO 0.6 on
                           # the k3 term per token in the loss (DeepSeekMath: 0.04; at 0.3 the KL still
                           # climbed after 100 batches, for no gold), RLOO 0.3 on the sequence's KL in
                           # the reward (docs/experiments.md)
max_new_tokens = 32        # longest answer, as in ppo.py
temperature = 1.0          # pure sampling, so the sampled tokens give unbiased KL estimates
no_end_penalty = 1.0       # subtracted from the score of an answer that never ends its turn, as in ppo.py
cliprange = 0.2            # clip epsilon for the ratio: the PPO paper's best (its Table 1), as in ppo.py; it
                           # acts only when a batch takes several steps (--ppo_epochs, --minibatch_size)
adv_eps = 1e-4             # GRPO's std guard: a group whose answers all score the same gets advantage 0
grad_clip = 1.0            # clip the global gradient norm (0 = off)
save_interval = 20         # checkpoint every this many iterations (and at the end)
eval_samples = 4           # answers per held-out prompt in the final comparison with SFT (world prompts only)
n_eval = 0                 # held-out prompts in that comparison (0 = all of them)
resume = False             # continue from out_dir/grpo.pt or rloo.pt (policy, optimizer, iteration, RNGs)
# -----------------------------------------------------------------------------


def group_advantages(rewards, group_size, eps):
    """GRPO's outcome-supervision advantage, Shao et al. 2024 sec. 4.1.2 (https://arxiv.org/abs/2402.03300):
    each reward normalised by its group's mean and standard deviation. rewards (N * G,), each group's G
    answers consecutive -> (N * G,); every group sums to zero."""
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def rloo_advantages(rewards, group_size):
    """REINFORCE leave-one-out (RLOO), Ahmadian et al. 2024 (https://arxiv.org/abs/2402.14740), after
    Kool et al. 2019: each reward minus the mean of the OTHER G - 1 rewards of its group, a baseline that does
    not depend on the answer it judges: unbiased for a gradient summed over the answer's tokens, as in the
    paper and rloo_loss (averaged over them, --rloo_token_mean, it depends on length). (N*G,) -> (N*G,)."""
    r = rewards.view(-1, group_size)
    others = (r.sum(1, keepdim=True) - r) / (group_size - 1)
    return (r - others).view(-1)


def clipped_surrogate(logp, old_logp, adv, mask, cliprange):
    """PPO's clipped surrogate per token, Schulman et al. 2017 eq. 7 (https://arxiv.org/abs/1707.06347),
    with one advantage per answer: min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A), rho_t = pi / pi_old,
    0 off the answer. logp, old_logp, mask (B, T); adv (B,) -> (B, T)."""
    ratio = torch.exp(torch.where(mask > 0, logp - old_logp, 0.0))  # exactly 1 off the answer
    adv = adv[:, None]
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - cliprange, 1 + cliprange) * adv)
    return torch.where(mask > 0, surrogate, 0.0)


def rloo_loss(logp, old_logp, adv, mask, cliprange):
    """RLOO's REINFORCE loss, Ahmadian et al. 2024 (https://arxiv.org/abs/2402.14740): the whole answer is
    one action, so its advantage weighs the answer's log-probability, the SUM of its tokens' log-probs:
        loss = -1/N sum_i A_i log pi(o_i | q),   log pi(o_i | q) = sum_t log pi(o_i,t | q, o_i,<t)
    With the leave-one-out A_i this gradient is unbiased. Written as the clipped surrogate summed over the
    answer's tokens, so that a batch may take several steps (--ppo_epochs > 1, or a --minibatch_size below
    the batch): at the first step every rho_t is 1 and the gradient is exactly REINFORCE's; later the clip
    may act. logp, old_logp, mask (B, T); adv (B,), one advantage per answer."""
    return -clipped_surrogate(logp, old_logp, adv, mask, cliprange).sum(1).mean()


def grpo_loss(logp, old_logp, ref_logp, adv, mask, cliprange, beta):
    """The negative of GRPO's objective, Shao et al. 2024 eq. 3 (https://arxiv.org/abs/2402.03300):
        per token  -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + beta * (pi_ref/pi - log(pi_ref/pi) - 1)
    averaged over each answer's tokens (1/|o_i|), then over the answers. logp, old_logp, ref_logp,
    mask (B, T); adv (B,), one advantage per answer. rho_t = pi / pi_old; the KL term is the k3
    estimator of KL(pi || ref) (eq. 4), in the loss rather than in the reward. Its value estimates
    KL(pi || ref), but on tokens from pi its gradient is E_pi[(1 - ref/pi) grad log pi]: at each state pi
    visits, grad KL(ref || pi), the other direction, and blind to which states pi visits (Tang & Munos 2025,
    arXiv 2506.09477). beta = 0 leaves the clipped surrogate, averaged per answer (--rloo_token_mean)."""
    surrogate = clipped_surrogate(logp, old_logp, adv, mask, cliprange)
    log_r = torch.where(mask > 0, ref_logp - logp, 0.0)
    per_token = -surrogate + beta * (torch.expm1(log_r) - log_r)  # expm1: exp - 1 cancels in fp32 near ref
    per_answer = torch.where(mask > 0, per_token, 0.0).sum(1) / mask.sum(1).clamp(min=1)
    return per_answer.mean()


def main():
    # ---- 0. options (checked before anything is read or written), models, optimizer, resume
    config = runtime.configure(globals(), ranges={
        "baseline": (lambda v: v in ("grpo", "rloo"), "'grpo' or 'rloo'"),
        "max_iters": (lambda v: v >= 1, ">= 1"),
        "reward": (lambda v: v in ("rm", "gold"), "'rm' or 'gold'"),
        "group_size": (lambda v: v >= 2, ">= 2 (the baseline is the rest of the group)"),
        "group_prompts": (lambda v: v >= 1, ">= 1"),
        "minibatch_size": (lambda v: 0 <= v <= group_size * group_prompts, "0 (all) or <= G x group_prompts"),
        "adv_eps": (lambda v: v > 0, "> 0"), "save_interval": (lambda v: v >= 1, ">= 1"),
        "beta": (lambda v: type(v) in (int, float) and v >= 0, ">= 0 (None = GRPO 0.6, RLOO 0.3)")})
    if rloo_token_mean and baseline != "rloo":
        raise SystemExit("error: --rloo_token_mean=True changes RLOO's loss; use it with --baseline=rloo")
    kl_weight = {"grpo": 0.6, "rloo": 0.3}[baseline] if beta is None else beta
    config["beta"] = kl_weight  # the checkpoint records the weight this run used
    if reward == "gold" and prompts:
        raise SystemExit("error: --reward=gold judges the world's language only; drop it with --prompts")
    train_prompts = training_prompts(prompts)
    world_prompts = not prompts
    ck_path, log_path = os.path.join(out_dir, f"{baseline}.pt"), os.path.join(out_dir, f"{baseline}.jsonl")
    # read before the inputs: a missing or broken checkpoint must not first build base, SFT and reward model
    ck = runtime.load_checkpoint(ck_path, "grpo", need=runtime.RESUME + ("rank_rng",)) \
        if resume else None
    rt = runtime.setup(device, dtype, seed)
    hint = "a lower --lr or a larger --beta"
    # the frozen SFT reference and reward model, each built by its stage first if missing
    ref, enc, sft_ck, rm, rm_ck = runtime.load_rl_inputs(out_dir, reward == "rm", rt)
    prompts_fit(prompts, train_prompts, enc, sft_ck["model_args"]["block_size"], max_new_tokens)
    policy = runtime.model_from_checkpoint(sft_ck, os.path.join(out_dir, "sft.pt"), dropout=0.0).to(rt.device)
    optimizer = runtime.configure_optimizer(policy, 0.0, lr, (0.9, 0.95), rt.device_type)
    rng = random.Random(seed + rt.rank)  # the prompt sampler: each rank draws its own prompts
    start = 0
    if resume:
        runtime.trained_from(ck_path, ck, sft_ck, remedy="start afresh without --resume")
        start = runtime.restore(ck, policy, optimizer, rt.scaler)
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

    bar = tqdm(range(start, max_iters), initial=start, total=max_iters, disable=not rt.master, desc=baseline)
    t0, watch = time.time(), runtime.Stopwatch(rt.device_type, rt.master)  # watch: where the time goes
    for it in bar:
        # ---- 1. groups: G answers to each of group_prompts prompts, sampled with the KV cache
        chosen = [train_prompts[rng.randrange(len(train_prompts))] for _ in range(group_prompts)]
        convs = [p for p in chosen for _ in range(group_size)]
        replies, batch = respond(raw_policy, enc, convs, max_new_tokens, temperature, return_batch=True)
        watch.lap("sampling")
        seq, attn, gen, sampled_logp = (x.to(rt.device) for x in batch)
        action = gen[:, 1:].float()  # (B, L-1): 1 where seq[:, t+1] was sampled by the policy
        # pi_old is the policy that sampled: generate recorded its log-probs (fp32), so no second pass. Under
        # autocast the training pass rounds differently, and the first ratio is 1 only to that rounding
        old_logp = sampled_logp[:, 1:]  # (B, L-1): index t scores seq[:, t+1], 0 off the answer
        with torch.no_grad():  # fp32 like pi_old, outside autocast: else the KL at pi = ref is rounding noise
            ref_logp = M.sequence_logprobs(ref, seq, attn, temperature)
        ended = torch.tensor([r["ended"] for r in replies], dtype=torch.float, device=rt.device)
        watch.lap("scoring")

        # ---- 2. rewards: the reward model's score (--reward=gold: the hidden human's) less the missing-end
        # penalty (RLOO: less beta * KL too)
        golds = torch.tensor([world.gold(p, r["text"], r["ended"]) for p, r in zip(convs, replies)]) \
            if world_prompts else torch.zeros(len(convs))
        watch.lap("hidden human")
        scores = golds if reward == "gold" else reward_scores(
            rm, enc, convs, replies, rm_ck["gain"], rm_ck["bias"],
            lm_weight=rm_ck.get("lm_weight", 0.0), sft=ref)
        scores = scores.to(rt.device) - no_end_penalty * (1 - ended)
        seq_kl = ((old_logp - ref_logp) * action).sum(1)  # k1 per answer: RLOO's penalty and the log's KL
        runtime.check_finite(baseline, it + 1, hint, score=scores)

        # ---- 3. advantages relative to the group: no value network
        if baseline == "grpo":
            adv, loss_beta = group_advantages(scores, group_size, adv_eps), kl_weight
        else:
            adv, loss_beta = rloo_advantages(scores - kl_weight * seq_kl, group_size), 0.0
        watch.lap("scoring")

        # ---- 4. clipped policy-gradient steps over the batch
        losses, step = [], minibatch_size or len(convs)  # 0: the whole batch in one step
        for epoch in range(ppo_epochs):
            order = torch.randperm(len(convs))
            for i in range(0, len(convs), step):
                mb = order[i:i + step]
                with rt.ctx:
                    logp = M.sequence_logprobs(policy, seq[mb], attn[mb], temperature)
                if baseline == "rloo" and not rloo_token_mean:  # the paper's: summed over the answer
                    loss = rloo_loss(logp, old_logp[mb], adv[mb], action[mb], cliprange)
                else:  # GRPO's eq. 3: averaged over the answer, with its k3 term (beta 0 for RLOO)
                    loss = grpo_loss(logp, old_logp[mb], ref_logp[mb], adv[mb], action[mb], cliprange,
                                     loss_beta)
                runtime.check_finite(baseline, it + 1, hint, loss=loss)
                rt.scaler.scale(loss).backward()
                grad_norm = runtime.optimizer_step(policy, optimizer, rt.scaler, grad_clip)
                runtime.check_finite(baseline, it + 1, hint, grad_norm=grad_norm)
                losses.append(loss.item())
        watch.lap("training")

        # ---- 5. log and checkpoint
        mean_kl = seq_kl.mean()
        if rt.ddp:
            torch.distributed.all_reduce(mean_kl)
            mean_kl /= rt.world_size
        row = {"iter": it + 1, "score": scores.mean().item(),
               "gold": golds.mean().item() if world_prompts else None,
               "kl": mean_kl.item(), "loss": sum(losses) / len(losses), "ended": ended.mean().item(),
               "length": action.sum(1).mean().item(),
               "flat_groups": (scores.view(-1, group_size).std(1) < 1e-6).float().mean().item(),
               "time": time.time() - t0}
        if rt.master:
            runtime.append_jsonl(log_path, row)
            bar.set_postfix(score=f"{row['score']:.2f}", kl=f"{row['kl']:.2f}",
                            **({"gold": f"{row['gold']:.2f}"} if world_prompts else {}))
        if (it + 1) % save_interval == 0 or it + 1 == max_iters:
            rank_rng = runtime.rank_rng_states(rng, rt)  # every rank takes part; rank 0 writes
            if rt.master:
                state = runtime.training_state(raw_policy, optimizer, rt.scaler, log_path)
                runtime.save_checkpoint(ck_path, {
                    **state, "rank_rng": rank_rng, "sft_fingerprint": sft_ck["fingerprint"], "config": config,
                    "kind": "grpo", "step": it + 1, "model_args": sft_ck["model_args"],
                    "tokenizer": sft_ck.get("tokenizer", "world")})
        watch.lap("logs & checkpoints")

    # ---- 6. held-out comparison with SFT under the hidden human (the world's prompts only)
    if rt.master and world_prompts:
        evals = world.prompts("eval")[:n_eval or None] * eval_samples
        print(f"\nheld-out prompts ({len(evals) // eval_samples} x {eval_samples} samples):")
        compare_to_sft(baseline, raw_policy.eval(), ref, enc, evals, max_new_tokens,
                       torch.Generator(device=rt.device).manual_seed(seed), lap=watch.lap)
    watch.report(baseline)


if __name__ == "__main__":
    runtime.run(main)
