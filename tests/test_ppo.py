"""PPO's maths by hand (GAE, rewards, KL estimators, clipped losses, the KL controller, whitening), ratio = 1
before the first update, an fp16 step, bad options, resume = an uninterrupted run, and smoke runs."""
import json
import math
import os
import random
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import model as M
import runtime
import ppo
from data import world
from rollout import respond
from data.tokenizer import get_tokenizer
from test_reliability import time_split  # noqa: E402
from conftest import run_here, torchrun_launcher  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gae_hand_worked_example_with_masks():
    # row 0: a prompt position (masked) then three action tokens; row 1: two actions then padding (garbage)
    rewards = torch.tensor([[5.0, 0.0, 0.0, 1.0], [0.0, 2.0, 7.0, 7.0]])
    values = torch.tensor([[9.0, 1.0, 2.0, 3.0], [1.0, 1.0, 5.0, 5.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0, backwards: t=3 delta = 1 - 3 = -2 -> A = -2
    #   t=2 delta = 0 + 0.9*3 - 2 = 0.7 -> A = 0.7 + 0.45*(-2) = -0.2
    #   t=1 delta = 0 + 0.9*2 - 1 = 0.8 -> A = 0.8 + 0.45*(-0.2) = 0.71
    # row 1: t=1 is the last action: delta = 2 - 1 = 1 -> A = 1
    #   t=0 delta = 0 + 0.9*1 - 1 = -0.1 -> A = -0.1 + 0.45
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.71, -0.2, -2.0], [0.35, 1.0, 0.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 1.71, 1.8, 1.0], [1.35, 2.0, 0.0, 0.0]]))
    # a NaN or inf in the padding (values, rewards) leaves every advantage and return as it was: 0 there
    values[1, 2:], rewards[1, 3] = float("nan"), float("inf")
    adv2, ret2 = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close((adv2, ret2), (adv, ret))


def test_token_rewards_pay_minus_beta_kl_on_every_token_and_the_score_on_the_last():
    # row 0: a prompt position then three answer tokens; row 1: two answer tokens then padding (garbage)
    action = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    kl = torch.tensor([[9.0, 0.5, -0.2, 0.1], [0.3, 0.4, 9.0, 9.0]])
    scores = torch.tensor([2.0, -1.0])
    r = ppo.token_rewards(scores, kl, action, 0.1)
    # row 0: t1 = -0.05, t2 = +0.02, t3 = -0.01 + 2 = 1.99
    # row 1: t0 = -0.03, t1 = -0.04 - 1 = -1.04 (its last answer token)
    torch.testing.assert_close(r, torch.tensor([[0.0, -0.05, 0.02, 1.99], [-0.03, -1.04, 0.0, 0.0]]))
    # the return (gamma = 1) is Ziegler et al.'s R(x, y) = r(x, y) - beta * KL
    torch.testing.assert_close(r.sum(1), scores - 0.1 * (kl * action).sum(1))


def test_whitening_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = ppo.masked_whiten(x, mask)
    assert w[0, 3] == 0 and w[0, :3].mean().abs() < 1e-6
    assert w[0, :3].pow(2).mean() == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(w[0, :3], torch.tensor([-1.0, 0.0, 1.0]) * 1.5 ** 0.5, atol=1e-4, rtol=0)
    x[0, 3] = float("inf")  # whatever sits in the padding, even an inf, changes nothing
    torch.testing.assert_close(ppo.masked_whiten(x, mask), w)
    assert ppo.masked_mean(x, mask).item() == 2.0


def test_kl_estimators_hand_values():
    logp = torch.tensor([math.log(0.5), math.log(0.25)])
    logp_ref = torch.tensor([math.log(0.25), math.log(0.5)])
    # k1 = log pi - log ref = +-log 2;  k3 = (r - 1) - log r with r = ref / pi = 1/2, then 2
    torch.testing.assert_close(ppo.kl_k1(logp, logp_ref), torch.tensor([math.log(2), -math.log(2)]))
    k3 = ppo.kl_k3(logp, logp_ref)
    torch.testing.assert_close(k3, torch.tensor([-0.5 + math.log(2), 1.0 - math.log(2)]))
    assert (k3 >= 0).all()
    torch.testing.assert_close(ppo.kl_penalty(logp, logp_ref, "k3"), k3)
    torch.testing.assert_close(ppo.kl_penalty(logp, logp_ref, "k1"), ppo.kl_k1(logp, logp_ref))
    assert ppo.kl_k3(logp, logp).abs().max() == 0  # both vanish where pi = ref


def test_k3_is_never_negative_and_accurate_in_fp32_when_pi_is_close_to_ref():
    # per-token log-ratios of a policy a few steps from its reference; the fp64 value of the same fp32 inputs
    # is the truth: (r - 1) - log r >= 0 exactly, and fp32 must keep more than a few of its digits
    torch.manual_seed(0)
    logp = -5 * torch.rand(20_000)
    logp_ref = logp + 1e-3 * torch.randn(20_000)
    k3 = ppo.kl_k3(logp, logp_ref)
    exact = ppo.kl_k3(logp.double(), logp_ref.double())
    assert (k3 >= 0).all()
    # where |log r| > 1e-3, k3 ~ (log r)^2 / 2 > 5e-7: rounding log r itself costs under 1e-4 of that, while
    # exp(log r) - 1 loses about 1e-7 absolute, a sizeable fraction
    big = (logp_ref - logp).abs() > 1e-3
    rel = ((k3.double() - exact).abs() / exact)[big]
    assert big.sum() > 5000 and rel.max() < 1e-3, rel.max()
    assert ppo.kl_penalty(logp, logp_ref, "k3").sum().item() == pytest.approx(exact.sum().item(), rel=1e-5)


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


def test_clipped_loss_is_the_plain_policy_gradient_loss_at_init():
    # old = new (before the first step): ratio is exactly 1, nothing is clipped, and the loss and its gradient
    # are those of the plain policy gradient -E[A * log pi]
    torch.manual_seed(0)
    logp = torch.randn(3, 5).requires_grad_(True)
    adv = torch.randn(3, 5)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], dtype=torch.float)
    loss, st = ppo.ppo_clip_loss(logp, logp.detach(), adv, mask, 0.2)
    assert st["ratio"] == 1.0 and st["clipfrac"] == 0.0 and st["approx_kl"] == 0.0
    assert loss.item() == pytest.approx(-(adv * mask).sum().item() / mask.sum().item(), abs=1e-6)
    (g_clip,) = torch.autograd.grad(loss, logp)
    (g_pg,) = torch.autograd.grad(-ppo.masked_mean(adv * logp, mask), logp)
    torch.testing.assert_close(g_clip, g_pg)


def test_clipped_tokens_receive_zero_policy_gradient():
    old = torch.zeros(1, 4)
    # ratios: 1.5 (A>0, clipped), 0.5 (A<0, clipped), 1.1 (inside), 0.5 (A>0: the unclipped side is worse)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    pg, st = ppo.ppo_clip_loss(logp, old, adv, torch.ones(1, 4), 0.2)
    # max(-A r, -A clip(r)): -1.2, 0.8 (from 0.8 = clip(0.5)), -1.1, -0.5 -> mean -0.5
    assert pg.item() == pytest.approx((-1.2 + 0.8 - 1.1 - 0.5) / 4)
    pg.backward()
    g = logp.grad[0]
    assert g[0] == 0 and g[1] == 0 and g[2] != 0 and g[3] != 0
    assert st["clipfrac"] == 0.75


def test_clipped_value_loss_hand_value():
    values = torch.tensor([[1.0, 0.0, 2.0, 50.0]])
    old = torch.tensor([[0.5, 0.5, 0.5, -50.0]])
    returns = torch.tensor([[2.0, -1.0, 0.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last position is padding
    # t0: (1 - 2)^2 = 1 vs clipped V = 0.7: 1.69 -> 1.69;  t1: 1 vs V = 0.3: 1.69 -> 1.69
    # t2: 4 vs clipped V = 0.7: 0.49 -> 4
    loss = ppo.clipped_value_loss(values, old, returns, mask, 0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.69 + 4.0) / 3)
    # inside the clip range it is plain 0.5 * (V - R)^2
    assert ppo.clipped_value_loss(values, values, returns, mask, 0.2).item() == pytest.approx(0.5 * 6 / 3)


def test_adaptive_kl_controller_hand_values():
    # e = clip(KL / target - 1, -0.2, 0.2); beta * (1 + e * n / horizon)
    assert ppo.adaptive_kl_coef(0.1, 1.9, 2.0, 100, 1000) == pytest.approx(0.1 * (1 - 0.05 * 0.1))
    assert ppo.adaptive_kl_coef(0.1, 4.0, 2.0, 100, 1000) == pytest.approx(0.1 * 1.02)  # e clipped to +0.2
    assert ppo.adaptive_kl_coef(0.1, 0.0, 2.0, 100, 1000) == pytest.approx(0.1 * 0.98)  # e clipped to -0.2
    assert ppo.adaptive_kl_coef(0.1, 2.0, 2.0, 100, 1000) == 0.1  # on target: unchanged


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert ppo.explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full_like(returns, 2.0), returns, mask).item() == pytest.approx(0.0)


def tiny_policy(seed=0):
    torch.manual_seed(seed)
    enc = get_tokenizer("world")
    cfg = M.GPTConfig(vocab_size=enc.n_vocab, n_layer=1, n_head=2, n_embd=32, block_size=96, scalar_head=True)
    return M.GPT(cfg), enc


def rollout(policy, enc, n=6):
    prompts = world.prompts("train")[:n]
    g = torch.Generator().manual_seed(0)
    _, (seq, attn, gen, _) = respond(policy, enc, prompts, 12, generator=g, return_batch=True)
    return seq, attn, gen[:, 1:].float()


def test_first_minibatch_has_ratio_one_and_zero_kl_to_reference():
    policy, enc = tiny_policy()
    ref = M.GPT(policy.config)
    ref.load_state_dict(policy.state_dict())
    seq, attn, action = rollout(policy, enc)
    with torch.no_grad():
        old_logp, old_values, _ = ppo.forward_policy(policy, seq, attn, 1.0)      # whole rollout batch
        ref_logp = M.sequence_logprobs(ref, seq, attn, 1.0)
    for est in ("k1", "k3"):  # the policy starts as the reference: KL is exactly 0
        assert (ppo.kl_penalty(old_logp, ref_logp, est) * action).abs().max() < 1e-6
    mb = torch.tensor([4, 1, 2])  # a minibatch, in another order, before any update
    logp, values, _ = ppo.forward_policy(policy, seq[mb], attn[mb], 1.0)
    _, st = ppo.ppo_clip_loss(logp, old_logp[mb], torch.randn_like(logp), action[mb], 0.2)
    assert st["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert st["clipfrac"] == 0.0 and st["approx_kl"] < 1e-10
    # the temperature divides the logits: at T = 2 the log-probs are those of softmax(logits / 2)
    with torch.no_grad():
        logits = policy(seq, attention_mask=attn)[0][:, :-1]
        torch.testing.assert_close(ppo.forward_policy(policy, seq, attn, 2.0)[0],
                                   M.token_logprobs(logits, seq[:, 1:], 2.0))


def test_padding_and_after_end_positions_do_not_change_losses():
    torch.manual_seed(0)
    shape = (3, 7)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0]]).float()
    args = [torch.randn(shape) for _ in range(6)]  # logp, old_logp, adv, values, old_values, returns

    def losses(logp, old_logp, adv, values, old_values, returns, mask=mask):
        pg, st = ppo.ppo_clip_loss(logp, old_logp, adv, mask, 0.2)
        vf = ppo.clipped_value_loss(values, old_values, returns, mask, 0.2)
        return [pg.item(), vf.item()] + [st[k] for k in sorted(st)]  # flat: approx compares numbers

    garbage = [a.clone() for a in args]
    for g in garbage:
        g[mask == 0] = torch.randn(int((mask == 0).sum())) * 100
    assert losses(*args) == pytest.approx(losses(*garbage))
    # nor does how much padding there is: every statistic is a mean over the answer tokens alone
    wider = [torch.cat([a, torch.randn(3, 4) * 100], 1) for a in args]
    assert losses(*args) == pytest.approx(losses(*wider, mask=torch.cat([mask, torch.zeros(3, 4)], 1)))


def test_one_minibatch_step_under_fp16_autocast_with_a_grad_scaler():
    policy, enc = tiny_policy()
    seq, attn, action = rollout(policy, enc)
    with torch.no_grad():
        old_logp, old_values, _ = ppo.forward_policy(policy, seq, attn, 1.0)
    old_values = old_values * action
    adv = ppo.masked_whiten(torch.randn_like(old_logp), action)
    returns = torch.randn_like(old_logp) * action
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    with torch.autocast("cpu", dtype=torch.float16):
        logp, values, _ = ppo.forward_policy(policy, seq, attn, 1.0)
    assert logp.dtype == values.dtype == torch.float32  # losses in fp32, whatever the matmuls ran in
    pg_loss, _ = ppo.ppo_clip_loss(logp, old_logp, adv, action, 0.2)
    loss = pg_loss + 0.5 * ppo.clipped_value_loss(values, old_values, returns, action, 0.2)
    scaler.scale(loss).backward()
    runtime.optimizer_step(policy, optimizer, scaler, 1.0)
    after = policy.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    for name in ("transformer.h.0.mlp.c_fc.weight", "scalar_head.weight"):  # trunk and value head both moved
        assert not torch.equal(before[name], after[name]), name
    assert all(p.grad is None for p in policy.parameters())  # the step zeroed the gradients


def test_prompt_sampler_state_survives_a_weights_only_checkpoint(tmp_path):
    rng, rt = random.Random(7), SimpleNamespace(rank=0, world_size=1, ddp=False, device_type="cpu")
    rng.random()
    torch.save({"rank_rng": runtime.rank_rng_states(rng, rt)}, tmp_path / "s.pt")
    expected = [rng.random() for _ in range(5)]
    fresh = random.Random(0)
    runtime.set_rank_rng_states(fresh, torch.load(tmp_path / "s.pt", weights_only=True)["rank_rng"], rt)
    assert [fresh.random() for _ in range(5)] == expected
    state = random.Random(9).getstate()
    runtime.set_sampler_state(fresh, [state[0], list(state[1]), state[2]])  # as files written before held it
    assert fresh.getstate() == state


def make_stage_checkpoints(out):
    policy, enc = tiny_policy()
    args = {**policy.config.__dict__, "scalar_head": False}
    sd = {k: v for k, v in policy.state_dict().items() if not k.startswith("scalar_head")}
    common = {"config": {}, "step": 0, "tokenizer": "world"}
    runtime.save_checkpoint(str(out / "sft.pt"), {**common, "model": sd, "model_args": args, "kind": "sft"})
    runtime.save_checkpoint(str(out / "reward.pt"), {**common, "model": policy.state_dict(), "kind": "reward",
                                                     "model_args": {**args, "scalar_head": True},
                                                     "gain": 1.0, "bias": 0.0, "lm_weight": 0.05})


def run_main_here(monkeypatch, *argv):
    """ppo.main() in this process with these options; the config globals it rebinds are restored after."""
    run_here(monkeypatch, ppo, *argv)


@pytest.mark.parametrize("bad, message", [
    ("--minibatch_size=5", "--minibatch_size=5 is out of range: it must be between 1 and --batch_size"),
    ("--reward=human", "--reward='human' is out of range"),
    ("--kl_estimator=k2", "--kl_estimator='k2' is out of range"),
    ("--temperature=0.0", "--temperature=0.0 is out of range"),
    ("--beta=-0.1", "--beta=-0.1 is out of range"),
    ("--save_interval=0", "--save_interval=0 is out of range"),
    ("--target_kl=3", "--target_kl adapts beta by factors, so it needs --beta > 0"),  # with --beta=0 below
])
def test_bad_options_stop_before_anything_is_touched(tmp_path, monkeypatch, bad, message):
    (tmp_path / "ppo.jsonl").write_text('{"iter": 1}\n')
    with pytest.raises(SystemExit, match="^error: " + re.escape(message)):
        run_main_here(monkeypatch, f"--out_dir={tmp_path}", "--batch_size=4", "--minibatch_size=2",
                      *["--beta=0"] * bad.startswith("--target_kl"), bad)
    assert (tmp_path / "ppo.jsonl").read_text() == '{"iter": 1}\n' and not (tmp_path / "ppo.pt").exists()


def test_the_kl_horizon_is_checked_only_for_the_kl_controller_that_reads_it(tmp_path, refusal):
    """--kl_horizon below the episodes of one update could flip beta's sign, so with --target_kl it is
    refused; without the controller it is never read, and must not refuse a batch of 10,001 answers."""
    assert refusal("ppo", f"--out_dir={tmp_path}", "--target_kl=1", "--kl_horizon=100") == (
        "error: --kl_horizon=100 is out of range: it must be >= --batch_size x processes with --target_kl, "
        "so an update moves beta by <= 20 %")
    for flags in (["--kl_horizon=100"], ["--batch_size=10001"]):  # past every range: the next check stops it
        assert refusal("ppo", f"--out_dir={tmp_path}", *flags, "--reward=gold", "--prompts=p.jsonl") == (
            "error: --reward=gold judges the world's language only; drop it with --prompts")
    assert os.listdir(tmp_path) == []


def run_ppo(out, *args):
    cmd = [sys.executable, "ppo.py", f"--out_dir={out}", "--batch_size=4", "--minibatch_size=2",
           "--max_new_tokens=8", "--eval_samples=1", "--n_eval=4", "--ppo_epochs=2", *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_torchrun_two_processes_on_cpu(tmp_path):
    """PPO under torchrun with gloo: both ranks sample their own rollouts (their prompt samplers differ in the
    checkpoint), only rank 0 logs, and the end-of-run check prints once."""
    make_stage_checkpoints(tmp_path)
    cmd = [*torchrun_launcher(), "ppo.py", f"--out_dir={tmp_path}", "--batch_size=4", "--minibatch_size=2",
           "--max_new_tokens=8", "--eval_samples=1", "--n_eval=2", "--device=cpu", "--max_iters=2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "ppo.jsonl")]
    assert [row["iter"] for row in rows] == [1, 2]
    assert r.stdout.count("ppo wins") == 1
    ck = runtime.load_checkpoint(str(tmp_path / "ppo.pt"), "ppo")
    assert ck["step"] == 2 and len(ck["rank_rng"]) == 2
    assert ck["rank_rng"][0]["prompts"] != ck["rank_rng"][1]["prompts"]


def test_smoke_run_under_fp16_with_the_hidden_human_as_reward(tmp_path):
    make_stage_checkpoints(tmp_path)
    r = run_ppo(tmp_path, "--max_iters=2", "--reward=gold", "--dtype=float16", "--kl_estimator=k3")
    rows = [json.loads(line) for line in open(tmp_path / "ppo.jsonl")]
    assert [row["iter"] for row in rows] == [1, 2] and all(math.isfinite(row["pg_loss"]) for row in rows)
    assert rows[0]["first_ratio"] == pytest.approx(1.0, abs=1e-3)  # fp16 matmuls round the log-probs
    assert runtime.load_checkpoint(str(tmp_path / "ppo.pt"), "ppo")["step"] == 2 and "ppo wins" in r.stdout


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    whole, split = tmp_path / "whole", tmp_path / "split"
    for d in (whole, split):
        d.mkdir()
        make_stage_checkpoints(d)
    (whole / "ppo.jsonl").write_text('{"iter": 99}\n')  # an old log: a fresh run replaces it
    r = run_ppo(whole, "--max_iters=2", "--target_kl=1")  # a reward model with an lm_weight term
    rows = [json.loads(line) for line in open(whole / "ppo.jsonl")]
    assert [row["iter"] for row in rows] == [1, 2] and set(rows[0]) == set(rows[1])
    assert rows[0]["first_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert abs(rows[0]["kl"]) < 1e-5  # the policy starts as the reference
    assert math.isfinite(rows[1]["pg_loss"]) and rows[1]["beta"] != ppo.beta  # the controller moved beta
    assert "ppo wins" in r.stdout
    assert {"sampling", "scoring", "hidden human", "training"} <= set(time_split(r.stdout, "ppo"))
    run_ppo(split, "--max_iters=1", "--target_kl=1")  # "killed" after iteration 1 (its checkpoint is saved)
    with open(split / "ppo.jsonl", "a") as f:
        f.write('{"iter": 2, "score": 0.0}\n{"iter": 3, "sc')  # logged after the checkpoint, the last row cut
    r = run_ppo(split, "--max_iters=2", "--target_kl=1", "--resume=True")
    assert f"resuming from {split / 'ppo.pt'} at iteration 1" in r.stdout
    a, b = (runtime.load_checkpoint(str(d / "ppo.pt"), "ppo") for d in (whole, split))
    assert a["step"] == b["step"] == 2 and a["kl_coef"] == b["kl_coef"]
    sft = runtime.load_checkpoint(str(split / "sft.pt"), "sft")
    assert b["sft_fingerprint"] == runtime.fingerprint(sft["model"])  # the SFT model it was tuned from
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows = [[{k: v for k, v in json.loads(line).items() if k != "time"} for line in open(d / "ppo.jsonl")]
            for d in (whole, split)]
    assert rows[0] == rows[1]
    # resuming a finished run says so in one line
    run_main_here(monkeypatch, f"--out_dir={split}", "--batch_size=4", "--minibatch_size=2", "--max_iters=2",
                  "--max_new_tokens=8", "--n_eval=4", "--eval_samples=1", "--resume=True")
    assert "ppo.pt is already at iteration 2 >= --max_iters=2: nothing to train" in capsys.readouterr().out
    # resumed with a fixed beta (no --target_kl), the run uses that beta, not the controller's last one
    run_ppo(split, "--max_iters=3", "--beta=0.2", "--resume=True")
    assert [json.loads(line)["beta"] for line in open(split / "ppo.jsonl")][2:] == [0.2]


def test_resume_without_a_checkpoint_is_one_line_before_any_stage_is_built(tmp_path, monkeypatch):
    """--resume=True in a folder with no ppo.pt (a mistyped --out_dir) must not first pretrain, SFT and train
    a reward model there for minutes: the missing checkpoint is refused before the inputs are looked for."""
    def build(path, script, out_dir):  # what load_rl_inputs would run for the missing sft.pt and reward.pt
        raise AssertionError(f"built {script} before checking the checkpoint to resume")
    monkeypatch.setattr(runtime, "ensure_checkpoint", build)
    with pytest.raises(SystemExit, match="^error: checkpoint " + re.escape(str(tmp_path / "ppo.pt"))
                       + " not found$"):
        run_main_here(monkeypatch, f"--out_dir={tmp_path}", "--resume=True")
    assert list(tmp_path.iterdir()) == []


def test_a_non_finite_reward_stops_the_run_in_one_line(tmp_path, monkeypatch):
    make_stage_checkpoints(tmp_path)  # (a reward.pt whose gain is NaN is refused when it is loaded)
    monkeypatch.setattr(ppo, "reward_scores", lambda rm, enc, prompts, *a, **k: torch.full((len(prompts),),
                                                                                        float("nan")))
    with pytest.raises(SystemExit, match=r"^error: ppo step 1: score is nan \(not finite\); stopped"):
        run_main_here(monkeypatch, f"--out_dir={tmp_path}", "--batch_size=4", "--minibatch_size=2",
                      "--max_new_tokens=8", "--max_iters=2")
    assert not (tmp_path / "ppo.pt").exists()


def test_own_prompts_file_and_a_bad_one(tmp_path):
    make_stage_checkpoints(tmp_path)
    good = tmp_path / "prompts.jsonl"
    good.write_text('{"prompt": "Tell me about the sea, please."}\n'
                    '{"messages": [{"role": "user", "content": "Describe the owl."}]}\n')
    r = run_ppo(tmp_path, f"--prompts={good}", "--max_iters=1")
    assert "no gold or win rate is reported" in r.stdout and "ppo wins" not in r.stdout
    assert json.loads(open(tmp_path / "ppo.jsonl").readline())["gold"] is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    before = (tmp_path / "ppo.pt").read_bytes(), (tmp_path / "ppo.jsonl").read_bytes()
    r = subprocess.run([sys.executable, "ppo.py", f"--out_dir={tmp_path}", f"--prompts={bad}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"error: {bad}:2:")
    assert ((tmp_path / "ppo.pt").read_bytes(), (tmp_path / "ppo.jsonl").read_bytes()) == before


@pytest.mark.parametrize("script", ["ppo", "grpo"])
def test_a_prompt_with_no_room_for_its_answer_is_one_line_naming_its_line(tmp_path, script):
    make_stage_checkpoints(tmp_path)  # block_size 96
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Describe the cat."}) + "\n"
                    + json.dumps({"prompt": " ".join(["Describe the cat."] * 20)}) + "\n")
    r = subprocess.run([sys.executable, f"{script}.py", f"--out_dir={tmp_path}", f"--prompts={path}",
                        "--max_new_tokens=16"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    msg = r.stderr.strip()
    assert r.returncode != 0 and msg.startswith(f"error: {path}:2: the prompt is "), r.stderr[-1500:]
    assert "\n" not in msg and "--max_new_tokens=16" in msg
    assert not (tmp_path / f"{script}.pt").exists() and not (tmp_path / f"{script}.jsonl").exists()
    # the world's own prompts too: an answer longer than the room left was cut short without a word
    r = subprocess.run([sys.executable, f"{script}.py", f"--out_dir={tmp_path}", "--max_new_tokens=80"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    msg = r.stderr.strip()
    want = (r"error: a world prompt is \d+ tokens with the chat template; the model's 96 have no room for "
            r"--max_new_tokens=80 more")
    assert r.returncode != 0 and re.fullmatch(want, msg), msg
    assert not (tmp_path / f"{script}.pt").exists() and not (tmp_path / f"{script}.jsonl").exists()


def test_the_value_loss_never_moves_the_policys_trunk():
    """The value head reads detached features: the value loss trains the head and nothing else."""
    policy, enc = tiny_policy()
    torch.nn.init.normal_(policy.scalar_head.weight, std=0.1)  # a fresh head is 0: no gradient to pass on
    seq = torch.randint(0, enc.n_vocab, (3, 12))
    attn, mask = torch.ones(3, 12), torch.ones(3, 11)
    _, values, _ = ppo.forward_policy(policy, seq, attn, 1.0)
    ppo.clipped_value_loss(values, torch.zeros(3, 11), torch.ones(3, 11), mask, 0.2).backward()
    trunk = [p for n, p in policy.named_parameters() if not n.startswith("scalar_head.")]
    assert all(p.grad is None or not p.grad.any() for p in trunk)
    assert policy.scalar_head.weight.grad.abs().sum() > 0


def test_main_trains_on_the_answer_tokens_only_and_takes_off_the_missing_end_penalty(tmp_path, monkeypatch):
    """What main() hands the equations: the action mask is the sampled tokens (never a prompt token), and
    each score is the reward less no_end_penalty for an answer that never ended its turn."""
    make_stage_checkpoints(tmp_path)
    seen = {"masks": []}
    real_respond, real_token_rewards, real_clip_loss = ppo.respond, ppo.token_rewards, ppo.ppo_clip_loss

    def respond_and_keep(*args, **kwargs):  # the tiny random policy never ends: say every other answer did
        replies, seen["batch"] = real_respond(*args, **kwargs)
        seen["prompts"] = args[2]
        seen["replies"] = [{**r, "ended": r["ended"] or i % 2 == 0} for i, r in enumerate(replies)]
        return seen["replies"], seen["batch"]

    def token_rewards_and_keep(scores, kl, action, kl_coef):
        seen["scores"], seen["action"] = scores.clone(), action.clone()
        return real_token_rewards(scores, kl, action, kl_coef)

    def clip_loss_and_keep(logp, old_logp, adv, mask, cliprange):
        seen["masks"].append(mask.clone())
        return real_clip_loss(logp, old_logp, adv, mask, cliprange)

    monkeypatch.setattr(ppo, "respond", respond_and_keep)
    monkeypatch.setattr(ppo, "token_rewards", token_rewards_and_keep)
    monkeypatch.setattr(ppo, "ppo_clip_loss", clip_loss_and_keep)
    run_main_here(monkeypatch, f"--out_dir={tmp_path}", "--batch_size=4", "--minibatch_size=2",
                  "--max_iters=1", "--max_new_tokens=8", "--n_eval=1", "--eval_samples=1", "--reward=gold",
                  "--no_end_penalty=5.0", "--ppo_epochs=1", "--device=cpu")
    seq, attn, gen = seen["batch"][:3]
    assert torch.equal(seen["action"], gen[:, 1:].float()) and not (seen["action"] * (1 - gen[:, 1:])).any()
    assert sum(m.sum() for m in seen["masks"]) == gen[:, 1:].sum()  # every answer token, once per epoch
    ended = torch.tensor([float(r["ended"]) for r in seen["replies"]])
    assert 0 < ended.sum() < 4  # answers that ended and answers that did not
    golds = torch.tensor([world.gold(p, r["text"], r["ended"])
                          for p, r in zip(seen["prompts"], seen["replies"])])
    torch.testing.assert_close(seen["scores"], golds - 5.0 * (1 - ended))


def categorical(seed=0):
    """A 5-token policy (its logits theta), a reference, and exact gradients of both KL directions."""
    torch.manual_seed(seed)
    theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(5, dtype=torch.float64), 0)
    logp = torch.log_softmax(theta, 0)
    grad = lambda f: torch.autograd.grad(f, theta, retain_graph=True)[0]  # noqa: E731
    kl, reverse = (logp.exp() * (logp - ref)).sum(), (ref.exp() * (ref - logp)).sum()
    return logp, ref, grad, grad(kl), grad(reverse)


def test_as_a_reward_k1_pushes_along_the_kl_and_k3_does_not():
    """Exact expectations over the vocabulary of the score-function gradient E_pi[k grad log pi], the KL
    estimate k a detached per-token reward as in PPO: k1 gives grad KL(pi || ref); k3, whose value is as
    unbiased, gives grad KL(pi || ref) - grad KL(ref || pi) (Tang & Munos 2025, arXiv 2506.09477)."""
    logp, ref, grad, d_kl, d_reverse = categorical()
    for estimator, want in (("k1", d_kl), ("k3", d_kl - d_reverse)):
        k = ppo.kl_penalty(logp.detach(), ref, estimator)
        torch.testing.assert_close(grad((logp.exp().detach() * k * logp).sum()), want)
    assert (d_kl - d_reverse - d_kl).abs().max() > 0.1  # the two differ here: the test can fail


def test_approx_kl_is_half_the_mean_squared_log_ratio():
    """approx_kl = 0.5 * E[(log ratio)^2]: a log ratio of 0.2 on every answer token gives 0.5 * 0.04 = 0.02
    (without the 0.5 it would read 0.04); the padding position's log ratio of 5 is not counted."""
    old = torch.zeros(1, 4)
    logp = torch.tensor([[0.2, 0.2, 0.2, 5.0]])
    _, st = ppo.ppo_clip_loss(logp, old, torch.ones(1, 4), torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 0.2)
    assert st["approx_kl"] == pytest.approx(0.02, rel=1e-5)
    assert st["ratio"] == pytest.approx(math.exp(0.2), rel=1e-6)


def test_explained_variance_ignores_a_constant_offset_of_the_values():
    """Var[R - V] is a variance, centred: values = returns + 1 leave a constant residual, variance 0, so the
    explained variance is 1 (uncentred, E[resid^2] = 1 against Var[R] = 2/3 would give 1 - 1.5 = -0.5)."""
    returns = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    values = returns + 1.0
    values[0, 3] = 50.0  # padding: never counted
    assert ppo.explained_variance(values, returns, mask).item() == pytest.approx(1.0, abs=1e-6)


def scripted_policy(logits, values):
    """A stand-in for the GPT that forward_policy calls: it returns these logits (B, L, V) and values
    (B, L)."""
    def policy(seq, attention_mask=None, return_values=False, detach_values=False):
        assert return_values and detach_values and attention_mask is not None
        return logits, None, values
    return policy


def test_forward_policy_reads_the_value_of_the_state_before_each_token():
    """Index t of forward_policy's outputs is about token seq[:, t+1]: its log-prob comes from the logits at
    position t, and so must its value, V(seq[:, :t+1]) = values[:, t]. With values[:, t] = 10 t the values
    returned are 0, 10, 20, 30 (shifted by one they would read 10, 20, 30, 40)."""
    B, L, V = 2, 5, 4
    values = 10.0 * torch.arange(L).float().expand(B, L)
    logits = torch.zeros(B, L, V)
    logits[:, :, 1] = math.log(3.0)  # token 1 has probability 3/6 = 1/2, the others 1/6
    seq = torch.tensor([[0, 1, 2, 1, 3], [1, 1, 1, 1, 1]])
    logp, v, _ = ppo.forward_policy(scripted_policy(logits, values), seq, torch.ones(B, L), 1.0)
    torch.testing.assert_close(v, torch.tensor([[0.0, 10.0, 20.0, 30.0]] * 2))
    half, sixth = math.log(0.5), math.log(1 / 6)
    torch.testing.assert_close(logp, torch.tensor([[half, sixth, half, sixth], [half] * 4]))


def test_forward_policy_entropy_by_hand_and_unchanged_by_shifting_the_logits():
    """H = logsumexp(z) - sum p z, which no constant added to the logits changes: uniform logits all equal to
    3 give H = ln V at any temperature (-sum p z alone would read -3 / T). Logits 7 + (0, ln 3) at
    temperature 1 give p = (1/4, 3/4) and H = ln 4 - 3/4 ln 3; at temperature 2 the logits are halved:
    p = (1, sqrt 3) / (1 + sqrt 3)."""
    V = 6
    uniform = torch.full((1, 3, V), 3.0)
    seq = torch.zeros(1, 3, dtype=torch.long)
    for temperature in (1.0, 0.5):
        _, _, h = ppo.forward_policy(scripted_policy(uniform, torch.zeros(1, 3)), seq, torch.ones(1, 3),
                                     temperature)
        torch.testing.assert_close(h, torch.full((1, 2), math.log(V)))
    two = torch.tensor([[[0.0, math.log(3.0)]] * 2]) + 7.0  # shifted by 7: the same distribution
    policy = scripted_policy(two, torch.zeros(1, 2))
    _, _, h = ppo.forward_policy(policy, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), 1.0)
    assert h.item() == pytest.approx(math.log(4) - 0.75 * math.log(3), rel=1e-6)
    s = math.sqrt(3.0)
    p = torch.tensor([1.0, s]) / (1 + s)
    _, _, h = ppo.forward_policy(policy, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), 2.0)
    assert h.item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-6)


def test_forward_policy_entropy_is_logged_only_and_keeps_no_graph():
    """The log-probs carry the logits' graph (the surrogate's gradient flows through them); the entropy is
    only logged, so it holds none: a softmax over every position and a 50k vocabulary would keep a large one
    alive until the step. Its value is unchanged: uniform logits over V tokens, H = ln V."""
    V = 5
    logits = torch.zeros(2, 4, V, requires_grad=True)
    seq = torch.zeros(2, 4, dtype=torch.long)
    logp, _, h = ppo.forward_policy(scripted_policy(logits, torch.zeros(2, 4)), seq, torch.ones(2, 4), 1.0)
    assert logp.requires_grad and logp.grad_fn is not None
    assert not h.requires_grad and h.grad_fn is None
    torch.testing.assert_close(h, torch.full((2, 3), math.log(V)))
    g, = torch.autograd.grad(logp.sum(), logits)  # d log softmax_0 / dz = onehot(0) - 1/V, at 3 positions
    torch.testing.assert_close(g[:, :3], (torch.eye(V)[0] - 1 / V).expand(2, 3, V))
    assert g[:, 3].abs().max() == 0  # the last position scores no token


def test_main_whitens_the_advantages_over_the_rollout_batchs_answer_tokens(tmp_path, monkeypatch):
    """main() hands ppo_clip_loss advantages whitened over the whole rollout batch's answer tokens: the
    minibatches of one epoch partition the batch, so over their union the advantages have masked mean 0 and
    masked (population) variance 1, and 0 on every non-answer position. The raw GAE advantages, with a zero
    value head, are each answer's score at all its tokens: neither mean 0 nor variance 1."""
    make_stage_checkpoints(tmp_path)
    seen = []
    real_clip_loss = ppo.ppo_clip_loss

    def clip_loss_and_keep(logp, old_logp, adv, mask, cliprange):
        seen.append((adv.detach().clone(), mask.clone()))
        return real_clip_loss(logp, old_logp, adv, mask, cliprange)

    monkeypatch.setattr(ppo, "ppo_clip_loss", clip_loss_and_keep)
    run_main_here(monkeypatch, f"--out_dir={tmp_path}", "--batch_size=4", "--minibatch_size=2",
                  "--max_iters=1", "--max_new_tokens=8", "--n_eval=1", "--eval_samples=1",
                  "--ppo_epochs=2", "--device=cpu")
    assert len(seen) == 4  # 2 epochs x 2 minibatches; the first two are one epoch, the whole batch
    adv = torch.cat([a for a, _ in seen[:2]])
    mask = torch.cat([m for _, m in seen[:2]])
    assert adv.shape[0] == 4 and mask.sum() > 2  # more answer tokens than answers: the variance is defined
    assert ppo.masked_mean(adv, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert ppo.masked_mean(adv ** 2, mask).item() == pytest.approx(1.0, abs=1e-4)
    assert not adv[mask == 0].any()


def spy_on_token_rewards(monkeypatch):
    """A list that main()'s calls to token_rewards fill with their (k1 KL, answer mask), in order."""
    seen, real = [], ppo.token_rewards

    def token_rewards_and_keep(scores, kl, action, kl_coef):
        seen.append((kl.clone(), action.clone()))
        return real(scores, kl, action, kl_coef)
    monkeypatch.setattr(ppo, "token_rewards", token_rewards_and_keep)
    return seen


def test_main_logs_the_kl_in_nats_per_answer(tmp_path, monkeypatch):
    """The logged kl (and the controller's input) is the k1 KL summed over each answer's tokens, averaged
    over answers: sum_t k1_t action_t / B, not the per-token mean (smaller by the mean answer length), and k1
    whatever estimator the reward's penalty uses (here k3, which token_rewards must receive). Checked on
    iteration 2, after the policy has moved from the reference (a large lr)."""
    make_stage_checkpoints(tmp_path)
    seen, logps, real_penalty = spy_on_token_rewards(monkeypatch), [], ppo.kl_penalty
    monkeypatch.setattr(ppo, "kl_penalty", lambda a, b, est: logps.append((a, b)) or real_penalty(a, b, est))
    run_main_here(monkeypatch, f"--out_dir={tmp_path}", "--batch_size=4", "--minibatch_size=2",
                  "--max_iters=2", "--max_new_tokens=8", "--n_eval=1", "--eval_samples=1",
                  "--ppo_epochs=2", "--lr=1e-2", "--kl_estimator=k3", "--device=cpu")
    rows = [json.loads(line) for line in open(tmp_path / "ppo.jsonl")]
    kl, action = seen[1]
    k1 = ppo.kl_k1(*logps[1])
    torch.testing.assert_close(kl, ppo.kl_k3(*logps[1]))  # the penalty is the estimator asked for
    per_answer = ((k1 * action).sum(1).mean()).item()
    assert abs(per_answer) > 1e-2 and action.sum(1).mean() > 1.5  # the two readings differ here
    assert abs(per_answer - (kl * action).sum(1).mean().item()) > 1e-3  # and k1 differs from k3 here
    assert rows[1]["kl"] == pytest.approx(per_answer, rel=1e-5)
    assert rows[1]["length"] == pytest.approx(action.sum(1).mean().item())


def test_main_scores_the_reference_at_the_sampling_temperature(tmp_path, monkeypatch):
    """At --temperature=0.7 the policy starts as the reference, so on the first iteration the KL is exactly 0
    on every answer token, provided both log-probs are of softmax(logits / 0.7): a reference read at
    temperature 1 would leave a KL of log softmax(z / 0.7) - log softmax(z) on each token."""
    make_stage_checkpoints(tmp_path)
    seen = spy_on_token_rewards(monkeypatch)
    run_main_here(monkeypatch, f"--out_dir={tmp_path}", "--batch_size=4", "--minibatch_size=2",
                  "--max_iters=1", "--max_new_tokens=8", "--n_eval=1", "--eval_samples=1", "--reward=gold",
                  "--ppo_epochs=1", "--temperature=0.7", "--kl_estimator=k1", "--device=cpu")
    kl, action = seen[0]
    assert action.sum() > 0
    assert (kl * action).abs().max() < 1e-5
    assert abs(json.loads(open(tmp_path / "ppo.jsonl").readline())["kl"]) < 1e-5


def test_main_hands_cliprange_value_to_the_value_loss(tmp_path, monkeypatch):
    """--cliprange_value reaches the value loss and --cliprange does not (the two share a default of 0.2,
    so a mix-up would go unseen at the defaults)."""
    make_stage_checkpoints(tmp_path)
    seen, real = [], ppo.clipped_value_loss
    monkeypatch.setattr(ppo, "clipped_value_loss", lambda *a: seen.append(a[-1]) or real(*a))
    run_main_here(monkeypatch, f"--out_dir={tmp_path}", "--batch_size=4", "--minibatch_size=2",
                  "--max_iters=1", "--max_new_tokens=8", "--n_eval=1", "--eval_samples=1", "--device=cpu",
                  "--cliprange=0.1", "--cliprange_value=0.7")
    assert seen and set(seen) == {0.7}


def test_main_moves_beta_from_its_last_value_by_the_batchs_episodes_over_the_horizon(tmp_path, monkeypatch):
    """--target_kl: each iteration the controller gets the beta it returned last (the first time --beta), the
    logged per-answer KL, the target, and K_beta's numerator: the episodes of the whole rollout batch (4 here,
    not a minibatch's 2) over --kl_horizon. Starting at the reference the KL is about 0, far under 0.5: each
    update takes the full 20% x 4/8 off, and the log shows the beta after it."""
    make_stage_checkpoints(tmp_path)
    calls, real = [], ppo.adaptive_kl_coef
    monkeypatch.setattr(ppo, "adaptive_kl_coef", lambda *a: calls.append(a) or real(*a))
    run_main_here(monkeypatch, f"--out_dir={tmp_path}", "--batch_size=4", "--minibatch_size=2",
                  "--max_iters=3", "--max_new_tokens=8", "--n_eval=1", "--eval_samples=1", "--device=cpu",
                  "--beta=0.1", "--target_kl=0.5", "--kl_horizon=8")
    rows = [json.loads(line) for line in open(tmp_path / "ppo.jsonl")]
    assert [c[2:] for c in calls] == [(0.5, 4, 8)] * 3
    assert [c[1] for c in calls] == pytest.approx([row["kl"] for row in rows])
    assert [c[0] for c in calls] == pytest.approx([0.1] + [row["beta"] for row in rows[:-1]])
    assert rows[0]["beta"] == pytest.approx(0.1 * (1 - 0.2 * 4 / 8))


def test_main_wires_beta_gae_and_the_value_targets_as_the_equations_say(tmp_path, monkeypatch):
    """With --target_kl the second iteration's rewards pay the beta the controller logged after the first
    (not --beta); gae gets (gamma, lam) in that order; the value loss is clipped around the rollout's values
    and fits gae's returns (raw advantages + values, not the whitened ones): each minibatch row is a row of
    what gae was given and gave back."""
    make_stage_checkpoints(tmp_path)
    betas, gaes, vlosses = [], [], []
    real_rewards, real_gae, real_vloss = ppo.token_rewards, ppo.gae, ppo.clipped_value_loss
    monkeypatch.setattr(ppo, "token_rewards", lambda *a: betas.append(a[3]) or real_rewards(*a))

    def gae_and_keep(rewards, values, mask, gamma, lam):
        out = real_gae(rewards, values, mask, gamma, lam)
        gaes.append((values.clone(), out[1].clone(), gamma, lam))
        return out
    monkeypatch.setattr(ppo, "gae", gae_and_keep)
    def value_loss_and_keep(values, old_values, returns, mask, cliprange_value):
        vlosses.append((len(gaes), old_values.detach().clone(), returns.detach().clone()))
        return real_vloss(values, old_values, returns, mask, cliprange_value)
    monkeypatch.setattr(ppo, "clipped_value_loss", value_loss_and_keep)
    run_main_here(monkeypatch, f"--out_dir={tmp_path}", "--batch_size=4", "--minibatch_size=2",
                  "--max_iters=2", "--max_new_tokens=8", "--n_eval=1", "--eval_samples=1", "--device=cpu",
                  "--beta=0.1", "--target_kl=0.5", "--kl_horizon=8", "--gamma=0.9", "--lam=0.5")
    rows = [json.loads(line) for line in open(tmp_path / "ppo.jsonl")]
    assert betas == pytest.approx([0.1, rows[0]["beta"]]) and rows[0]["beta"] != pytest.approx(0.1)
    assert [g[2:] for g in gaes] == [(0.9, 0.5)] * 2
    assert vlosses
    for k, old_values, returns in vlosses:
        values, gae_returns = gaes[k - 1][:2]
        for v, r in zip(old_values, returns):
            assert any(torch.equal(v, v2) and torch.equal(r, r2) for v2, r2 in zip(values, gae_returns))


def test_main_gives_the_value_head_its_own_learning_rate(tmp_path, monkeypatch):
    """Two Adam groups: the trunk at --lr and the fresh value head (its weight and bias only) at --vf_lr."""
    make_stage_checkpoints(tmp_path)
    seen, step = [], runtime.optimizer_step

    def keep_groups(model, optimizer, scaler, grad_clip):
        seen.append([(g["lr"], {id(p) for p in g["params"]}) for g in optimizer.param_groups])
        heads.append({id(p) for p in model.scalar_head.parameters()})
        return step(model, optimizer, scaler, grad_clip)
    heads = []
    monkeypatch.setattr(runtime, "optimizer_step", keep_groups)
    run_main_here(monkeypatch, f"--out_dir={tmp_path}", "--batch_size=4", "--minibatch_size=2",
                  "--max_iters=1", "--max_new_tokens=8", "--n_eval=1", "--eval_samples=1", "--device=cpu",
                  "--lr=1e-4", "--vf_lr=3e-3")
    assert seen
    for groups, head in zip(seen, heads):
        (trunk_lr, trunk), (head_lr, head_params) = groups
        assert (trunk_lr, head_lr) == (1e-4, 3e-3) and head_params == head and not trunk & head


def test_the_end_of_run_check_asks_each_held_out_prompt_eval_samples_times(tmp_path, monkeypatch):
    """The final comparison with SFT asks the first --n_eval held-out prompts, --eval_samples times each."""
    make_stage_checkpoints(tmp_path)
    seen = []
    monkeypatch.setattr(ppo, "compare_to_sft",
                        lambda name, policy, ref, enc, evals, *a, **k: seen.append(evals))
    run_main_here(monkeypatch, f"--out_dir={tmp_path}", "--batch_size=2", "--minibatch_size=2",
                  "--max_iters=1", "--max_new_tokens=8", "--n_eval=3", "--eval_samples=2", "--device=cpu")
    assert seen == [world.prompts("eval")[:3] * 2]
