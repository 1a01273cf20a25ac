"""reward.py: Bradley-Terry, Plackett-Luce and the normalisation by hand, where the score is read, the ln 2
start, the normalised flag that later stages check, bad options, end-to-end runs."""
import contextlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import model as M
import runtime
import reward  # importing the stage must not collect or train anything
import rollout
from data import world
from data.chat import render_prompt, render_response
from rollout import best_of_n, by_length, reply_logprobs, respond, reward_scores, rm_score, score_rows
from data.readers import read_preferences
from data.tokenizer import END, SPECIALS, get_tokenizer, make_encoding, special_id, train_bpe
from conftest import run_here, setup_as, torchrun_launcher
from test_reliability import time_split  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTES = make_encoding(train_bpe("", 256 + len(SPECIALS)))  # no merges: one token per byte, specials 256..260
TINY = dict(block_size=64, vocab_size=BYTES.n_vocab, n_layer=2, n_head=2, n_embd=32)
PROMPT = [{"role": "user", "content": "Hi"}]


def trained_looking_rm():
    """A tiny reward model whose head is not zero, so every position has a different score."""
    torch.manual_seed(0)
    m = M.GPT(M.GPTConfig(**TINY, scalar_head=True)).eval()
    torch.nn.init.normal_(m.scalar_head.weight)
    return m


def test_bradley_terry_two_responses_by_hand():
    # -log sigmoid(d) = log(1 + e^-d).  Row 1: r_w - r_l = 1 -> 0.3132617.  Row 2: the model prefers the
    # labeler's loser, r_w - r_l = -2 -> log(1 + e^2) = 2.1269280.  The loss is the mean over pairs.
    r = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert reward.bradley_terry_loss(r).item() == pytest.approx((0.3132617 + 2.1269280) / 2, abs=1e-6)


def test_bradley_terry_four_responses_by_hand():
    # ranked best first; the model swaps #2 and #3. The 6 pairs (winner, loser) and r_w - r_l:
    #   (1,2) 3-1 = 2   (1,3) 3-2 = 1   (1,4) 3-0 = 3   (2,3) 1-2 = -1   (2,4) 1-0 = 1   (3,4) 2-0 = 2
    # log(1+e^-2) = 0.1269280, log(1+e^-1) = 0.3132617, log(1+e^-3) = 0.0485874, log(1+e^1) = 1.3132617
    r = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    expected = (2 * 0.1269280 + 2 * 0.3132617 + 0.0485874 + 1.3132617) / 6
    assert expected == pytest.approx(0.3737047, abs=1e-6)
    assert reward.bradley_terry_loss(r).item() == pytest.approx(expected, abs=1e-6)
    # each prompt's pairs average within the batch: a second, perfectly separated row adds ~0
    r2 = torch.tensor([[3.0, 1.0, 2.0, 0.0], [60.0, 40.0, 20.0, 0.0]])
    assert reward.bradley_terry_loss(r2).item() == pytest.approx(expected / 2, abs=1e-6)


def test_plackett_luce_by_hand_and_equal_to_bradley_terry_for_two():
    # r = (2, 1, 0) best first: choices "2 out of {2,1,0}" then "1 out of {1,0}", averaged over K-1 = 2:
    # ((log(e^2 + e + 1) - 2) + (log(e + 1) - 1)) / 2 = (0.4076060 + 0.3132617) / 2
    r = torch.tensor([[2.0, 1.0, 0.0]])
    assert reward.plackett_luce_loss(r).item() == pytest.approx((0.4076060 + 0.3132617) / 2, abs=1e-6)
    assert reward.plackett_luce_loss(torch.zeros(1, 3)).item() == pytest.approx(math.log(6) / 2, abs=1e-6)
    torch.manual_seed(0)
    r = torch.randn(7, 2) * 3
    torch.testing.assert_close(reward.plackett_luce_loss(r), reward.bradley_terry_loss(r))


def test_normalisation_gives_mean_0_std_1():
    # r = (1, 3, 5): mean 3, sample std sqrt((4 + 0 + 4) / 2) = 2 -> gain 1/2, bias -3/2
    gain, bias = reward.normalisation(torch.tensor([1.0, 3.0, 5.0]))
    assert (gain, bias) == (pytest.approx(0.5), pytest.approx(-1.5))
    torch.manual_seed(0)
    r = torch.randn(50, 8) * 7 + 40  # any scale and offset, (N, K) as reward.py hands it over
    gain, bias = reward.normalisation(r)
    z = gain * r + bias
    assert z.mean().item() == pytest.approx(0, abs=1e-5) and z.std().item() == pytest.approx(1, abs=1e-5)
    assert gain > 0  # the order of the answers is kept
    gain, bias = reward.normalisation(torch.full((4,), 2.0))  # a constant reward: finite, maps to 0
    assert math.isfinite(gain) and gain * 2.0 + bias == pytest.approx(0)


def test_score_is_read_at_the_end_of_turn():
    rm = trained_looking_rm()
    end = special_id(BYTES, END)
    a = render_response(BYTES, PROMPT, "Hello there!", True, 64)[0]
    b = render_response(BYTES, PROMPT, "Yo", True, 64)[0]
    cut = render_response(BYTES, PROMPT, "Yo", False, 64)[0]  # never ended its turn: no <|end|>, read at "o"
    assert a[-1] == end and b[-1] == end and cut == b[:-1]
    ids, attn = M.pad_rows([a, b, cut], 0)  # right padding
    s = rm_score(rm, ids, attn)
    with torch.no_grad():
        alone = [rm(torch.tensor([row]), return_values=True)[2][0, -1].item()  # the head at the last token
                 for row in (a, b, cut)]
    torch.testing.assert_close(s, torch.tensor(alone), atol=1e-5, rtol=0)
    # whatever sits after <|end|> (padding of any id, or tokens past the turn) changes nothing
    junk = ids.clone()
    junk[attn == 0] = 77
    torch.testing.assert_close(rm_score(rm, junk, attn), s, atol=1e-5, rtol=0)
    longer = torch.cat([ids, torch.full((3, 5), 65)], 1)
    longer_attn = torch.cat([attn, torch.zeros(3, 5, dtype=attn.dtype)], 1)
    torch.testing.assert_close(rm_score(rm, longer, longer_attn), s, atol=1e-5, rtol=0)
    # left padding, as generate() returns its rows, reads each row at the same token
    left_ids, left_attn = M.pad_rows([a, b, cut], 0, left=True)
    torch.testing.assert_close(rm_score(rm, left_ids, left_attn), s, atol=1e-5, rtol=0)
    # ...while the ending does: the unfinished answer's score differs from the finished one's
    assert abs(s[1] - s[2]) > 1e-4
    # data.chat.reward_scores renders the same rows and applies the normalisation gain * r + bias
    replies = [{"text": "Hello there!", "ended": True}, {"text": "Yo", "ended": True},
               {"text": "Yo", "ended": False}]
    scores = reward_scores(rm, BYTES, [PROMPT] * 3, replies, gain=2.0, bias=-1.0, batch_size=2)
    torch.testing.assert_close(scores, 2.0 * s - 1.0, atol=1e-5, rtol=0)


def test_fresh_head_from_sft_starts_at_ln2():
    torch.manual_seed(0)
    sft = M.GPT(M.GPTConfig(**TINY))
    rm = runtime.model_from_checkpoint({"model": sft.state_dict(), "model_args": TINY}, scalar_head=True,
                                       dropout=0.0)
    for k in sft.state_dict():  # the trunk is SFT's
        assert torch.equal(rm.state_dict()[k], sft.state_dict()[k])
    rows = [render_response(BYTES, PROMPT, t, e, 64)[0]
            for t, e in (("a", True), ("bb", True), ("ccc", False), ("d", True))]
    ids, attn = M.pad_rows(rows, 0)
    r = rm_score(rm, ids, attn).view(1, 4)
    assert torch.all(r == 0)
    assert reward.bradley_terry_loss(r).item() == pytest.approx(math.log(2), abs=1e-7)
    assert reward.plackett_luce_loss(r[:, :2]).item() == pytest.approx(math.log(2), abs=1e-7)
    reward.bradley_terry_loss(r).backward()
    assert rm.scalar_head.weight.grad.abs().sum() > 0  # and it can learn from there


def test_load_reward_model_refuses_an_unnormalised_checkpoint(tmp_path):
    rm = trained_looking_rm()
    base = {"model": rm.state_dict(), "model_args": {**TINY, "scalar_head": True}, "kind": "reward",
            "step": 1, "gain": 1.0, "bias": 0.0}
    for name, extra in (("mid", {"normalised": False}), ("final", {"normalised": True}), ("old", {})):
        runtime.save_checkpoint(str(tmp_path / f"{name}.pt"), {**base, **extra})
    with pytest.raises(SystemExit, match=r"mid\.pt .*not normalised") as e:
        runtime.load_reward_model(str(tmp_path / "mid.pt"), "cpu")
    assert str(e.value).endswith(f"finish it with `python reward.py --resume=True --out_dir={tmp_path}`")
    for name in ("final", "old"):  # a checkpoint without the key predates it: accepted
        m, ck = runtime.load_reward_model(str(tmp_path / f"{name}.pt"), "cpu")
        assert not m.training and not any(p.requires_grad for p in m.parameters()) and ck["step"] == 1


def test_pairwise_accuracy_and_calibration():
    r = torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0]])
    target = torch.tensor([[3.0, 2.0, 1.0], [5.0, 5.0, 4.0]])  # row 2's first pair is a tie: skipped
    # row 1: (1,2) right, (1,3) right, (2,3) wrong; row 2: (1,3) right, (2,3) right -> 4 of 5
    assert reward.pairwise_accuracy(r, target) == pytest.approx(4 / 5)
    assert reward.pairwise_accuracy(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])) == 0.5  # r ties count half
    rows = reward.calibration(torch.tensor([[0.0, -3.0], [0.0, 3.0]]))  # sigmoid(3) = 0.95, half right
    assert rows == [(0.9, 1.0, 2, pytest.approx(1 / (1 + math.exp(-3))), 0.5)]
    # identical answers score alike: predicted 1/2, and half right (not wrong)
    assert reward.calibration(torch.tensor([[1.0, 1.0]])) == [(0.5, 0.6, 1, 0.5, 0.5)]
    # a confident pair: sigmoid(40) is 1.0 in fp32, the last bin's upper edge, and still counted
    assert reward.calibration(torch.tensor([[0.0, -40.0]])) == [(0.9, 1.0, 1, 1.0, 1.0)]


def test_accuracy_by_part_files_each_pair_under_its_largest_weighted_difference():
    prompt = [{"role": "user", "content": "Describe the fox."}]
    answers = ["The fox is happy. The fox runs in the forest.",  # ideal
               "The owl is happy. The owl runs in the forest.",  # off-topic: less helpful than the ideal
               "The fox is happy. The fox runs in the forest. You are dumb."]  # rude, and a sentence too many
    parts = [[world.gold_components(prompt, a) for a in answers]]
    golds = torch.tensor([[world.gold(prompt, a) for a in answers]])
    # r scores the off-topic answer highest: (ideal, rude) right, both pairs with the off-topic answer wrong.
    # Filing: ideal vs off-topic differ in helpful only (0.5); ideal vs rude in harmless 0.2 * 2 = 0.4 and
    # concise 0.15 * 0.5; off-topic vs rude in helpful 0.5 > harmless 0.4 (gold 0.5 < 0.525: rude is better)
    r = torch.tensor([[1.0, 2.0, 0.0]])
    got = reward.accuracy_by_part(r, golds, parts)
    assert got == {"helpful": (0.0, 2), "harmless": (1.0, 1)}
    # r ties ideal and off-topic: that helpful pair counts half, off-topic vs rude stays wrong -> 1/4
    got = reward.accuracy_by_part(torch.tensor([[1.0, 1.0, 0.0]]), golds, parts)
    assert got == {"helpful": (0.25, 2), "harmless": (1.0, 1)}


def test_rewards_add_the_weighted_likelihood_to_the_head():
    """--lm_feature: r = head + w * log p_SFT. A fresh reward model's head is zero, so r = w * lp exactly:
    with w = 0.5, lp = -2 gives -1, lp = -4 gives -2, lp = 0 gives 0 and lp = -1 gives -0.5 (ranked order
    kept); w = 0 is the head alone, 0 everywhere."""
    torch.manual_seed(0)
    rm = M.GPT(M.GPTConfig(**TINY, scalar_head=True))
    rows = [[[1, 2, 3], [4, 5]], [[6], [7, 8, 9, 10]]]  # two comparisons of K = 2 token rows
    lp = torch.tensor([[-2.0, -4.0], [0.0, -1.0]])
    ctx = contextlib.nullcontext()
    assert reward.rewards(rm, rows, lp, 0.5, 0, ctx).tolist() == [[-1.0, -2.0], [0.0, -0.5]]
    assert reward.rewards(rm, rows, lp, 0.0, 0, ctx).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    rm = trained_looking_rm()  # a head that is not zero: the sum, in the rows' order
    head = score_rows(rm, [r for rs in rows for r in rs], 0).view(2, 2)
    torch.testing.assert_close(reward.rewards(rm, rows, lp, 0.5, 0, ctx), head + 0.5 * lp)


def test_yardsticks_are_in_ranked_order_and_the_second_labeler_scores_best_highest():
    """Answers with gold 0.75 (half the description), 0.5 (off topic), 1.0 (ideal), ranked [2, 0, 1]: gold
    and parts come in ranked order, (1.0, 0.75, 0.5), not the file's (0.75, 0.5, 1.0). A second labeler with
    tau = 1e-6 ranks by gold, [2, 0, 1] again, and scores K - position = 3, 2, 1: best highest, in the first
    labeler's ranked order, so the two agree on every pair (inverted scores would agree on none)."""
    prompt = [{"role": "user", "content": "Describe the fox."}]
    responses = ["The fox is happy.", "The owl is happy.", "The fox is happy. The fox runs in the forest."]
    comp = {"prompt": prompt, "responses": responses, "ended": [True] * 3, "ranking": [2, 0, 1]}
    other = {**comp, "ranking": [0, 1, 2]}  # the first labeler's noise: a ranking unlike gold's
    gold, parts, second = reward.yardsticks([other, comp], [1], seed=0, tau=1e-6)
    torch.testing.assert_close(gold, torch.tensor([[0.75, 0.5, 1.0], [1.0, 0.75, 0.5]]))
    assert parts[1][0] == world.gold_components(prompt, responses[2]) and parts[1][2]["helpful"] == 0.0
    assert second.tolist() == [[3.0, 2.0, 1.0]]  # the held-out comparison only
    gold, parts, second = reward.yardsticks([other, comp], [0, 1], seed=0, tau=1e-6)
    assert second.tolist() == [[2.0, 1.0, 3.0], [3.0, 2.0, 1.0]]  # ranked [0, 1, 2]: the best, 2, scores 3
    first = torch.tensor([[3.0, 2.0, 1.0]])  # the first labeler's ranked order, best first
    assert reward.pairwise_accuracy(second[1:], first) == 1.0  # agrees on all 3 pairs
    assert reward.pairwise_accuracy(second[:1], first) == pytest.approx(1 / 3)  # only on (0, 1) of [0, 1, 2]


def test_the_second_labeler_draws_its_own_noise():
    """The ceiling "two labelers agree" needs two independent labelers: over 50 rankings of three answers of
    gold 1, 0.75 and 0.5 at tau 0.25 they disagree on some pairs. A second labeler drawing the first's
    random stream would copy its rankings and agree on every pair."""
    prompt = [{"role": "user", "content": "Describe the fox."}]
    responses = ["The fox is happy. The fox runs in the forest.", "The fox is happy.", "The owl is happy."]
    comps = [{"prompt": prompt, "responses": responses, "ended": [True] * 3,
              "ranking": world.rank(prompt, responses, random.Random(f"labeler-0-{i}"), tau=0.25)}
             for i in range(50)]  # as collect_comparisons draws the first labeler
    _, _, second = reward.yardsticks(comps, range(50), seed=0, tau=0.25)
    first = torch.arange(3, 0, -1.0).expand(50, 3)
    assert 0.5 < reward.pairwise_accuracy(second, first) < 0.95


def test_get_batch_gives_each_rank_its_own_prompts():
    """Under torchrun step s of rank r takes slot s * world_size + r of the epoch's permutation: over one
    epoch of 8 prompts, 2 ranks x 2 steps x 2 prompts see every prompt once (no rank repeats another's)."""
    rows = [[[i + 1], [i + 2]] for i in range(8)]
    lp = torch.arange(16.0).view(8, 2)
    seen = []
    for rank in (0, 1):
        rt = SimpleNamespace(world_size=2, rank=rank, device="cpu")
        for step in (0, 1):
            _, _, lp_b = reward.get_batch(step, list(range(8)), rows, lp, 2, 2, 1337, rt, 0)
            seen += (lp_b[:, 0] / 2).long().tolist()
    assert sorted(seen) == list(range(8))


def test_an_epoch_of_a_count_no_step_divides_sees_each_ranking_at_most_once():
    """11 rankings, 2 ranks x 2 per step: an epoch is 2 whole steps (8 rankings), the 3 left over dropped; the
    next epoch draws a fresh permutation. With fewer rankings than one step takes, the one step still runs."""
    rows = [[[i + 1], [i + 2]] for i in range(11)]
    lp = torch.arange(22.0).view(11, 2)
    steps = max(1, 11 // (2 * 2))  # as main() counts them
    assert steps == 2
    for epoch in (0, 1):
        seen = []
        for step in range(epoch * steps, (epoch + 1) * steps):
            for rank in (0, 1):
                rt = SimpleNamespace(world_size=2, rank=rank, device="cpu")
                _, _, lp_b = reward.get_batch(step, list(range(11)), rows, lp, 2, steps, 1337, rt, 0)
                seen += (lp_b[:, 0] / 2).long().tolist()
        assert len(seen) == len(set(seen)) == 8, seen  # none twice in the epoch
    rt = SimpleNamespace(world_size=1, rank=0, device="cpu")
    _, _, lp_b = reward.get_batch(0, [0, 1, 2], rows, lp, 4, 1, 1337, rt, 0)  # 3 rankings, a batch of 4
    assert sorted(set((lp_b[:, 0] / 2).long().tolist())) == [0, 1, 2]


def ranked_file(out, animals, flip=()):
    """comparisons.jsonl in out: one ranking of two answers per animal, the better one first unless in flip
    (then stored second, with ranking [1, 0])."""
    rows = []
    for a in animals:
        step = -1 if a in flip else 1
        rows.append({"prompt": [{"role": "user", "content": f"Describe the {a}."}],
                     "responses": [f"The {a} is red.", "You are dumb."][::step],
                     "ended": [True, False][::step], "ranking": [0, 1][::step]})
    (out / "comparisons.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.mark.parametrize("batch_size, world_size, steps", [(4, 1, 2), (16, 1, 1), (4, 2, 1)])
def test_main_counts_an_epoch_in_whole_steps_and_at_least_one(tiny_sft, monkeypatch, capsys, batch_size,
                                                              world_size, steps):
    """11 rankings, 1 held out (val_fraction 0.1 of 11 prompts): 10 to train on. At batch 4 an epoch is
    10 // 4 = 2 whole steps (a third would wrap into rankings already seen); at batch 16, more than there
    are, it is still 1 step, not 0; under torchrun a step takes batch_size from each process, so with 2 (rank
    0 of a stand-in pair here) it is 10 // 8 = 1."""
    ranked_file(tiny_sft, world.ANIMALS[:11])
    calls, real = [], reward.get_batch
    monkeypatch.setattr(reward, "get_batch", lambda it, train_idx, rows, lp, bs, spe, *a: calls.append(
        (it, len(train_idx), bs, spe)) or real(it, train_idx, rows, lp, bs, spe, *a))
    setup_as(monkeypatch, world_size=world_size)
    run_here(monkeypatch, reward, f"--out_dir={tiny_sft}", "--collect=False", f"--batch_size={batch_size}",
             "--eval_interval=50", "--device=cpu")
    assert (f"10 train / 1 held-out rankings of 2 answers; {steps} steps of {batch_size * world_size} "
            "rankings") in capsys.readouterr().out
    assert calls == [(it, 10, batch_size, steps) for it in range(steps)]


def test_a_small_file_whose_epoch_ends_inside_the_warmup_is_warned_of_and_a_set_max_iters_is_not(
        tiny_sft, monkeypatch, capsys):
    """11 rankings, 10 to train on at batch 4: 2 steps, under the default warmup of 10 (the lr would reach
    2/11 of --lr unseen); --max_iters=2 is the user's own count, not the data's: no warning. The count is the
    whole run's (3 epochs: 6 steps; 6 epochs: 12, past the warmup), said once, by rank 0."""
    ranked_file(tiny_sft, world.ANIMALS[:11])
    flags = (f"--out_dir={tiny_sft}", "--collect=False", "--batch_size=4", "--device=cpu")
    run_here(monkeypatch, reward, *flags)
    assert "warning: 2 steps, not more than --warmup_iters=10: the lr rises to 18% of --lr" in \
        capsys.readouterr().err
    run_here(monkeypatch, reward, *flags, "--epochs=3")
    assert "warning: 6 steps, not more than --warmup_iters=10: the lr rises to 55% of --lr" in \
        capsys.readouterr().err
    for extra in (("--epochs=1", "--max_iters=2"), ("--max_iters=0", "--epochs=6")):  # (options stay set)
        run_here(monkeypatch, reward, *flags, *extra)
        assert "warning" not in capsys.readouterr().err
    setup_as(monkeypatch, master=False)  # another rank: rank 0 says it
    run_here(monkeypatch, reward, *flags, "--epochs=1")
    assert "warning" not in capsys.readouterr().err


def test_main_trains_on_each_rankings_own_answers_best_first(tiny_sft, monkeypatch):
    """The loss wants each comparison's K answers in ranked order, best first: rows[n] holds comparison n's
    answers as ranking lists them (a file may store the better answer second, ranking [1, 0]), each rendered
    with its own ended flag, and no other comparison's."""
    comps = ranked_file(tiny_sft, world.ANIMALS[:6], flip=world.ANIMALS[1:6:2])
    seen, real = [], reward.get_batch
    monkeypatch.setattr(reward, "get_batch", lambda it, train_idx, rows, *a: seen.append(rows)
                        or real(it, train_idx, rows, *a))
    run_here(monkeypatch, reward, f"--out_dir={tiny_sft}", "--collect=False", "--batch_size=2",
             "--max_iters=1", "--device=cpu")
    enc, block = get_tokenizer("world"), 128
    rows, = seen
    assert rows == [[render_response(enc, c["prompt"], c["responses"][k], c["ended"][k], block)[0]
                     for k in c["ranking"]] for c in comps]
    for c, (best, worst) in zip(comps, rows):  # the red answer, which ended its turn, always first
        assert enc.decode(best).endswith(c["prompt"][0]["content"][13:-1] + " is red." + END)
        assert enc.decode(worst).endswith("You are dumb.")


def test_get_batch_pads_on_the_right_so_the_score_is_read_at_each_answers_end():
    """The training batch puts each row's tokens first, then padding. Each row scored in the batch is the head
    at its own <|end|>, as scored alone."""
    rm = trained_looking_rm()
    answers = [("Hello there!", "Yo"), ("A much longer answer", "B")]
    rows = [[render_response(BYTES, PROMPT, t, True, 64)[0] for t in pair] for pair in answers]
    rt = SimpleNamespace(world_size=1, rank=0, device="cpu")
    ids, attn, _ = reward.get_batch(0, [0, 1], rows, torch.zeros(2, 2), 2, 1, 0, rt, 0)
    n = attn.sum(1).tolist()
    assert all(attn[i, :k].all() for i, k in enumerate(n))  # the real tokens come first, the padding after
    flat = [ids[i, :k].tolist() for i, k in enumerate(n)]
    assert sorted(flat) == sorted(r for rs in rows for r in rs)  # every answer, whole
    with torch.no_grad():
        alone = [rm(torch.tensor([r]), return_values=True)[2][0, -1].item() for r in flat]
    torch.testing.assert_close(rm_score(rm, ids, attn), torch.tensor(alone), atol=1e-5, rtol=0)


def test_main_normalises_what_it_saves_and_scores_labelers_best_highest(tiny_sft, monkeypatch):
    """main()'s wiring, which the unit tests above cannot see: under --lm_feature the normalisation is fitted
    to head + w * log p_SFT with the learned w it saves (not to the head alone), and the report and the
    training accuracy read the labeler's ranking as scores, best highest."""
    seen, real = {}, (reward.rewards, reward.normalisation, reward.report)

    def rewards(*a):
        seen["rewards"] = (a[3], real[0](*a))
        return seen["rewards"][1]

    monkeypatch.setattr(reward, "rewards", rewards)
    monkeypatch.setattr(reward, "normalisation", lambda r: seen.update(normalised=r) or real[1](r))
    monkeypatch.setattr(reward, "report", lambda *a: seen.update(first=a[8]) or real[2](*a))
    run_here(monkeypatch, reward, f"--out_dir={tiny_sft}", "--max_new_tokens=4", "--batch_size=4",
             "--max_iters=3", "--eval_interval=2", "--n_prompts=40", "--K=3", "--lm_feature=True",
             "--device=cpu")
    w, r = seen["rewards"]
    assert seen["normalised"] is r and w == torch.load(tiny_sft / "reward.pt")["lm_weight"] != 0.0
    assert seen["first"].size(1) == 3 and (seen["first"][:, :-1] > seen["first"][:, 1:]).all()


def test_best_of_n_keeps_the_highest_score():
    rm = trained_looking_rm()
    torch.manual_seed(1)
    policy = M.GPT(M.GPTConfig(**TINY)).eval()
    g = torch.Generator().manual_seed(0)
    convs = [PROMPT, PROMPT + [{"role": "assistant", "content": "x"}, PROMPT[0]]]
    picks = best_of_n(policy, rm, BYTES, convs, 5, max_new_tokens=6, generator=g, batch_size=4)
    assert len(picks) == 2
    for p in picks:
        assert len(p["candidates"]) == 5 and p["score"] == max(c["score"] for c in p["candidates"])


def test_best_of_n_samples_at_its_temperature():
    """At temperature 0 every candidate is the one greedy answer (and the seed cannot matter); at the default
    temperature 1 the candidates differ."""
    rm = trained_looking_rm()
    torch.manual_seed(1)
    policy = M.GPT(M.GPTConfig(**TINY)).eval()
    for seed in (0, 1):
        pick, = best_of_n(policy, rm, BYTES, [PROMPT], 4, max_new_tokens=6, temperature=0,
                          generator=torch.Generator().manual_seed(seed))
        assert len({c["text"] for c in pick["candidates"]}) == 1
    g = torch.Generator().manual_seed(0)
    pick, = best_of_n(policy, rm, BYTES, [PROMPT], 4, max_new_tokens=6, generator=g)
    assert len({c["text"] for c in pick["candidates"]}) > 1


def test_by_length_batches_every_row_once_shortest_first():
    rows = [[1, 2, 3], [1], [1, 2], [4, 5, 6, 7], [9]]
    assert by_length(rows, 2) == [[1, 4], [2, 0], [3]]  # ties keep their order; the last batch is short
    assert by_length(rows, 10) == [[1, 4, 2, 0, 3]] and by_length([], 3) == []


def test_reply_logprobs_by_hand():
    torch.manual_seed(2)
    sft = M.GPT(M.GPTConfig(**TINY)).eval()
    replies = [{"text": "ab", "ended": True}, {"text": "ab", "ended": False},
               {"text": "hello", "ended": True}]
    got = reply_logprobs(sft, BYTES, [PROMPT] * 3, replies, batch_size=2)  # two batches, the second shorter
    for r, lp in zip(replies, got):
        ids, mask = render_response(BYTES, PROMPT, r["text"])  # prompt + reply + <|end|>; mask on reply + end
        n = len(ids) - (0 if r["ended"] else 1)  # a reply that was cut off never produced <|end|>
        logp = torch.log_softmax(sft(torch.tensor([ids[:n]]))[0][0], -1)
        want = sum(logp[t - 1, ids[t]].item() for t in range(n) if mask[t])
        assert lp.item() == pytest.approx(want, abs=1e-4)
    assert got[0] < got[1]  # the ended reply pays for its <|end|> token too


def test_reward_scores_add_the_weighted_likelihood():
    rm = trained_looking_rm()
    torch.manual_seed(3)
    sft = M.GPT(M.GPTConfig(**TINY)).eval()
    replies = [{"text": "ab", "ended": True}, {"text": "xyz", "ended": False}]
    head = reward_scores(rm, BYTES, [PROMPT] * 2, replies, gain=2.0, bias=1.0)
    both = reward_scores(rm, BYTES, [PROMPT] * 2, replies, gain=2.0, bias=1.0, lm_weight=0.5, sft=sft)
    assert torch.allclose(both, head + 2.0 * 0.5 * reply_logprobs(sft, BYTES, [PROMPT] * 2, replies))


def test_sampled_logprob_and_best_of_n_with_the_likelihood_term():
    rm = trained_looking_rm()
    torch.manual_seed(4)
    sft = M.GPT(M.GPTConfig(**TINY)).eval()
    head_out = torch.nn.Linear(TINY["n_embd"], BYTES.n_vocab)  # an output layer that often says <|end|>
    head_out.weight.data.copy_(sft.lm_head.weight.data)
    head_out.bias.data.zero_()[special_id(BYTES, END)] = 2.5
    sft.lm_head = head_out
    replies = respond(sft, BYTES, [PROMPT] * 6, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert {r["ended"] for r in replies} == {True, False}  # both kinds of reply are checked
    prompt = render_prompt(BYTES, PROMPT)
    other_stops = {special_id(BYTES, s) for s in SPECIALS} - {special_id(BYTES, END)}
    for r in replies:  # logprob: the reply's own sampled tokens and its <|end|>, not another stop (a role
        logp = torch.log_softmax(sft(torch.tensor([prompt + r["ids"]]))[0][0], -1)  # marker), full forward
        counted = len(r["ids"]) - (bool(r["ids"]) and r["ids"][-1] in other_stops)
        want = sum(logp[len(prompt) + k - 1, r["ids"][k]].item() for k in range(counted))
        assert r["logprob"] == pytest.approx(want, abs=1e-4)
    # best-of-n adds gain * lm_weight * log p_SFT(reply text) to the head's score: the likelihood term is
    # computed one way everywhere, reply_logprobs on the re-encoded text (as reward.py trains it), not the
    # sampled logprob
    picks = best_of_n(sft, rm, BYTES, [PROMPT], 6, gain=2.0, bias=1.0, max_new_tokens=5, lm_weight=0.3,
                      generator=torch.Generator().manual_seed(0))
    cands = picks[0]["candidates"]
    head = reward_scores(rm, BYTES, [PROMPT] * 6, cands, gain=2.0, bias=1.0)
    got = torch.tensor([c["score"] for c in cands])
    lm = reply_logprobs(sft, BYTES, [PROMPT] * 6, cands)
    assert torch.allclose(got, head + 2.0 * 0.3 * lm, atol=1e-5)


# ---- end to end with a tiny random "SFT" model on the world's prompts


def run(out, *args, launcher=(sys.executable,), ok=True):
    r = subprocess.run([*launcher, "reward.py", f"--out_dir={out}", "--max_new_tokens=4", "--batch_size=4",
                        "--max_iters=3", "--eval_interval=2", "--n_prompts=40", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (r.returncode == 0) == ok, r.stdout[-2000:] + r.stderr[-2000:]
    return r


@pytest.fixture
def tiny_sft(tmp_path):
    enc = get_tokenizer("world")
    args = dict(block_size=128, vocab_size=enc.n_vocab, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    torch.manual_seed(0)
    runtime.save_checkpoint(str(tmp_path / "sft.pt"), {
        "model": M.GPT(M.GPTConfig(**args)).state_dict(), "model_args": args, "config": {}, "kind": "sft",
        "step": 0, "tokenizer": "world"})
    return tmp_path


def test_end_to_end_collect_train_bon_and_reuse(tiny_sft):
    out = tiny_sft
    r = run(out, "--K=3", "--bon=2")
    assert "normalised as" in r.stdout and "log p_SFT" not in r.stdout  # the head alone
    phases = time_split(r.stdout, "reward")
    assert {"sampling", "hidden human", "training", "scoring all & report"} <= set(phases)
    full = r.stdout
    comps = [json.loads(line) for line in open(out / "comparisons.jsonl")]
    prompts = world.prompts("train")[:40]
    assert [c["prompt"] for c in comps] == prompts
    for c in comps:
        assert len(c["responses"]) == len(c["ended"]) == 3 and sorted(c["ranking"]) == [0, 1, 2]
        assert c["chosen"] == c["responses"][c["ranking"][0]]
        assert c["rejected"] == c["responses"][c["ranking"][-1]]
    assert len(read_preferences(str(out / "comparisons.jsonl"))) == len(prompts)  # the TRL view reads as is
    ck = torch.load(out / "reward.pt", weights_only=True)
    assert ck["kind"] == "reward" and ck["K"] == 3 and ck["loss"] == "bradley_terry" and ck["step"] == 3
    assert ck["model_args"]["scalar_head"] and ck["gain"] > 0 and "bon_win_rate" in ck["metrics"]
    # the default is InstructGPT's reward model: the head alone, no likelihood term, normalised
    assert ck["lm_weight"] == 0.0 and ck["normalised"] is True
    # the by-component report covers every pair with distinct gold once: held-out plus training prompts
    distinct = 0
    for c in comps:
        g = [world.gold(c["prompt"], t, e) for t, e in zip(c["responses"], c["ended"])]
        distinct += sum(abs(a - b) > 1e-9 for i, a in enumerate(g) for b in g[i + 1:])
    counted = [n for part in ("acc_gold_by_part", "acc_gold_by_part_train")
               for _, n in ck["metrics"][part].values()]
    assert sum(counted) == distinct > 0
    log = [json.loads(line) for line in open(out / "reward.jsonl")]
    assert [r["iter"] for r in log] == [1, 2, 3] and len({tuple(r) for r in log}) == 1  # same keys every step
    # held-out metrics at the evaluation step only (a random model's held-out answers may all tie in gold:
    # val_acc_gold is then null, where it was NaN, which strict JSON readers refuse)
    assert log[1]["val_loss"] is not None and log[1]["val_acc"] is not None and log[0]["val_loss"] is None
    assert "NaN" not in open(out / "reward.jsonl").read()
    # reuse the comparisons with the other loss; then best-of-n from the saved model without training
    before = open(out / "comparisons.jsonl").read()
    run(out, "--collect=False", "--loss=plackett_luce")
    assert open(out / "comparisons.jsonl").read() == before
    assert torch.load(out / "reward.pt", weights_only=True)["loss"] == "plackett_luce"
    # --n_train: the first n training rankings only, measured on the same held-out rankings (the curve's runs)
    part = run(out, "--collect=False", "--n_train=10").stdout
    assert "36 train / 4 held-out" in full and "10 train / 4 held-out" in part
    def held_out_shown(stdout):  # the report's held-out examples: the prompts printed after "normalised as"
        lines = stdout[stdout.index("normalised as"):].splitlines()[1:]
        return [line for line in lines if line.startswith("  ") and not line.startswith("   ")][:3]
    assert held_out_shown(part) == held_out_shown(full) and len(held_out_shown(full)) == 3
    r = run(out, "--train=False", "--bon=2")
    assert "best-of-2" in r.stdout
    # --lm_feature=True (a departure): the weight of log p_SFT is learned from 0 along with the head, saved,
    # and used by best-of-n
    r = run(out, "--collect=False", "--lm_feature=True", "--bon=2")
    assert torch.load(out / "reward.pt", weights_only=True)["lm_weight"] != 0.0
    assert "log p_SFT" in r.stdout and "best-of-2" in r.stdout


def test_preference_file_and_bad_input(tiny_sft, tmp_path):
    out = tiny_sft
    good = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"Describe the {a}.", "chosen": f"The {a} is kind.", "rejected": "You are dumb."}
            for a in world.ANIMALS]
    rows[0]["chosen"] = "The fox is kind. " * 40  # longer than the 128-token context: kept, cut, and said
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (f"warning: {good}: 1 of {2 * len(rows)} answers with their prompts are longer than "
            "block_size=128 tokens") in run(out, f"--data={good}").stdout
    ck = torch.load(out / "reward.pt", weights_only=True)
    assert ck["K"] == 2 and not (out / "comparisons.jsonl").exists()  # nothing collected
    sft = torch.load(out / "sft.pt", weights_only=True)  # which SFT model it judges: the one it came from
    assert ck["sft_fingerprint"] == runtime.fingerprint(sft["model"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hi", "chosen": "a"}\n')
    r = run(out, f"--data={bad}", ok=False)
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {bad}:1:")
    assert torch.load(out / "reward.pt", weights_only=True)["K"] == 2  # the good model is still there
    # the non-finite guard: an absurd learning rate blows the weights up after one step; the next loss is NaN
    # and the stage stops in one line before anything is saved
    before = (out / "reward.pt").read_bytes()
    r = run(out, f"--data={good}", "--lr=1e30", "--warmup_iters=0", ok=False)
    last = r.stderr.strip().splitlines()[-1]
    assert re.match(r"error: reward step \d: (loss|grad_norm) is (nan|inf)", last), r.stderr
    assert "try a lower --lr" in r.stderr and (out / "reward.pt").read_bytes() == before


@pytest.mark.parametrize("flag, message", [
    ("--loss=hinge", "error: --loss='hinge' is out of range: it must be one of bradley_terry, plackett_luce"),
    ("--K=1", "error: --K=1 is out of range: it must be >= 2"),
    ("--contexts=1", "error: --contexts=1 is out of range: it must be >= 2"),
    ("--labeler_tau=0", "error: --labeler_tau=0.0 is out of range: it must be > 0"),
    ("--bon=-3", "error: --bon=-3 is out of range: it must be >= 0; > 0 with --train=False"),
    ("--train=False", "error: --bon=0 is out of range: it must be >= 0; > 0 with --train=False")])
def test_a_bad_option_is_one_line_before_anything_is_touched(tmp_path, refusal, flag, message):
    (tmp_path / "reward.jsonl").write_text("old log\n")
    got = refusal("reward", f"--out_dir={tmp_path}", flag)  # the checks come before any model is loaded
    assert got.startswith(message) and "\n" not in got, got
    assert os.listdir(tmp_path) == ["reward.jsonl"] and (tmp_path / "reward.jsonl").read_text() == "old log\n"


def test_noise_free_labelers_rank_by_gold(tiny_sft):
    # --labeler_tau=1e-6: the Plackett-Luce labeler becomes the gold ordering (ties in any order). The tiny
    # model's answers mostly tie (gibberish), so the test also asks for rankings the order can get wrong
    run(tiny_sft, "--K=4", "--max_iters=1", "--labeler_tau=1e-6")
    golds = [[world.gold(c["prompt"], c["responses"][k], c["ended"][k]) for k in c["ranking"]]
             for c in map(json.loads, open(tiny_sft / "comparisons.jsonl"))]
    assert sum(max(g) - min(g) > 1e-9 for g in golds) >= 1  # not every ranking a tie: the check bites
    assert all(a >= b - 1e-9 for g in golds for a, b in zip(g, g[1:]))


@pytest.mark.parametrize("flags", [[], ["--lm_feature=True"]])
def test_resume_continues_with_the_same_losses(tiny_sft, tmp_path, flags):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        shutil.copy(tiny_sft / "sft.pt", d / "sft.pt")
    run(a, "--max_iters=6", "--eval_interval=3", *flags)
    run(b, "--max_iters=6", "--eval_interval=3", "--stop_at=3", *flags)  # as if killed after step 3's save
    mid = torch.load(b / "reward.pt", weights_only=True)
    assert mid["step"] == 3 and mid["normalised"] is False and (mid["gain"], mid["bias"]) == (1.0, 0.0)
    with pytest.raises(SystemExit, match="not normalised"):  # no later stage may score with it
        runtime.load_reward_model(str(b / "reward.pt"), "cpu")
    run(b, "--max_iters=6", "--eval_interval=3", "--resume=True", *flags)
    assert torch.load(b / "reward.pt", weights_only=True)["normalised"] is True
    full, resumed = ([json.loads(line) for line in open(d / "reward.jsonl")] for d in (a, b))
    assert [r["iter"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(full, resumed):  # same comparisons, batches, dropout masks, optimizer state: same losses
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6), (x, y)
    assert full[-1]["val_loss"] == pytest.approx(resumed[-1]["val_loss"], abs=1e-6)


def test_torchrun_two_processes_share_the_collection(tiny_sft):
    run(tiny_sft, "--K=2", "--device=cpu", launcher=torchrun_launcher())
    comps = [json.loads(line) for line in open(tiny_sft / "comparisons.jsonl")]
    assert [c["prompt"] for c in comps] == world.prompts("train")[:40]  # both ranks' shares, in prompt order
    assert torch.load(tiny_sft / "reward.pt", weights_only=True)["step"] == 3


def test_held_out_split_keeps_all_comparisons_of_a_prompt_on_one_side():
    # a preference file may hold several pairs of one prompt: splitting by comparison would train on some of
    # a prompt's pairs and measure on the others. 7 distinct prompts, 16 comparisons; 3 of 7 held out
    names = list("aabbbcdddeffggga")
    prompts = [[{"role": "user", "content": n}] for n in names]
    for seed in range(20):
        val, train = reward.held_out_split(prompts, 0.4, 0, seed)
        assert sorted(val + train) == list(range(16))  # every comparison once
        held = {names[i] for i in val}
        assert held.isdisjoint(names[i] for i in train) and len(held) == round(0.4 * 7)
        assert val == sorted(val) and (val, train) == reward.held_out_split(prompts, 0.4, 0, seed)
    assert len({tuple(reward.held_out_split(prompts, 0.4, 0, s)[0]) for s in range(20)}) > 1  # seeded
    # distinct prompts: a seeded share of the comparisons, at least one; --n_train: the first n of the rest
    distinct = [[{"role": "user", "content": str(i)}] for i in range(40)]
    val, train = reward.held_out_split(distinct, 0.1, 0, 3)
    assert len(val) == 4 and len(train) == 36
    assert reward.held_out_split(distinct, 0.1, 10, 3) == (val, train[:10])
    assert reward.held_out_split(prompts[:1], 0.0, 0, 1) == ([0], [])  # one prompt: held out, none to train


def test_a_file_with_nothing_left_to_train_on_is_one_line(tiny_sft, tmp_path, refusal):
    one = tmp_path / "one.jsonl"  # one pair: all held out (training divided by zero, or trained nothing)
    one.write_text(json.dumps({"prompt": "Describe the fox.", "chosen": "The fox is red.",
                               "rejected": "You are dumb."}) + "\n")
    for flags in ([], ["--max_iters=3"]):
        got = refusal("reward", f"--out_dir={tiny_sft}", f"--data={one}", *flags)
        assert got == f"error: {one}: nothing left to train on after holding out 1", got
        assert sorted(os.listdir(tiny_sft)) == ["one.jsonl", "sft.pt"]  # no reward.pt, no log


def test_data_in_the_comparisons_format_keeps_its_whole_rankings_and_endings(tmp_path):
    """--data=<a comparisons.jsonl> kept only best against worst and called every answer ended: K answers
    ranked are K(K-1)/2 pairs, and an answer cut off must not be credited with stopping."""
    path = tmp_path / "mine.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"Describe the {a}."}], "ranking": [2, 0, 1],
             "responses": [f"The {a} is kind.", "No.", "You are dumb and"], "ended": [True, True, False],
             "chosen": f"The {a} is kind.", "rejected": "No."} for a in world.ANIMALS[:3]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    comps = reward.file_comparisons(str(path), str(tmp_path / "unused.jsonl"))
    assert [(c["responses"], c["ended"], c["ranking"]) for c in comps] == [
        (r["responses"], r["ended"], r["ranking"]) for r in rows]


def test_a_file_is_refused_only_when_no_comparison_carries_a_preference(tmp_path):
    """Some comparisons whose answers tie are kept beside one that differs; and the same text, once ended and
    once cut off, differs too (stopping is what is preferred)."""
    U = [{"role": "user", "content": "Describe the owl."}]
    rows = [{"prompt": U, "responses": ["The owl is red.", "The owl is red."], "ended": [True, True],
             "ranking": [0, 1]},
            {"prompt": U, "responses": ["The owl is red.", "The owl is red."], "ended": [True, False],
             "ranking": [0, 1]}]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert reward.file_comparisons(str(path), "") == rows
    path.write_text(json.dumps(rows[1]) + "\n")
    assert reward.file_comparisons(str(path), "") == rows[1:]
    path.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(SystemExit, match="no comparison carries a preference"):
        reward.file_comparisons(str(path), "")


def test_a_file_whose_answers_never_differ_is_one_line_before_training(tiny_sft, tmp_path, refusal):
    """Every pair chosen == rejected: the head stayed at zero, and the normalisation divided by a spread of
    zero into a reward model saved with a gain of a million."""
    same = tmp_path / "same.jsonl"
    same.write_text("".join(json.dumps({"prompt": f"Describe the {a}.", "chosen": "The fox is red.",
                                        "rejected": "The fox is red."}) + "\n" for a in world.ANIMALS))
    got = refusal("reward", f"--out_dir={tiny_sft}", f"--data={same}", "--max_iters=2")
    assert got == f"error: {same}: no comparison carries a preference (in each, every answer is the same)"
    assert sorted(os.listdir(tiny_sft)) == ["same.jsonl", "sft.pt"]


def test_prompts_with_no_room_for_a_reply_are_one_line_before_any_sampling(tiny_sft, tmp_path, refusal):
    """The world prompts reward.py will answer (its training pool; the held-out ones when --bon) must leave
    max_new_tokens of the model's 128: checked when the model is loaded, not minutes into collecting or after
    training. The longest world prompt is 38 tokens with the template, the longest held-out one 36."""
    enc = get_tokenizer("world")
    longest = max(len(render_prompt(enc, p)) for p in world.prompts("train")[:16])
    got = refusal("reward", f"--out_dir={tiny_sft}", "--n_prompts=16", f"--max_new_tokens={129 - longest}")
    assert got.startswith("error: a world prompt is ") and "have no room for --max_new_tokens=" in got, got
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"Describe the {a}.", "chosen": f"The {a} is red.",
                                         "rejected": "No."}) + "\n" for a in world.ANIMALS))
    got = refusal("reward", f"--out_dir={tiny_sft}", f"--data={prefs}", "--bon=2", "--max_new_tokens=93")
    assert got == ("error: a world prompt is 36 tokens with the chat template; the model's 128 have no room "
                   "for --max_new_tokens=93 more"), got
    assert sorted(os.listdir(tiny_sft)) == ["prefs.jsonl", "sft.pt"]  # nothing collected, trained or logged


def test_resume_from_another_network_is_one_line(tiny_sft, refusal):
    rows = [{"prompt": [{"role": "user", "content": f"Describe the {a}."}],
             "responses": [f"The {a} is red.", "You are dumb."], "ended": [True, True], "ranking": [0, 1]}
            for a in world.ANIMALS]
    rows[0]["responses"][0] = "The fox is red. " * 40  # longer than the context: said only once resuming
    (tiny_sft / "comparisons.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft_args = torch.load(tiny_sft / "sft.pt", weights_only=True)["model_args"]
    args = {**sft_args, "n_embd": 16, "scalar_head": True}  # a reward.pt left by another SFT model's run
    other = M.GPT(M.GPTConfig(**args))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    runtime.save_checkpoint(str(tiny_sft / "reward.pt"), {
        **runtime.training_state(other, torch.optim.AdamW(other.parameters()), scaler),
        "model_args": args, "config": {}, "kind": "reward", "step": 2, "normalised": False})
    got = refusal("reward", f"--out_dir={tiny_sft}", "--resume=True", "--max_iters=4")
    path = tiny_sft / "reward.pt"
    assert got == f"error: {path} is another network than the SFT model (n_embd 16 vs 32)", got
    sft = torch.load(tiny_sft / "sft.pt", weights_only=True)  # the same network, without what resume reads
    same = {**sft_args, "scalar_head": True}
    runtime.save_checkpoint(str(path), {"model": sft["model"], "model_args": same, "kind": "reward",
                                        "step": 2, "normalised": False})
    got = refusal("reward", f"--out_dir={tiny_sft}", "--resume=True", "--max_iters=4")
    assert got == (f"error: {path} has no optimizer, scaler, rng: not a complete checkpoint; start afresh "
                   "without --resume"), got


@pytest.mark.parametrize("flags", [["--data=BAD"], ["--collect=False"], ["--resume=True"]])
def test_a_bad_comparisons_file_is_one_line_before_a_missing_sft_model_is_built(tmp_path, refusal, flags):
    """The file is read first: on a fresh out_dir a bad --data (or a missing comparisons.jsonl) once stopped
    only after pretrain.py and sft.py had run for minutes and written their checkpoints."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hi", "chosen": "a"}\n')
    out = tmp_path / "out"
    out.mkdir()
    got = refusal("reward", f"--out_dir={out}", *[f.replace("BAD", str(bad)) for f in flags])
    missing = f"error: {out / 'comparisons.jsonl'} not found"  # --collect=False and --resume reuse it
    assert got.startswith(f"error: {bad}:1:" if "--data=BAD" in flags else missing) and "\n" not in got, got
    assert os.listdir(out) == []  # no stage was built


def test_too_few_prompts_is_one_line_before_the_comparisons_are_rewritten(tiny_sft, refusal):
    """--n_prompts=1 holds its one prompt out: the stop came after sampling had replaced comparisons.jsonl,
    which dpo.py reads, and it blamed that file instead of the option."""
    (tiny_sft / "comparisons.jsonl").write_text("an earlier run's comparisons\n")
    got = refusal("reward", f"--out_dir={tiny_sft}", "--n_prompts=1")
    assert got == "error: --n_prompts=1 leaves none to train on with --val_fraction=0.1", got
    assert (tiny_sft / "comparisons.jsonl").read_text() == "an earlier run's comparisons\n"


def test_best_of_n_alone_reads_a_read_only_out_dir(tiny_sft, refusal, monkeypatch):
    """--train=False --bon=N writes nothing: out_dir must exist but need not be writable (training must)."""
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # a read-only disk (root ignores chmod)
    got = refusal("reward", f"--out_dir={tiny_sft}")
    assert got == f"error: --out_dir='{tiny_sft}' is out of range: it must be writable", got
    got = refusal("reward", f"--out_dir={tiny_sft}", "--train=False", "--bon=2")
    assert got == f"error: checkpoint {tiny_sft / 'reward.pt'} not found", got  # past the options


def test_best_of_n_with_a_reward_model_of_another_tokenizer_is_one_line(tiny_sft, refusal):
    """--train=False --bon reads reward.pt as it is: one made for another tokenizer would rank the SFT model's
    answers by ids that mean other text."""
    args = {**torch.load(tiny_sft / "sft.pt", weights_only=True)["model_args"], "scalar_head": True}
    runtime.save_checkpoint(str(tiny_sft / "reward.pt"), {
        "model": M.GPT(M.GPTConfig(**args)).state_dict(), "model_args": args, "kind": "reward", "step": 1,
        "tokenizer": "gpt2", "gain": 1.0, "bias": 0.0})
    got = refusal("reward", f"--out_dir={tiny_sft}", "--train=False", "--bon=2")
    path = tiny_sft / "reward.pt"
    assert got == f"error: {path} is another network than the SFT model (tokenizer gpt2 vs world)", got


def test_best_of_n_judges_each_prompt_by_its_own_answers_scores():
    """Two prompts, four answers each: every candidate's score is the reward model's on its own prompt, and
    each pick is the best of its own four (not of the first prompt's scores)."""
    rm = trained_looking_rm()
    torch.manual_seed(4)
    sft = M.GPT(M.GPTConfig(**TINY)).eval()
    prompts = [PROMPT, [{"role": "user", "content": "Bye now"}]]
    picks = best_of_n(sft, rm, BYTES, prompts, 4, gain=2.0, bias=1.0, max_new_tokens=5,
                      generator=torch.Generator().manual_seed(0))
    for p, pick in zip(prompts, picks):
        cands = pick["candidates"]
        want = reward_scores(rm, BYTES, [p] * 4, cands, gain=2.0, bias=1.0)
        torch.testing.assert_close(torch.tensor([c["score"] for c in cands]), want, atol=1e-5, rtol=0)
        assert pick["score"] == max(c["score"] for c in cands)


def test_collect_comparisons_hands_the_ended_flags_to_the_labeler(monkeypatch):
    prompts = world.prompts("eval")[:8]

    def fake_respond(policy, enc, convs, max_new_tokens, temperature, generator=None):
        # each prompt's two answers: the same ideal text, the first cut off, the second ended
        return [{"text": world.ideal(c), "ended": j % 2 == 1} for j, c in enumerate(convs)]

    monkeypatch.setattr(reward, "respond", fake_respond)
    rt = SimpleNamespace(rank=0, world_size=1, ddp=False, master=True)
    comps = reward.collect_comparisons(None, None, prompts, rt, None, K=2, max_new_tokens=8, temperature=1.0,
                                       tau=0.01, seed=0, gen_batch=4)
    assert [c["prompt"] for c in comps] == prompts
    for c in comps:
        assert c["ended"] == [False, True]
        assert c["ranking"] == [1, 0]  # a nearly noise-free labeler prefers the answer that ended its turn


def test_best_of_n_on_held_out_averages_sft_gold_over_every_candidate(monkeypatch):
    evals = world.prompts("eval")
    bad = "You are dumb."

    def fake_best_of_n(policy, rm, enc, prompts, n, *a, **k):
        # each prompt: the ideal answer and an insult; the reward model picks the insult
        return [{"text": bad, "ended": True, "score": 1.0,
                 "candidates": [{"text": world.ideal(p), "ended": True}, {"text": bad, "ended": True}]}
                for p in prompts]

    monkeypatch.setattr(reward, "best_of_n", fake_best_of_n)
    ideal = lambda policy, enc, prompts, *a, **k: {  # noqa: E731  (one SFT sample each: the ideal answer)
        "samples": reward.grade(prompts, [{"text": world.ideal(p), "ended": True} for p in prompts])}
    monkeypatch.setattr(reward, "sample_and_grade", ideal)
    rt = SimpleNamespace(ctx=contextlib.nullcontext())
    res = reward.best_of_n_on_held_out(None, None, None, 2, 1.0, 0.0, 0.0, 8, 1.0, 64, rt, None)
    bad_gold = sum(world.gold(p, bad) for p in evals) / len(evals)
    assert res["sft_gold"] == pytest.approx((1.0 + bad_gold) / 2)  # both candidates of every prompt
    assert res["bon_gold"] == pytest.approx(bad_gold)
    assert res["oracle_gold"] == pytest.approx(1.0)
    assert res["oracle_win_rate"] == pytest.approx(0.5) and res["bon_win_rate"] == pytest.approx(0.0)


def test_best_of_n_on_one_held_out_prompt_prints_its_interval_as_n_a(monkeypatch, capsys):
    """One held-out prompt is one pair of answers: no spread to measure, so the win rate's half-width is nan
    and the line reads n/a, not 'nan%'. The RM's pick is the insult, the SFT sample the ideal answer: 0%."""
    prompt = world.prompts("eval")[0]
    monkeypatch.setattr(world, "prompts", lambda split, **k: [prompt])
    bad = "You are dumb."
    monkeypatch.setattr(reward, "best_of_n", lambda policy, rm, enc, prompts, n, *a, **k: [
        {"text": bad, "ended": True, "score": 1.0,
         "candidates": [{"text": world.ideal(p), "ended": True}, {"text": bad, "ended": True}]}
        for p in prompts])
    monkeypatch.setattr(reward, "sample_and_grade", lambda policy, enc, prompts, *a, **k: {
        "samples": reward.grade(prompts, [{"text": world.ideal(p), "ended": True} for p in prompts])})
    rt = SimpleNamespace(ctx=contextlib.nullcontext())
    res = reward.best_of_n_on_held_out(None, None, None, 2, 1.0, 0.0, 0.0, 8, 1.0, 64, rt, None)
    assert res["bon_win_rate"] == 0.0 and math.isnan(res["bon_win_ci"])
    out = capsys.readouterr().out
    assert "best-of-2 on 1 held-out prompts" in out and "nan" not in out
    assert "RM's pick beats a single SFT sample 0.0% +- n/a of the time (ties count half; " in out


def test_each_comparisons_labeler_draws_its_own_stream_however_the_prompts_are_batched(monkeypatch):
    """Comparison i is ranked with the labeler stream "labeler-{seed}-{i}", whatever gen_batch cuts the
    prompts into (and under torchrun, whichever rank samples it): with four answers that a noisy labeler
    (tau 10) ranks almost at random, the rankings are the same at gen_batch 4, 8 and 24 (1, 2 and 6 prompts
    a call) and equal world.rank with each comparison's own stream. A stream keyed by the prompt's place in
    its batch would give every batch the same draws."""
    prompts = world.prompts("eval")[:6]
    answers = ["The fox is happy. The fox runs in the forest.", "The fox is happy.", "The owl is happy.",
               "You are dumb."]
    monkeypatch.setattr(reward, "respond", lambda policy, enc, convs, *a, **k:
                        [{"text": answers[j % 4], "ended": True} for j in range(len(convs))])
    rt = SimpleNamespace(rank=0, world_size=1, ddp=False, master=True)
    want = [world.rank(p, answers, random.Random(f"labeler-7-{i}"), [True] * 4, tau=10.0)
            for i, p in enumerate(prompts)]
    assert len({tuple(r) for r in want}) > 1  # the streams differ: the check bites
    for gen_batch in (4, 8, 24):
        comps = reward.collect_comparisons(None, None, prompts, rt, None, K=4, max_new_tokens=8,
                                           temperature=1.0, tau=10.0, seed=7, gen_batch=gen_batch)
        assert [c["ranking"] for c in comps] == want, gen_batch


def test_a_pair_on_a_bins_edge_is_counted_once_in_the_bin_it_opens():
    """The calibration bins are [lo, hi), the last one [0.9, 1.0] closed: a pair predicted sigmoid(ln 4) = 0.8
    (exactly, in fp32) belongs to [0.8, 0.9) alone, not to [0.7, 0.8] as well."""
    assert torch.sigmoid(torch.tensor(math.log(4))).item() == pytest.approx(0.8, abs=1e-7)
    rows = reward.calibration(torch.tensor([[0.0, -math.log(4)]]))
    assert rows == [(0.8, 0.9, 1, pytest.approx(0.8), 1.0)]


def test_the_report_measures_calibration_and_the_labelers_gold_accuracy_on_the_held_out_rankings(capsys):
    """report() on three rankings of two answers, the first two held out, the labeler's choice first. Held
    out, the rewards (1, 0) predict sigmoid(1) = 0.73 twice, both pairs as the labeler ranked them; the
    training ranking's (3, 0) is not a held-out pair and stays out of the calibration table. Gold (0.5, 0.5)
    ties, so only the second held-out pair, gold (0.4, 0.9), says how often a labeler agrees with gold:
    never (a tie counted half would say 1/4). The second labeler, (1, 2) and (2, 1), agrees on one pair of
    two. The examples are shown by the question each prompt ends with."""
    r = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    gold = torch.tensor([[0.5, 0.5], [0.4, 0.9], [1.0, 0.2]])
    parts = [[{k: (g if k == "helpful" else 0.0) for k in world.WEIGHTS} for g in row]
             for row in gold.tolist()]
    opening = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."}]
    comps = [{"prompt": opening + [{"role": "user", "content": f"Question {i}"}], "responses": ["a", "b"],
              "ended": [True, True], "ranking": [0, 1]} for i in range(3)]
    first = torch.arange(2, 0, -1.0).expand(2, 2)
    second = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    m = reward.report(r, 1.0, 0.0, "r", reward.bradley_terry_loss, comps, [0, 1], [2], first, gold, parts,
                      second)
    assert m["calibration"] == [(0.7, 0.8, 2, pytest.approx(1 / (1 + math.exp(-1))), 1.0)]
    assert m["val_acc"] == 1.0 and m["val_acc_gold"] == 0.0
    assert m["labeler_acc_gold"] == 0.0 and m["ceiling_labelers"] == 0.5
    assert m["acc_gold_by_part"] == {"helpful": (0.0, 1)}
    assert m["acc_gold_by_part_train"] == {"helpful": (1.0, 1)}
    out = capsys.readouterr().out  # the held-out examples are shown by their last turn, the question
    assert "Question 0" in out and "Question 1" in out and "Hello." not in out
    assert "reward model on 2 held-out rankings of 2 prompts (2 pairs):" in out
    for c in comps:  # a preference file may rank answers to one prompt several times: it counts once
        c["prompt"] = opening
    reward.report(r, 1.0, 0.0, "r", reward.bradley_terry_loss, comps, [0, 1], [2], first, gold, parts, second)
    assert "reward model on 2 held-out rankings of 1 prompts (2 pairs):" in capsys.readouterr().out


def test_with_no_pair_of_distinct_gold_the_report_says_n_a_and_logs_null(capsys):
    """Answers that gold ties in every held-out ranking (e.g. all cut to one token) leave nothing to measure:
    the gold accuracies are None (JSON null), printed n/a, never NaN, which no JSON reader takes."""
    assert reward.pairwise_accuracy(torch.tensor([[1.0, 0.0, 2.0]]), torch.full((1, 3), 0.7)) is None
    r, gold = torch.tensor([[1.0, 0.0], [0.5, 0.0]]), torch.full((2, 2), 0.4)
    parts = [[dict.fromkeys(world.WEIGHTS, 0.0)] * 2] * 2
    comps = [{"prompt": [{"role": "user", "content": "Hi."}], "responses": ["a", "b"], "ended": [True] * 2,
              "ranking": [0, 1]}] * 2
    first = torch.tensor([[2.0, 1.0]])
    m = reward.report(r, 1.0, 0.0, "r", reward.bradley_terry_loss, comps, [0], [1], first, gold, parts,
                      torch.tensor([[1.0, 2.0]]))
    assert m["val_acc_gold"] is None and m["labeler_acc_gold"] is None and m["acc_gold_by_part"] == {}
    assert json.loads(json.dumps(m, allow_nan=False))["val_acc_gold"] is None
    out = capsys.readouterr().out
    assert "gold ordering on n/a of pairs with distinct gold; a single labeler does on n/a" in out


def test_best_of_n_on_held_out_samples_at_its_temperature_and_scores_with_the_likelihood(monkeypatch):
    """The best-of-n picks and the single SFT samples they are judged against are both drawn at the stage's
    --temperature and max_new_tokens, in calls of at most gen_batch prompts; the picks are scored with the
    reward model's gain, bias and lm_weight."""
    evals, seen = world.prompts("eval"), {"respond": []}

    def fake_best_of_n(policy, rm, enc, prompts, n, gain, bias, max_new_tokens, temperature, **k):
        seen["bon"] = (len(prompts), n, gain, bias, max_new_tokens, temperature, k["lm_weight"])
        return [{"text": "x", "ended": True, "score": 0.0, "candidates": [{"text": "x", "ended": True}] * n}
                for _ in prompts]

    def fake_respond(policy, enc, prompts, max_new_tokens, temperature, generator=None, return_batch=False):
        seen["respond"].append((len(prompts), max_new_tokens, temperature))
        replies = [{"text": "x", "ended": True} for _ in prompts]
        return (replies, (None,) * 4) if return_batch else replies

    monkeypatch.setattr(reward, "best_of_n", fake_best_of_n)
    monkeypatch.setattr(rollout, "respond", fake_respond)  # the single samples: rollout.sample_and_grade's
    rt = SimpleNamespace(ctx=contextlib.nullcontext())
    reward.best_of_n_on_held_out(None, None, None, 3, 2.0, -1.0, 0.25, 8, 0.7, 16, rt, None)
    assert seen["bon"] == (len(evals), 3, 2.0, -1.0, 8, 0.7, 0.25)
    assert sum(n for n, _, _ in seen["respond"]) == len(evals) > 16
    assert all(n <= 16 and (m, t) == (8, 0.7) for n, m, t in seen["respond"])


def test_main_saves_the_gain_and_bias_that_put_its_ranked_answers_at_mean_0_std_1(tiny_sft, monkeypatch):
    """The final checkpoint holds the normalisation fitted on every ranked answer's reward r: gain * r + bias
    has mean 0 and std 1 over them (gain and bias swapped would not), marked normalised, with K and the
    head-alone lm_weight 0."""
    seen, real = {}, reward.normalisation
    monkeypatch.setattr(reward, "normalisation", lambda r: seen.update(r=r) or real(r))
    run_here(monkeypatch, reward, f"--out_dir={tiny_sft}", "--max_new_tokens=4", "--batch_size=4",
             "--max_iters=2", "--eval_interval=2", "--n_prompts=40", "--K=3", "--device=cpu")
    ck = torch.load(tiny_sft / "reward.pt", weights_only=True)
    r = seen["r"]
    assert r.std() > 1e-6 and abs(ck["gain"] - 1.0) > 1e-3  # a trained head: a real scale to fit
    z = ck["gain"] * r + ck["bias"]
    assert z.mean().item() == pytest.approx(0.0, abs=1e-4) and z.std().item() == pytest.approx(1.0, abs=1e-4)
    assert ck["normalised"] is True and ck["K"] == 3 and ck["lm_weight"] == 0.0
