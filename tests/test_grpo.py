"""The critic-free policy gradients by hand (GRPO's group advantage, RLOO's leave-one-out baseline, the
clipped loss with the k3 KL, RLOO's REINFORCE loss over whole answers), the invariants at the first update,
the leave-one-out gradient's expectation computed exactly, and smoke runs of both baselines."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import grpo
import model as M
import runtime
from data import world
from rollout import respond, sample_kl
from test_ppo import make_stage_checkpoints, tiny_policy
from test_reliability import time_split  # noqa: E402
from conftest import run_here, torchrun_launcher  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_group_advantages_by_hand_and_each_group_sums_to_zero():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])  # two groups of 3: the second all tied
    adv = grpo.group_advantages(r, 3, eps=1e-4)
    # group 1: mean 2, unbiased std 1 -> (-1, 0, 1) / (1 + 1e-4); group 2: no spread -> 0
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / torch.tensor(
        [1 + 1e-4] * 3 + [1.0] * 3))
    x = torch.randn(40)
    assert grpo.group_advantages(x, 8, 1e-4).view(5, 8).sum(1).abs().max() < 1e-5


def test_rloo_equals_the_hand_worked_leave_one_out_value():
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    # answer 0: 1 - (2 + 6) / 2 = -3; answer 1: 2 - 3.5 = -1.5; answer 2: 6 - 1.5 = 4.5; group 2 likewise
    torch.testing.assert_close(grpo.rloo_advantages(r, 3), torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    # the leave-one-out advantage is G/(G-1) times the plain mean-baseline advantage
    x = torch.randn(12)
    plain = (x.view(3, 4) - x.view(3, 4).mean(1, keepdim=True)).view(-1)
    torch.testing.assert_close(grpo.rloo_advantages(x, 4), plain * 4 / 3)


def test_at_the_first_update_the_ratio_is_one_and_the_loss_is_the_plain_policy_gradient_loss():
    torch.manual_seed(0)
    logp = (-torch.rand(4, 6)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0]]).float()
    adv = torch.tensor([1.0, -2.0, 0.5, 0.0])
    old = logp.detach().clone()
    loss = grpo.grpo_loss(logp, old, old, adv, mask, 0.2, beta=0.1)  # policy = pi_old = reference
    # plain policy gradient, each answer's token-mean: -mean_i A_i * mean_t log pi (value and gradient)
    pg = -(adv * (logp * mask).sum(1) / mask.sum(1)).mean()
    g_loss, = torch.autograd.grad(loss, logp)
    g_pg, = torch.autograd.grad(pg, logp)
    torch.testing.assert_close(loss, -adv.mean())  # ratio 1 everywhere, KL 0
    torch.testing.assert_close(g_loss, g_pg)  # and the k3 term has zero gradient at pi = ref


def test_rloo_loss_at_the_first_update_is_reinforce_over_whole_answers_and_clips_by_hand():
    torch.manual_seed(0)
    logp = (-torch.rand(3, 4)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]).float()  # answers of 3, 1 and 4 tokens
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss = grpo.rloo_loss(logp, logp.detach(), adv, mask, 0.2)
    # ratio 1: the value is -mean_i A_i |o_i| and the gradient is REINFORCE's, -mean_i A_i grad log pi(o_i)
    torch.testing.assert_close(loss, -(adv * mask.sum(1)).mean())
    reinforce = -(adv * (logp * mask).sum(1)).mean()
    torch.testing.assert_close(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(reinforce, logp)[0])
    # a ratio of e on the first token with A = 1 is clipped at 1.2; the other two tokens keep ratio 1; the
    # answer's terms are summed, not averaged: -(1.2 + 1 + 1) / 1 answer
    one = torch.zeros(1, 3)
    assert grpo.rloo_loss(one, one - torch.tensor([[1.0, 0, 0]]), torch.ones(1), torch.ones(1, 3),
                          0.2).item() == pytest.approx(-3.2)
    # with A = -1 a ratio of e^-1 is held at 0.8: min(-e^-1, -0.8) = -0.8; a ratio of e, unclipped, -e; the
    # third token is off the answer and adds nothing
    s = grpo.clipped_surrogate(one, torch.tensor([[1.0, -1.0, 5.0]]), -torch.ones(1),
                               torch.tensor([[1.0, 1.0, 0.0]]), 0.2)
    torch.testing.assert_close(s, torch.tensor([[-0.8, -math.e, 0.0]]))


def test_the_leave_one_out_gradient_is_unbiased_summed_over_the_answer_and_biased_averaged_over_it():
    """Exact expectations, every group of G = 3 answers from a policy over three whole answers of 1, 2 and 4
    tokens: rloo_loss's expected gradient is -grad E[R] (the REINFORCE estimator with a baseline that does not
    depend on the answer it judges), while the token-mean loss (--rloo_token_mean) weighs each answer's
    gradient by 1 / |o_i| and misses it."""
    import itertools
    theta = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
    reward, length = torch.tensor([1.0, 0.2, 0.5]), [1, 2, 4]
    true = torch.autograd.grad(-(torch.softmax(theta, 0) * reward).sum(), theta)[0]  # -grad E[R]
    log_pi = torch.log_softmax(theta, 0)

    def expected(loss_of):
        total = torch.zeros(3)
        for group in itertools.product(range(3), repeat=3):
            # log pi(o) on the first token, 0 (another constant) on the rest: the answer's sum is log pi(o)
            logp = torch.stack([torch.cat([log_pi[y:y + 1], torch.zeros(3)]) for y in group])
            mask = torch.tensor([[1.0] * length[y] + [0.0] * (4 - length[y]) for y in group])
            adv = grpo.rloo_advantages(reward[list(group)], 3)
            g, = torch.autograd.grad(loss_of(logp, adv, mask), theta, retain_graph=True)
            total += log_pi[list(group)].sum().exp().detach() * g
        return total
    summed = expected(lambda logp, adv, mask: grpo.rloo_loss(logp, logp.detach(), adv, mask, 0.2))
    averaged = expected(lambda logp, adv, mask: grpo.grpo_loss(logp, logp.detach(), logp.detach(), adv, mask,
                                                                0.2, 0.0))
    torch.testing.assert_close(summed, true)
    assert (averaged - true).abs().max() > 0.02


def test_the_log_probs_recorded_while_sampling_are_pi_old_ratio_one_and_the_kl_needs_only_the_reference():
    # grpo.py takes pi_old from generate instead of a second pass: a real policy's first ratio is still 1
    policy, enc = tiny_policy()
    torch.manual_seed(1)
    ref = M.GPT(policy.config)  # another network: a KL well away from zero
    prompts = world.prompts("train")[:6]
    _, (seq, attn, gen, sampled) = respond(policy, enc, prompts, 12,
                                           generator=torch.Generator().manual_seed(0), return_batch=True)
    action = gen[:, 1:].float()
    logp = M.sequence_logprobs(policy, seq, attn)
    loss = grpo.grpo_loss(logp, sampled[:, 1:], logp.detach(), torch.ones(6), action, 0.2, 0.0)
    assert action.sum() > 6 and loss.item() == pytest.approx(-1.0, abs=1e-5)  # -mean(ratio * A), ratio 1
    # the evaluation's KL estimate from the recorded log-probs = the one from two fresh passes,
    # and 0 vs itself
    with torch.no_grad():
        two_passes = ((logp - M.sequence_logprobs(ref, seq, attn)) * action).sum(1)
    torch.testing.assert_close(sample_kl(sampled, ref, seq, attn, gen), two_passes, atol=1e-4, rtol=0)
    assert two_passes.abs().min() > 0.01 and sample_kl(sampled, policy, seq, attn, gen).abs().max() < 1e-4


def test_k3_term_by_hand_and_clipping():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -2.0]])
    mask = torch.ones(1, 2)
    # adv 0: only the KL term; r = ref/pi = e^-0.5 on token 0: e^-0.5 + 0.5 - 1, token 1: 0;
    # mean over 2 tokens
    want = 0.1 * (math.exp(-0.5) + 0.5 - 1) / 2
    assert grpo.grpo_loss(logp, logp, ref, torch.zeros(1), mask, 0.2, 0.1).item() == pytest.approx(want)
    # a ratio of e^1 with a positive advantage is clipped at 1.2: -min(e * 1, 1.2 * 1) = -1.2 on that token
    old = torch.tensor([[-2.0, -2.0]])
    loss = grpo.grpo_loss(logp, old, logp, torch.ones(1), mask, 0.2, 0.0)
    assert loss.item() == pytest.approx((-1.2 - 1.0) / 2)


def test_the_k3_term_keeps_its_digits_in_fp32_when_pi_is_close_to_ref():
    # one answer of one token, advantage 0: the loss is beta * k3 of that token; its fp64 value from the same
    # fp32 log-probs is the truth ((r - 1) - log r = x^2 / 2 - x^3 / 6 + ..., never negative)
    for x in (1e-3, -1e-3, 2e-3, -3e-3, 5e-3):
        logp = torch.tensor([[-2.3]])
        ref = logp + x
        loss = grpo.grpo_loss(logp, logp, ref, torch.zeros(1), torch.ones(1, 1), 0.2, 1.0).item()
        lr = (ref - logp).double()
        exact = (lr.exp() - 1 - lr).item()
        assert loss >= 0 and loss == pytest.approx(exact, rel=1e-3), (x, loss, exact)


def test_a_group_whose_answers_all_score_the_same_contributes_no_gradient():
    logp = (-torch.rand(4, 5)).requires_grad_()
    mask = torch.ones(4, 5)
    for adv in (grpo.group_advantages(torch.full((4,), 0.7), 4, 1e-4),
                grpo.rloo_advantages(torch.full((4,), 0.7), 4)):
        loss = grpo.grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, 0.2, 0.05)
        g, = torch.autograd.grad(loss, logp)
        assert g.abs().max() == 0


def run_grpo(out, *args):
    cmd = [sys.executable, "grpo.py", f"--out_dir={out}", "--group_size=3", "--group_prompts=2",
           "--minibatch_size=3", "--max_new_tokens=8", "--eval_samples=1", "--n_eval=4",
           "--device=cpu", *args]  # exact fp32: the first iteration's KL is 0
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("baseline", ["grpo", "rloo"])
def test_smoke_run_of_each_baseline(tmp_path, baseline):
    make_stage_checkpoints(tmp_path)
    r = run_grpo(tmp_path, f"--baseline={baseline}", "--max_iters=2")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / f"{baseline}.jsonl")]
    assert [row["iter"] for row in rows] == [1, 2] and all(math.isfinite(row["loss"]) for row in rows)
    assert abs(rows[0]["kl"]) < 1e-5  # the policy starts as the reference
    assert runtime.load_checkpoint(str(tmp_path / f"{baseline}.pt"), "grpo")["step"] == 2
    assert f"{baseline} wins" in r.stdout
    assert {"sampling", "scoring", "hidden human", "training"} <= set(time_split(r.stdout, baseline))


def test_under_bf16_autocast_the_kl_compares_fp32_with_fp32(tmp_path):
    """pi_old's log-probs come from the fp32 sampler, so the reference's must be fp32 too: under bf16
    autocast RLOO's KL penalty at pi = ref would otherwise be rounding noise, not 0."""
    make_stage_checkpoints(tmp_path)
    r = run_grpo(tmp_path, "--baseline=rloo", "--max_iters=1", "--dtype=bfloat16")
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(open(tmp_path / "rloo.jsonl").readline())
    assert row["length"] > 1 and abs(row["kl"]) < 1e-5


def test_own_prompts_and_a_bad_prompts_file(tmp_path):
    make_stage_checkpoints(tmp_path)
    good = tmp_path / "prompts.jsonl"
    good.write_text('{"prompt": "Tell me about the sea."}\n'
                    '{"messages": [{"role": "user", "content": "Hi"}]}\n')
    r = run_grpo(tmp_path, f"--prompts={good}", "--max_iters=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no gold or win rate is reported" in r.stdout and "wins" not in r.stdout
    assert json.loads(open(tmp_path / "grpo.jsonl").readline())["gold"] is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    before = (tmp_path / "grpo.pt").read_bytes()
    r = run_grpo(tmp_path, f"--prompts={bad}", "--max_iters=1")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [f"error: {bad}:2: missing key 'prompt' "
                                                                   "(or 'messages')"]
    assert (tmp_path / "grpo.pt").read_bytes() == before


def test_resuming_a_checkpoint_without_its_rng_states_is_one_line(tmp_path, refusal):
    make_stage_checkpoints(tmp_path)
    ck = runtime.load_checkpoint(str(tmp_path / "sft.pt"), "sft")
    # a grpo.pt with weights only: no optimizer, no RNG states
    runtime.save_checkpoint(str(tmp_path / "grpo.pt"), {**ck, "kind": "grpo", "step": 2})
    before = (tmp_path / "grpo.pt").read_bytes()
    msg = refusal("grpo", f"--out_dir={tmp_path}", "--resume=True")
    assert msg.startswith(f"error: {tmp_path / 'grpo.pt'} has no optimizer, scaler, rng, rank_rng"), msg
    assert (tmp_path / "grpo.pt").read_bytes() == before


@pytest.mark.parametrize("baseline", ["grpo", "rloo"])
def test_resume_without_a_checkpoint_is_one_line_before_any_stage_is_built(tmp_path, monkeypatch, refusal,
                                                                            baseline):
    # a mistyped --out_dir with --resume=True: refused at once, not after building base, SFT and reward model
    def build(path, script, out_dir):
        raise AssertionError(f"built {script} before checking the checkpoint to resume")
    monkeypatch.setattr(runtime, "ensure_checkpoint", build)
    msg = refusal("grpo", f"--out_dir={tmp_path}", f"--baseline={baseline}", "--resume=True")
    assert msg == f"error: checkpoint {tmp_path / f'{baseline}.pt'} not found"
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    for d in (whole, split):
        d.mkdir()
        make_stage_checkpoints(d)
    assert run_grpo(whole, "--baseline=rloo", "--max_iters=2").returncode == 0
    assert run_grpo(split, "--baseline=rloo", "--max_iters=1").returncode == 0  # "killed" after iteration 1
    r = run_grpo(split, "--baseline=rloo", "--max_iters=2", "--resume=True")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {split / 'rloo.pt'} at iteration 1" in r.stdout
    a, b = (runtime.load_checkpoint(str(d / "rloo.pt"), "grpo") for d in (whole, split))
    assert a["step"] == b["step"] == 2 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    rows = [[{k: v for k, v in json.loads(line).items() if k != "time"} for line in open(d / "rloo.jsonl")]
            for d in (whole, split)]
    assert rows[0] == rows[1] and [row["iter"] for row in rows[0]] == [1, 2]
    r = run_grpo(split, "--baseline=rloo", "--max_iters=2", "--resume=True")  # a finished run says so
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rloo.pt is already at iteration 2 >= --max_iters=2: nothing to train" in r.stdout


def test_torchrun_two_processes_on_cpu(tmp_path):
    """RLOO under torchrun with gloo: both ranks sample their own groups (their prompt samplers differ in the
    checkpoint), only rank 0 logs, and the end-of-run check prints once."""
    make_stage_checkpoints(tmp_path)
    cmd = [*torchrun_launcher(), "grpo.py", f"--out_dir={tmp_path}", "--baseline=rloo", "--group_size=3",
           "--group_prompts=2", "--max_new_tokens=8", "--eval_samples=1", "--n_eval=2", "--device=cpu",
           "--max_iters=2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "rloo.jsonl")]
    assert [row["iter"] for row in rows] == [1, 2] and all(math.isfinite(row["loss"]) for row in rows)
    assert r.stdout.count("rloo wins") == 1
    ck = runtime.load_checkpoint(str(tmp_path / "rloo.pt"), "grpo")
    assert ck["step"] == 2 and len(ck["rank_rng"]) == 2
    assert ck["rank_rng"][0]["prompts"] != ck["rank_rng"][1]["prompts"]


def test_the_k3_term_in_the_loss_has_the_gradient_of_kl_ref_to_pi():
    """Differentiated on tokens from pi, GRPO's k3 term has the gradient E_pi[(1 - ref/pi) grad log pi] =
    grad KL(ref || pi), not grad KL(pi || ref): exact expectations over a 5-token vocabulary."""
    from test_ppo import categorical
    logp, ref, grad, d_kl, d_reverse = categorical()
    lp, rf = logp.view(5, 1), ref.view(5, 1)  # token y as an answer of its own, adv 0: only the KL term moves
    total = sum(lp[y].exp().detach() * grad(grpo.grpo_loss(lp[y:y + 1], lp[y:y + 1].detach(), rf[y:y + 1],
                                                           torch.zeros(1), torch.ones(1, 1), 0.2, 1.0))
                for y in range(5))
    torch.testing.assert_close(total, d_reverse)
    assert (d_reverse - d_kl).abs().max() > 0.1


def run_grpo_here(monkeypatch, out, *args):
    """grpo.main() in this process with run_grpo's tiny options, one iteration of one epoch of one minibatch
    (the whole batch: one grpo_loss call); the config globals main() rebinds are restored after."""
    run_here(monkeypatch, grpo, f"--out_dir={out}", "--group_size=3", "--group_prompts=2",
             "--minibatch_size=6", "--max_new_tokens=8", "--eval_samples=1", "--n_eval=1", "--device=cpu",
             "--max_iters=1", "--ppo_epochs=1", *args)


def spy_on_main(monkeypatch):
    """What main() hands its pieces: {name: [(args, result), ...]} for respond (the sampling; the final
    comparison samples through rollout's own), the two advantages and the two losses."""
    calls = {}
    for name in ("respond", "group_advantages", "rloo_advantages", "grpo_loss", "rloo_loss"):
        def wrapper(*args, _real=getattr(grpo, name), _name=name, **kwargs):
            out = _real(*args, **kwargs)
            calls.setdefault(_name, []).append((args, out))
            return out
        monkeypatch.setattr(grpo, name, wrapper)
    return calls


def test_by_default_each_batch_gets_one_update_on_all_its_answers(tmp_path, monkeypatch):
    """DeepSeekMath's setting: a single update per batch, so one grpo_loss call per iteration on every answer,
    made where the policy is still the one that sampled them (ratio 1: the clip never acts)."""
    make_stage_checkpoints(tmp_path)
    calls = spy_on_main(monkeypatch)
    run_here(monkeypatch, grpo, f"--out_dir={tmp_path}", "--group_size=3", "--group_prompts=2",
             "--max_new_tokens=8", "--eval_samples=1", "--n_eval=1", "--device=cpu", "--max_iters=2")
    assert [args[0].size(0) for args, _ in calls["grpo_loss"]] == [6, 6]
    for (logp, old_logp, _, _, action, *_), _ in calls["grpo_loss"]:
        ratio = torch.where(action > 0, logp.detach() - old_logp, 0.0).exp()
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-4, rtol=0)


def test_main_takes_the_missing_end_penalty_off_the_unended_answers_only(tmp_path, monkeypatch):
    """The score GRPO's group advantage sees is gold - no_end_penalty * (1 - ended): 5 off an answer that
    never ended its turn, nothing off one that did (the hidden human is the reward, so the scores can be
    worked out here from the replies main() sampled)."""
    make_stage_checkpoints(tmp_path)
    real_respond = grpo.respond

    def half_ended(*args, **kwargs):  # the tiny random policy never ends: say every other answer did
        replies, batch = real_respond(*args, **kwargs)
        return [{**r, "ended": r["ended"] or i % 2 == 0} for i, r in enumerate(replies)], batch
    monkeypatch.setattr(grpo, "respond", half_ended)
    calls = spy_on_main(monkeypatch)
    run_grpo_here(monkeypatch, tmp_path, "--reward=gold", "--no_end_penalty=5.0")
    (_, _, prompts, *_), (replies, _) = calls["respond"][0]
    ended = torch.tensor([float(r["ended"]) for r in replies])
    assert 0 < ended.sum() < 6  # answers that ended and answers that did not
    golds = torch.tensor([world.gold(p, r["text"], r["ended"]) for p, r in zip(prompts, replies)])
    (scores, group_size, _), _ = calls["group_advantages"][0]
    assert len(calls["respond"]) == 1 and len(replies) == 6 and group_size == 3
    torch.testing.assert_close(scores, golds - 5.0 * (1 - ended))


def move_the_reference(monkeypatch, calls):
    """main()'s frozen reference moved away from the policy (a KL to count), kept in calls["ref"]."""
    real_inputs = runtime.load_rl_inputs

    def moved_reference(*args):
        ref, *rest = real_inputs(*args)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        calls["ref"] = ref
        return (ref, *rest)
    monkeypatch.setattr(runtime, "load_rl_inputs", moved_reference)


def test_grpo_in_main_keeps_the_kl_out_of_the_reward_and_puts_beta_and_the_reference_in_the_loss(
        tmp_path, monkeypatch):
    """GRPO, scores stubbed to 0, the reference moved: the group advantages see the scores alone (all 0), and
    grpo_loss gets --beta and the reference's log-probs of the sampled answers (its k3 term, eq. 4)."""
    make_stage_checkpoints(tmp_path)
    calls = spy_on_main(monkeypatch)
    monkeypatch.setattr(grpo, "reward_scores", lambda rm, enc, convs, *a, **k: torch.zeros(len(convs)))
    move_the_reference(monkeypatch, calls)
    run_grpo_here(monkeypatch, tmp_path, "--beta=0.5", "--no_end_penalty=0.0")
    _, (_, (seq, attn, gen, _)) = calls["respond"][0]
    (scores, _, _), _ = calls["group_advantages"][0]
    assert not scores.any() and "rloo_advantages" not in calls
    (args, loss), = calls["grpo_loss"]
    with torch.no_grad():
        ref_logp = M.sequence_logprobs(calls["ref"], seq, attn, 1.0)
    assert args[6] == 0.5 and loss > 0.01  # all advantages 0: the loss is the k3 KL term alone, and not 0
    assert torch.equal(args[4].sum(1).sort().values, gen[:, 1:].float().sum(1).sort().values)
    torch.testing.assert_close((args[2] * args[4]).sum(1).sort().values,  # on the answer tokens
                               (ref_logp * gen[:, 1:]).sum(1).sort().values)


def test_rloo_in_main_pays_minus_beta_kl_in_the_reward_and_keeps_it_out_of_the_loss(tmp_path, monkeypatch):
    """RLOO, scores stubbed to 0 and no end penalty: each answer's reward is R_i = -beta * KL_i (k1 summed
    over its sampled tokens, the reference moved away from the policy so KL_i != 0), the advantage handed to
    the loss is R_i - (sum of the group's other two R_j) / 2, and the loss is RLOO's, with no KL term (the KL
    is counted once); --rloo_token_mean=True hands the same advantages to GRPO's loss with beta 0."""
    make_stage_checkpoints(tmp_path)
    calls = spy_on_main(monkeypatch)
    monkeypatch.setattr(grpo, "reward_scores", lambda rm, enc, convs, *a, **k: torch.zeros(len(convs)))
    move_the_reference(monkeypatch, calls)
    for token_mean in (False, True):
        calls.clear()
        run_grpo_here(monkeypatch, tmp_path, "--baseline=rloo", "--beta=0.5", "--no_end_penalty=0.0",
                      f"--rloo_token_mean={token_mean}")
        _, (_, (seq, attn, gen, sampled)) = calls["respond"][0]
        with torch.no_grad():
            kl = ((sampled[:, 1:] - M.sequence_logprobs(calls["ref"], seq, attn, 1.0)) * gen[:, 1:]).sum(1)
        r = -0.5 * kl
        want = torch.stack([r[i] - (r[i // 3 * 3:i // 3 * 3 + 3].sum() - r[i]) / 2 for i in range(6)])
        assert kl.abs().min() > 0.01 and want.abs().max() > 0.01  # a KL to pay: the test can fail
        (rewards, group_size), _ = calls["rloo_advantages"][0]
        assert group_size == 3 and "group_advantages" not in calls
        torch.testing.assert_close(rewards, r)
        if token_mean:
            (args, _), = calls["grpo_loss"]  # one minibatch of all 6 answers, in a shuffled order
            assert "rloo_loss" not in calls and args[6] == 0.0  # beta 0: the KL is in the reward only
            adv = args[3]
        else:
            (args, _), = calls["rloo_loss"]
            assert "grpo_loss" not in calls
            adv = args[2]
        torch.testing.assert_close(adv.sort().values, want.sort().values)


@pytest.mark.parametrize("baseline, weight", [("grpo", 0.6), ("rloo", 0.3)])
def test_without_beta_each_baseline_weighs_its_own_kl_and_the_checkpoint_records_the_weight(
        tmp_path, monkeypatch, baseline, weight):
    """--beta left at None: GRPO's loss gets 0.6 (its per-token k3 term), RLOO's rewards pay 0.3 times the
    sequence's KL; the checkpoint's config holds the number used, not None."""
    make_stage_checkpoints(tmp_path)
    calls = spy_on_main(monkeypatch)
    monkeypatch.setattr(grpo, "reward_scores", lambda rm, enc, convs, *a, **k: torch.zeros(len(convs)))
    move_the_reference(monkeypatch, calls)
    run_grpo_here(monkeypatch, tmp_path, f"--baseline={baseline}", "--no_end_penalty=0.0")
    if baseline == "grpo":
        (args, _), = calls["grpo_loss"]
        assert args[6] == weight
    else:
        _, (_, (seq, attn, gen, sampled)) = calls["respond"][0]
        with torch.no_grad():
            kl = ((sampled[:, 1:] - M.sequence_logprobs(calls["ref"], seq, attn, 1.0)) * gen[:, 1:]).sum(1)
        (rewards, _), _ = calls["rloo_advantages"][0]
        assert kl.abs().min() > 0.01 and "grpo_loss" not in calls and len(calls["rloo_loss"]) == 1
        torch.testing.assert_close(rewards, -weight * kl)
    assert runtime.load_checkpoint(str(tmp_path / f"{baseline}.pt"), "grpo")["config"]["beta"] == weight


@pytest.mark.parametrize("baseline", ["grpo", "rloo"])
def test_beta_zero_is_accepted_by_the_option_check(tmp_path, monkeypatch, baseline):
    """--beta=0 (no KL term: the clipped surrogate alone, or RLOO's plain score) is a valid choice, unlike a
    negative one: the option check lets it through, and main() goes on with beta 0 (not None's default)."""
    class Reached(Exception):
        pass
    monkeypatch.setattr(grpo, "training_prompts", lambda prompts: (_ for _ in ()).throw(Reached()))
    with pytest.raises(Reached):  # the options were accepted: main() went on to read its prompts
        run_here(monkeypatch, grpo, f"--out_dir={tmp_path}", f"--baseline={baseline}", "--beta=0")
    assert grpo.beta == 0 and not os.listdir(tmp_path)


@pytest.mark.parametrize("bad", ["-0.1", "abc", "True", "(0.3,)"])
def test_a_beta_that_is_not_a_number_at_least_zero_is_one_line(tmp_path, refusal, bad):
    msg = refusal("grpo", f"--out_dir={tmp_path}", f"--beta={bad}")
    shown = repr(bad) if bad == "abc" else bad  # a bare word is a string
    assert msg.startswith(f"error: --beta={shown} is out of range: it must be >= 0"), msg
    assert not os.listdir(tmp_path)


def test_rloo_token_mean_with_grpo_is_one_line(tmp_path, refusal):
    msg = refusal("grpo", f"--out_dir={tmp_path}", "--rloo_token_mean=True")
    assert msg == "error: --rloo_token_mean=True changes RLOO's loss; use it with --baseline=rloo", msg
    assert not os.listdir(tmp_path)


def test_flat_groups_counts_groups_of_consecutive_answers(tmp_path, monkeypatch):
    """A group is a prompt's G consecutive answers: scores (1, 1, 1 | 0, 1, 2) with G = 3 are one flat group
    of two (no signal from it); the same scores cut the other way, (1, 1 | 1, 0 | 1, 2), would say a third."""
    make_stage_checkpoints(tmp_path)
    monkeypatch.setattr(grpo, "reward_scores",
                        lambda rm, enc, convs, *a, **k: torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 2.0]))
    run_grpo_here(monkeypatch, tmp_path, "--no_end_penalty=0.0")
    row, = [json.loads(line) for line in open(tmp_path / "grpo.jsonl")]
    assert row["flat_groups"] == 0.5


def test_main_scores_the_reference_at_the_sampling_temperature(tmp_path, monkeypatch):
    """At --temperature=0.7 the policy starts as the reference, so at the first update pi_old (recorded while
    sampling, softmax(z / 0.7)) and the reference agree on every answer token only if the reference is read at
    0.7 too: read at temperature 1 it would differ by log softmax(z / 0.7) - log softmax(z)."""
    make_stage_checkpoints(tmp_path)
    calls = spy_on_main(monkeypatch)
    run_grpo_here(monkeypatch, tmp_path, "--temperature=0.7")
    (args, _), = calls["grpo_loss"]
    old_logp, ref_logp, action = args[1], args[2], args[4]
    assert action.sum() > 0
    assert ((old_logp - ref_logp) * action).abs().max() < 1e-5


def test_main_samples_each_prompts_group_as_consecutive_answers_and_passes_adv_eps(tmp_path, monkeypatch):
    """group_advantages reads a group as G consecutive answers, so main() must sample each chosen prompt G
    times in a row: (p1, p1, p1, p2, p2, p2), not (p1, p2, p1, p2, p1, p2); and --adv_eps reaches it."""
    make_stage_checkpoints(tmp_path)
    calls = spy_on_main(monkeypatch)
    run_grpo_here(monkeypatch, tmp_path, "--adv_eps=0.25")
    (_, _, convs, *_), _ = calls["respond"][0]
    assert len(convs) == 6 and convs[0] != convs[3]  # two different prompts: the check bites
    assert convs == [convs[0]] * 3 + [convs[3]] * 3
    (_, group_size, eps), _ = calls["group_advantages"][0]
    assert (group_size, eps) == (3, 0.25)


def test_the_end_of_run_check_asks_each_held_out_prompt_eval_samples_times(tmp_path, monkeypatch):
    """The final comparison with SFT asks the first --n_eval held-out prompts, --eval_samples times each."""
    make_stage_checkpoints(tmp_path)
    seen = []
    monkeypatch.setattr(grpo, "compare_to_sft",
                        lambda name, policy, ref, enc, evals, *a, **k: seen.append(evals))
    run_here(monkeypatch, grpo, f"--out_dir={tmp_path}", "--group_size=2", "--group_prompts=1",
             "--max_new_tokens=8", "--n_eval=3", "--eval_samples=2", "--device=cpu", "--max_iters=1")
    assert seen == [world.prompts("eval")[:3] * 2]


def test_main_logs_the_kl_in_nats_per_answer(tmp_path, monkeypatch):
    """The logged kl is the k1 KL summed over each answer's tokens and averaged over the answers (as ppo.py
    logs it), not a per-token mean: RLOO with scores stubbed to 0 and no end penalty pays R_i = -beta KL_i,
    so with beta 0.5 the log must read mean_i KL_i = -mean_i R_i / 0.5 (answers of several tokens here)."""
    make_stage_checkpoints(tmp_path)
    calls = spy_on_main(monkeypatch)
    monkeypatch.setattr(grpo, "reward_scores", lambda rm, enc, convs, *a, **k: torch.zeros(len(convs)))
    move_the_reference(monkeypatch, calls)
    run_grpo_here(monkeypatch, tmp_path, "--baseline=rloo", "--beta=0.5", "--no_end_penalty=0.0")
    (rewards, _), _ = calls["rloo_advantages"][0]
    _, (_, (_, _, gen, _)) = calls["respond"][0]
    assert gen[:, 1:].sum(1).min() > 1 and rewards.abs().max() > 0.01  # per answer and per token differ
    row, = [json.loads(line) for line in open(tmp_path / "rloo.jsonl")]
    assert row["kl"] == pytest.approx((-rewards / 0.5).mean().item(), rel=1e-5)
