"""PPO's maths: GAE by hand, ratio = 1 before the first update, KL estimators, masks, clipping, a smoke run."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import model as M
import runtime
import ppo
from data import world
from rollout import respond
from data.tokenizer import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gae_hand_worked_example_with_masks():
    # row 0: a prompt position (masked) then three action tokens; row 1: two actions then padding (garbage values)
    rewards = torch.tensor([[5.0, 0.0, 0.0, 1.0], [0.0, 2.0, 7.0, 7.0]])
    values = torch.tensor([[9.0, 1.0, 2.0, 3.0], [1.0, 1.0, 5.0, 5.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0, backwards: t=3 delta = 1 - 3 = -2 -> A = -2
    #   t=2 delta = 0 + 0.9*3 - 2 = 0.7 -> A = 0.7 + 0.45*(-2) = -0.2
    #   t=1 delta = 0 + 0.9*2 - 1 = 0.8 -> A = 0.8 + 0.45*(-0.2) = 0.71
    # row 1: t=1 is the last action: delta = 2 - 1 = 1 -> A = 1;  t=0 delta = 0 + 0.9*1 - 1 = -0.1 -> A = -0.1 + 0.45
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.71, -0.2, -2.0], [0.35, 1.0, 0.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 1.71, 1.8, 1.0], [1.35, 2.0, 0.0, 0.0]]))


def test_token_rewards_pay_kl_and_likelihood_per_token_and_the_score_on_the_last_token():
    # row 0: a prompt position then three answer tokens; row 1: two answer tokens then padding (garbage inputs)
    action = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    kl = torch.tensor([[9.0, 0.5, -0.2, 0.1], [0.3, 0.4, 9.0, 9.0]])
    lm_logp = torch.tensor([[-9.0, -1.0, -2.0, -0.5], [-0.1, -3.0, -9.0, -9.0]])
    scores = torch.tensor([2.0, -1.0])
    r = ppo.token_rewards(scores, kl, action, 0.1, lm_logp, 0.2)
    # row 0: t1 = -0.1*0.5 + 0.2*(-1) = -0.25, t2 = 0.02 - 0.4 = -0.38, t3 = -0.01 - 0.1 + 2 = 1.89
    # row 1: t0 = -0.03 - 0.02 = -0.05, t1 = -0.04 - 0.6 - 1 = -1.64 (its last answer token)
    torch.testing.assert_close(r, torch.tensor([[0.0, -0.25, -0.38, 1.89], [-0.05, -1.64, 0.0, 0.0]]))
    # the return (gamma = 1) is what a score with the whole likelihood term added at the end would give
    total = scores - 0.1 * (kl * action).sum(1) + 0.2 * (lm_logp * action).sum(1)
    torch.testing.assert_close(r.sum(1), total)


def test_whitening_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = ppo.masked_whiten(x, mask)
    assert w[0, 3] == 0 and w[0, :3].mean().abs() < 1e-6 and w[0, :3].pow(2).mean() == pytest.approx(1.0, abs=1e-4)


def tiny_policy(seed=0):
    torch.manual_seed(seed)
    enc = get_tokenizer("world")
    cfg = M.GPTConfig(vocab_size=enc.n_vocab, n_layer=1, n_head=2, n_embd=32, block_size=96, scalar_head=True)
    return M.GPT(cfg), enc


def rollout(policy, enc, n=6):
    prompts = world.prompts("train")[:n]
    g = torch.Generator().manual_seed(0)
    _, (seq, attn, gen) = respond(policy, enc, prompts, 12, generator=g, return_batch=True)
    return seq, attn, gen[:, 1:].float()


def test_first_minibatch_has_ratio_one_and_zero_kl_to_reference():
    policy, enc = tiny_policy()
    ref = M.GPT(policy.config)
    ref.load_state_dict(policy.state_dict())
    seq, attn, action = rollout(policy, enc)
    with torch.no_grad():
        old_logp, old_values, _ = ppo.forward_policy(policy, seq, attn)          # whole rollout batch
        ref_logp = M.token_logprobs(ref(seq, attention_mask=attn)[0][:, :-1], seq[:, 1:])
    for est in ("k1", "k3"):  # the policy starts as the reference: KL is exactly 0
        assert (ppo.kl_penalty(old_logp, ref_logp, est) * action).abs().max() < 1e-6
    mb = torch.tensor([4, 1, 2])  # a minibatch, in another order, before any update
    logp, values, _ = ppo.forward_policy(policy, seq[mb], attn[mb])
    adv = torch.randn_like(logp)
    returns = torch.randn_like(logp)
    _, _, st = ppo.ppo_losses(logp, old_logp[mb], adv, values, old_values[mb], returns, action[mb])
    assert st["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert st["clipfrac"] == 0.0 and st["approx_kl"] < 1e-10


def test_padding_and_after_end_positions_do_not_change_losses():
    torch.manual_seed(0)
    shape = (3, 7)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0]], dtype=torch.float)
    args = [torch.randn(shape) for _ in range(6)]  # logp, old_logp, adv, values, old_values, returns
    pg, vf, st = ppo.ppo_losses(*args, mask)
    garbage = [a.clone() for a in args]
    for g in garbage:
        g[mask == 0] = torch.randn(int((mask == 0).sum())) * 100
    pg2, vf2, st2 = ppo.ppo_losses(*garbage, mask)
    assert pg.item() == pytest.approx(pg2.item()) and vf.item() == pytest.approx(vf2.item())
    assert st == pytest.approx(st2)


def test_k1_and_k3_estimate_the_exact_kl_of_a_categorical():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True)  # tokens sampled from the policy p
    logp, logq = p.log()[x], q.log()[x]
    for est in ("k1", "k3"):
        assert ppo.kl_penalty(logp, logq, est).mean().item() == pytest.approx(exact, abs=0.01)
    assert (ppo.kl_penalty(logp, logq, "k3") >= 0).all()  # k3 is never negative, k1 can be
    assert (ppo.kl_penalty(logp, logq, "k1") < 0).any()


def test_clipped_tokens_receive_zero_policy_gradient():
    old = torch.zeros(1, 4)
    # ratios: 1.5 (A>0, clipped), 0.5 (A<0, clipped), 1.1 (inside), 0.5 (A>0: the unclipped side is worse)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    mask = torch.ones(1, 4)
    zeros = torch.zeros(1, 4)
    pg, _, st = ppo.ppo_losses(logp, old, adv, zeros, zeros, zeros, mask)
    pg.backward()
    g = logp.grad[0]
    assert g[0] == 0 and g[1] == 0 and g[2] != 0 and g[3] != 0
    assert st["clipfrac"] == 0.75


def make_stage_checkpoints(out):
    policy, enc = tiny_policy()
    args = {**policy.config.__dict__, "scalar_head": False}
    sd = {k: v for k, v in policy.state_dict().items() if not k.startswith("scalar_head")}
    runtime.save_checkpoint(str(out / "sft.pt"), {"model": sd, "model_args": args, "config": {}, "kind": "sft",
                                            "step": 0, "tokenizer": "world"})
    runtime.save_checkpoint(str(out / "reward.pt"), {"model": policy.state_dict(), "model_args": {**args, "scalar_head": True},
                                               "config": {}, "kind": "reward", "step": 0, "tokenizer": "world",
                                               "gain": 1.0, "bias": 0.0, "lm_weight": 0.05})


@pytest.mark.parametrize("reward", ["rm", "gold"])
def test_ppo_smoke_run(tmp_path, reward):
    make_stage_checkpoints(tmp_path)
    cmd = [sys.executable, "ppo.py", f"--out_dir={tmp_path}", "--max_iters=2", "--batch_size=4", "--minibatch_size=2",
           "--max_new_tokens=8", "--eval_samples=1", "--n_eval=8", "--ppo_epochs=2", f"--reward={reward}", "--target_kl=1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "ppo.jsonl")]
    assert len(rows) == 2 and set(rows[0]) == set(rows[1])
    assert rows[0]["first_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert abs(rows[0]["kl"]) < 1e-5  # the policy starts as the reference
    assert math.isfinite(rows[1]["pg_loss"]) and rows[1]["beta"] != ppo.beta  # the controller moved beta
    ck = runtime.load_checkpoint(str(tmp_path / "ppo.pt"), "ppo")
    assert ck["step"] == 2
    assert "ppo wins" in r.stdout
