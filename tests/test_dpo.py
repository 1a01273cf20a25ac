"""Correctness of dpo.py: the losses (DPO, conservative DPO, IPO, the NLL term) against hand-worked numbers,
the response-only log-prob sum, a gradient step that widens the margin, the empty-answer regression, the
non-finite guard, the option checks, the pairs a ranking gives, and a tiny end-to-end run with resume."""
import json
import math
import os
import re
import subprocess
import sys
import zlib
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dpo  # noqa: E402  (importing must not start the stage)
import model as M  # noqa: E402
import runtime  # noqa: E402
from data.chat import render_response  # noqa: E402
from data.readers import DataError  # noqa: E402
from data.tokenizer import get_tokenizer  # noqa: E402
from test_reliability import time_split  # noqa: E402
from conftest import run_here, setup_as, torchrun_launcher  # noqa: E402

TINY = dict(block_size=48, vocab_size=97, n_layer=2, n_head=2, n_embd=32)


def tiny():
    torch.manual_seed(0)
    return M.GPT(M.GPTConfig(**TINY)).eval()


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_policy_equal_to_reference_gives_ln2_and_no_wins():
    lp_c, lp_r = torch.randn(8) * 10, torch.randn(8) * 10
    losses = dpo.dpo_loss(lp_c, lp_r, lp_c.clone(), lp_r.clone(), beta=0.1)
    assert losses.shape == (8,)  # one loss per pair
    torch.testing.assert_close(losses, torch.full((8,), math.log(2)))  # sigma(0) = 1/2 for every pair
    rc, rr = dpo.implicit_reward(lp_c, lp_c.clone(), 0.1), dpo.implicit_reward(lp_r, lp_r.clone(), 0.1)
    assert (rc == 0).all() and (rr == 0).all()
    stats = dpo.pair_stats(losses.mean(), lp_c, lp_r, lp_c.clone(), lp_r.clone(), beta=0.1)
    assert stats["accuracy"] == 0.0 and stats["margin"] == 0.0  # accuracy counts strict wins only


def test_sigmoid_loss_by_hand():
    # h = (pi_c - ref_c) - (pi_r - ref_r) = (-1 + 2) - (-3 + 2) = 2, beta h = 1
    # loss = -log sigma(1) = log(1 + e^-1) = 0.3132616875...; rewards = beta * log-ratio = +0.5 and -0.5
    # pair 2: h = 0 - 2 = -2, beta h = -1: -log sigma(-1) = log(1 + e) = 1.3132616875...
    losses = dpo.dpo_loss(t(-1.0, -2.0), t(-3.0, -1.0), t(-2.0, -2.0), t(-2.0, -3.0), beta=0.5)
    torch.testing.assert_close(losses, t(0.31326168751822286, 1.3132616875182228))
    assert dpo.implicit_reward(t(-1.0), t(-2.0), 0.5).item() == pytest.approx(0.5)
    assert dpo.implicit_reward(t(-3.0), t(-2.0), 0.5).item() == pytest.approx(-0.5)


def test_ipo_loss_by_hand():
    # beta = 0.5, target margin 1/(2 beta) = 1.  pair 1: h = 2 -> (2 - 1)^2 = 1.
    # pair 2: pi_c = -2, pi_r = -1, refs -2: h = 0 - 1 = -1 -> (-1 - 1)^2 = 4.
    losses = dpo.ipo_loss(t(-1.0, -2.0), t(-3.0, -1.0), t(-2.0, -2.0), t(-2.0, -2.0), beta=0.5)
    torch.testing.assert_close(losses, t(1.0, 4.0))
    total, pref = dpo.preference_loss(t(-1.0, -2.0), t(-3.0, -1.0), t(-2.0, -2.0), t(-2.0, -2.0), t(1.0, 1.0),
                                      "ipo", 0.5, 0.0, 0.0)
    assert total.item() == pref.item() == pytest.approx(2.5)  # the mean over pairs
    # beta = 0.25, target 1/(2 beta) = 2 (at 0.5 the target equals 2 beta; here they differ):
    # h = 2 -> 0;  h = -1 -> (-1 - 2)^2 = 9
    losses = dpo.ipo_loss(t(-1.0, -2.0), t(-3.0, -1.0), t(-2.0, -2.0), t(-2.0, -2.0), beta=0.25)
    torch.testing.assert_close(losses, t(0.0, 9.0))


def test_label_smoothed_loss_by_hand():
    # beta h = 1, eps = 0.1: -0.9 log sigma(1) - 0.1 log sigma(-1) = 0.9 * 0.31326169 + 0.1 * 1.31326169
    # = 0.28193552 + 0.13132617 = 0.41326169
    # (= DPO's loss + eps * beta h, as log sigma(x) - log sigma(-x) = x)
    loss = dpo.dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.41326168751822285, abs=1e-6)


def test_nll_term_and_total_by_hand():
    # per-token NLL of the chosen answers: -(-6) / 3 = 2, and an answer with no tokens adds 0 (not 0/0)
    torch.testing.assert_close(dpo.nll_term(t(-6.0, 0.0), t(3.0, 0.0)), t(2.0, 0.0))
    # sigmoid loss of the hand-worked pair (0.31326169) + alpha 0.5 * NLL (-(-1) / 2 = 0.5) = 0.56326169
    total, pref = dpo.preference_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), t(2.0), "sigmoid", 0.5, 0.0, 0.5)
    assert pref.item() == pytest.approx(0.31326168751822286, abs=1e-6)
    assert total.item() == pytest.approx(0.56326168751822286, abs=1e-6)


def test_unknown_loss_type_is_an_error():
    with pytest.raises(ValueError, match="unknown loss"):
        dpo.preference_loss(t(0.0), t(0.0), t(0.0), t(0.0), t(1.0), "hinge", 0.1, 0.0, 0.0)


ROW = [5, 6, 7, 8, 9, 10, 11]
MASK = [0, 0, 0, 1, 1, 1, 0]  # prompt 5 6 7, answer 8 9 10, then a token that is not the answer's


def test_summed_logprob_counts_answer_tokens_only():
    m = tiny()
    with torch.no_grad():
        got = dpo.response_logps(m, [ROW], [MASK], pad_id=0, device="cpu")
        logp = torch.log_softmax(m(torch.tensor([ROW]))[0][0], -1)  # (T, V): row t predicts token t+1
    # 8 | 5 6 7, 9 | 5 6 7 8, 10 | 5 6 7 8 9
    by_hand = sum(logp[i - 1, ROW[i]].item() for i in range(len(ROW)) if MASK[i])
    assert got.item() == pytest.approx(by_hand, abs=1e-5)


def test_padding_changes_nothing():
    m = tiny()
    long_row, long_mask = list(range(20, 40)), [0] * 10 + [1] * 10
    with torch.no_grad():
        alone = dpo.response_logps(m, [ROW], [MASK], pad_id=0, device="cpu")
        padded = dpo.response_logps(m, [ROW, long_row], [MASK, long_mask], pad_id=0, device="cpu")
        other_pad = dpo.response_logps(m, [ROW, long_row], [MASK, long_mask], pad_id=96, device="cpu")
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(other_pad, padded, atol=1e-5, rtol=0)


def test_held_out_pairs_score_each_distinct_answer_once_and_match_pair_by_pair(monkeypatch):
    policy, ref = tiny(), tiny()
    with torch.no_grad():  # the policy has moved away from the reference: losses and margins are not trivial
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(6, 14, (9,), generator=g).tolist()
    rows = [torch.randint(1, 97, (n,), generator=g).tolist() for n in lengths]
    masks = [[0] * 4 + [1] * (len(r) - 4) for r in rows]
    rt = SimpleNamespace(device="cpu", ctx=nullcontext(), master=True)
    answers = (rows, masks, dpo.answer_logps(ref, rows, masks, 0, rt))
    # three rankings of K = 3 answers: each ranking gives 3 pairs, and each answer is in 2 of them
    pairs = torch.tensor([(k + a, k + b) for k in (0, 3, 6) for a, b in ((0, 1), (0, 2), (1, 2))])
    hp = dict(loss_type="sigmoid", beta=0.5, label_smoothing=0.0, rpo_alpha=0.0)
    scored = []
    real = dpo.response_logps
    monkeypatch.setattr(dpo, "response_logps", lambda m, r, *a: scored.extend(r) or real(m, r, *a))
    got = dpo.evaluate_pairs(policy, pairs, answers, 0, rt, hp)
    assert len(scored) == 9  # 9 distinct answers scored once each, not 18 answers of 9 pairs
    with torch.no_grad():  # pair by pair, as a training step computes them
        pi_c, pi_r, ref_c, ref_r, n_c = (torch.cat(x) for x in zip(*(
            dpo.pair_logps(policy, pairs[i:i + 1], answers, 0, "cpu") for i in range(len(pairs)))))
    _, pref = dpo.preference_loss(pi_c, pi_r, ref_c, ref_r, n_c, **hp)
    want = dpo.pair_stats(pref, pi_c, pi_r, ref_c, ref_r, hp["beta"])
    assert 0 < want["accuracy"] < 1 and abs(want["margin"]) > 1e-3
    for k in ("loss", "accuracy", "margin"):
        assert got[k] == pytest.approx(want[k], abs=1e-5)
    assert policy.training  # evaluate_pairs leaves the policy in training mode


def test_gradient_step_widens_the_margin():
    policy, ref = tiny(), tiny()
    chosen = [[1, 2, 3, 10, 11, 12], [4, 5, 20, 21, 22, 23]]
    rejected = [[1, 2, 3, 30, 31], [4, 5, 40, 41, 42]]
    masks = [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]
    with torch.no_grad():
        ref_lp = dpo.response_logps(ref, chosen + rejected, masks, 0, "cpu")
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)

    def margin_and_loss():
        lp = dpo.response_logps(policy, chosen + rejected, masks, 0, "cpu")  # one forward, chosen first
        loss = dpo.dpo_loss(lp[:2], lp[2:], ref_lp[:2], ref_lp[2:], beta=0.1).mean()
        margin = dpo.implicit_reward(lp[:2], ref_lp[:2], 0.1) - dpo.implicit_reward(lp[2:], ref_lp[2:], 0.1)
        return margin.mean().item(), loss

    before, loss = margin_and_loss()
    assert before == pytest.approx(0.0, abs=1e-6)  # policy = reference
    loss.backward()
    opt.step()
    after, _ = margin_and_loss()
    assert after > before + 1e-3


def test_empty_chosen_answer_gives_finite_loss_and_gradients():
    """Regression: an online reply that stopped at once (text '', never ended) has no answer tokens; as the
    chosen answer of a pair its NLL term was 0/0 = NaN, and every weight became NaN after one step."""
    enc = get_tokenizer("world")
    prompt = [{"role": "user", "content": "Describe the fox."}]
    empty, empty_mask = render_response(enc, prompt, "", False, 64)
    assert sum(empty_mask) == 0  # a legitimate answer with no tokens
    full, full_mask = render_response(enc, prompt, "The fox is red.", True, 64)
    rows, masks = [empty, full], [empty_mask, full_mask]  # pair (0, 1): the empty answer is the chosen one
    args = dict(block_size=64, vocab_size=enc.n_vocab, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    policy, ref = M.GPT(M.GPTConfig(**args)), M.GPT(M.GPTConfig(**args))
    pad = enc.eot_token
    answers = (rows, masks, dpo.response_logps(ref, rows, masks, pad, "cpu").detach())
    pi_c, pi_r, ref_c, ref_r, n_c = dpo.pair_logps(policy, torch.tensor([[0, 1]]), answers, pad, "cpu")
    assert n_c.item() == 0 and pi_c.item() == 0.0
    for loss_type in ("sigmoid", "ipo"):
        total, _ = dpo.preference_loss(pi_c, pi_r, ref_c, ref_r, n_c, loss_type, 0.1, 0.0, 1.0)
        assert torch.isfinite(total)
        policy.zero_grad()
        total.backward(retain_graph=True)
        grads = [p.grad for p in policy.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


def test_nonfinite_loss_stops_the_stage():
    policy = tiny().train()
    rows, masks = [ROW, [5, 6, 7, 12, 13]], [MASK, [0, 0, 0, 1, 1]]
    answers = (rows, masks, torch.tensor([float("nan"), 0.0]))  # a broken reference log-prob
    rt = SimpleNamespace(device="cpu", ctx=nullcontext(), scaler=torch.amp.GradScaler("cpu", enabled=False),
                         ddp=False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in policy.parameters()]
    hp = dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.0, rpo_alpha=0.0)
    with pytest.raises(SystemExit, match="dpo step 7: loss is nan"):
        dpo.train_step(policy, opt, rt, [torch.tensor([[0, 1]])], answers, 0, 1e-3, 1.0, 7, hp)
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))  # the step was skipped


def write(path, rows):
    with open(path, "w") as f:
        f.write("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_ranking_gives_all_ordered_pairs(tmp_path):
    p = [{"role": "user", "content": "Describe the fox."}]
    path = tmp_path / "c.jsonl"
    write(path, [{"prompt": p, "responses": ["a", "b", "c", "b"], "ended": [True, True, False, True],
                  "ranking": [2, 0, 1, 3], "chosen": "c", "rejected": "b"}])
    responses, pairs = dpo.load_pairs(str(path))
    texts = [(responses[c][1], responses[r][1]) for _, c, r in pairs]
    # 4 answers -> 6 pairs, the better-ranked one chosen; "b" vs "b" (identical, both ended) carries no
    # preference
    assert texts == [("c", "a"), ("c", "b"), ("c", "b"), ("a", "b"), ("a", "b")]
    assert responses[2] == (p, "c", False)


def test_a_byte_order_mark_does_not_hide_the_ranking(tmp_path):
    """An editor's BOM before the first line: still reward.py's rankings (all 3 pairs of 3 answers), not TRL
    pairs read from its "chosen"/"rejected" (one pair)."""
    path = tmp_path / "c.jsonl"
    row = {"prompt": [{"role": "user", "content": "Hi."}], "responses": ["a", "b", "c"], "ranking": [2, 0, 1],
           "chosen": "c", "rejected": "b"}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8-sig")
    responses, pairs = dpo.load_pairs(str(path))
    assert [(responses[c][1], responses[r][1]) for _, c, r in pairs] == [("c", "a"), ("c", "b"), ("a", "b")]


def test_a_carriage_return_between_a_rankings_keys_does_not_hide_it(tmp_path):
    """A bare \\r is JSON whitespace, and the readers split lines at \\n only. load_pairs peeked at the first
    line in text mode, which also ends a line at \\r: it saw half a row, took the file for TRL pairs and
    refused it for a missing 'chosen'."""
    path = tmp_path / "c.jsonl"
    row = json.dumps({"prompt": [{"role": "user", "content": "Hi."}], "responses": ["a", "b", "c"]})
    path.write_bytes(row[:-1].encode() + b',\r"ranking": [2, 0, 1]}\n')
    responses, pairs = dpo.load_pairs(str(path))
    assert [(responses[c][1], responses[r][1]) for _, c, r in pairs] == [("c", "a"), ("c", "b"), ("a", "b")]


def test_trl_pairs_and_bad_lines(tmp_path):
    path = tmp_path / "prefs.jsonl"
    write(path, [{"prompt": "Describe the fox.", "chosen": "The fox is red.", "rejected": "You are dumb."}])
    responses, pairs = dpo.load_pairs(str(path))
    assert [(responses[c][1], responses[r][1]) for _, c, r in pairs] == [("The fox is red.", "You are dumb.")]
    hi = [{"role": "user", "content": "Hi."}]
    write(path, [{"prompt": hi, "responses": ["a", "b"], "ranking": [0, 1]},
                 {"prompt": hi, "responses": ["a", "b"], "ranking": [0, 0]}])
    with pytest.raises(DataError, match=r"prefs.jsonl:2: "):
        dpo.load_pairs(str(path))


def tiny_sft_and_rankings(out):
    """A tiny random SFT model saved as out/sft.pt; returns its model_args and eight rankings of three answers
    each, to write."""
    enc = get_tokenizer("world")
    args = dict(block_size=64, vocab_size=enc.n_vocab, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    torch.manual_seed(0)
    runtime.save_checkpoint(str(out / "sft.pt"), {
        "model": M.GPT(M.GPTConfig(**args)).state_dict(), "model_args": args, "config": {}, "kind": "sft",
        "step": 0, "tokenizer": "world"})
    return args, [{"prompt": [{"role": "user", "content": f"Describe the {a}."}],
                   "responses": [f"The {a} is red.", f"The {a} is sad.", "You are dumb."],
                   "ended": [True, True, False], "ranking": [0, 1, 2]}
                  for a in ("fox", "cat", "dog", "owl", "frog", "bird", "duck", "bear")]


def test_torchrun_two_processes_on_cpu(tmp_path):
    """Offline DPO under torchrun with gloo: the pairs are shared out between the ranks, only rank 0 logs,
    the first step's loss is still ln 2 (policy = reference on every rank), and the check prints once."""
    write(tmp_path / "comparisons.jsonl", tiny_sft_and_rankings(tmp_path)[1])
    r = subprocess.run([*torchrun_launcher(), "dpo.py", f"--out_dir={tmp_path}", "--batch_size=2",
                        "--max_new_tokens=8", "--eval_fraction=0.25", "--n_eval=2", "--device=cpu",
                        "--max_iters=2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = [json.loads(line) for line in open(tmp_path / "dpo.jsonl")]
    assert [x["iter"] for x in logs] == [1, 2] and r.stdout.count("dpo wins") == 1
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert runtime.load_checkpoint(str(tmp_path / "dpo.pt"), "dpo")["step"] == 2


def test_tiny_run_logs_saves_and_resumes(tmp_path):
    args, rows = tiny_sft_and_rankings(tmp_path)
    rows[0]["responses"][1], rows[0]["ended"][1] = "", False  # an answer with no tokens: a legitimate pair
    long = {**rows[1], "prompt": [{"role": "user", "content": "Describe the fox. " * 40}]}  # fills the block
    write(tmp_path / "comparisons.jsonl", rows + [long])
    flags = [f"--out_dir={tmp_path}", "--batch_size=4", "--eval_interval=2", "--max_new_tokens=8",
             "--eval_fraction=0.25", "--n_eval=8"]
    run = lambda *a: subprocess.run([sys.executable, "dpo.py", *flags, *a], cwd=ROOT, capture_output=True,
                                    text=True, timeout=300)
    r = run("--max_iters=3")  # offline DPO, the default: no reward model needed, none built
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (tmp_path / "reward.pt").exists()
    # the long prompt's three pairs are kept, scored on their last 64 tokens (the whole answers)
    assert sum(map(int, re.search(r"(\d+) training pairs, (\d+) held out", r.stdout).groups())) == 9 * 3
    assert "dpo wins" in r.stdout and "KL(dpo || sft)" in r.stdout
    assert {"scoring", "training", "held-out & checkpoints", "sampling"} <= set(time_split(r.stdout, "dpo"))
    logs = [json.loads(line) for line in open(tmp_path / "dpo.jsonl")]
    assert [x["iter"] for x in logs] == [1, 2, 3]
    assert len({tuple(x) for x in logs}) == 1  # the same keys every step
    # step 1's batch: policy = reference, so ln 2 up to rounding (the reference scored these answers in
    # batches padded to another length, and CPUs round those sums differently)
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert logs[1]["val/accuracy"] is not None and logs[0]["val/accuracy"] is None
    ck = runtime.load_checkpoint(str(tmp_path / "dpo.pt"), "dpo")
    assert ck["step"] == 3 and ck["tokenizer"] == "world"
    sft = runtime.load_checkpoint(str(tmp_path / "sft.pt"), "sft")
    assert ck["sft_fingerprint"] == runtime.fingerprint(sft["model"])  # the SFT model it was tuned from
    r = run("--max_iters=4", "--resume=True")
    assert r.returncode == 0, r.stderr[-2000:]
    assert runtime.load_checkpoint(str(tmp_path / "dpo.pt"), "dpo")["step"] == 4
    assert [json.loads(line)["iter"] for line in open(tmp_path / "dpo.jsonl")] == [1, 2, 3, 4]
    # online DPO after the offline steps: one round of fresh answers judged by a (random) reward model
    rm_args = {**args, "scalar_head": True}
    runtime.save_checkpoint(str(tmp_path / "reward.pt"), {
        "model": M.GPT(M.GPTConfig(**rm_args)).state_dict(), "model_args": rm_args, "config": {},
        "kind": "reward", "step": 0, "tokenizer": "world", "gain": 1.0, "bias": 0.0, "lm_weight": 0.05})
    r = run("--max_iters=4", "--resume=True", "--online_rounds=1", "--online_prompts=4", "--online_k=3",
            "--online_pairs=1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "online round 1/1: 4 prompts x 3 answers" in r.stdout
    ck = runtime.load_checkpoint(str(tmp_path / "dpo.pt"), "dpo")
    assert ck["step"] == 4 and ck["round"] == 1
    logs = [json.loads(line) for line in open(tmp_path / "dpo.jsonl")]
    assert [x["iter"] for x in logs] == [1, 2, 3, 4, 5]  # 4 prompts: one step of 4 pairs
    assert logs[-1]["round"] == 1
    # after an online round, more offline steps would follow it and the log's steps would repeat: refused;
    # fewer than the checkpoint took are none to take, and round 2 follows round 1 in the log
    online = ["--resume=True", "--online_rounds=2", "--online_prompts=4", "--online_k=3", "--online_pairs=1"]
    before = [(tmp_path / f).read_bytes() for f in ("dpo.pt", "dpo.jsonl")]
    r = run("--max_iters=6", *online)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith(
        f"error: --resume: {tmp_path / 'dpo.pt'} is in online rounds after 4 offline steps"), r.stderr[-2000:]
    assert [(tmp_path / f).read_bytes() for f in ("dpo.pt", "dpo.jsonl")] == before
    r = run("--max_iters=3", *online)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(line)["iter"] for line in open(tmp_path / "dpo.jsonl")] == [1, 2, 3, 4, 5, 6]
    resumed = runtime.load_checkpoint(str(tmp_path / "dpo.pt"), "dpo")
    assert resumed["step"] == 4 and resumed["round"] == 2
    # a third round with another --online_prompts: its steps per round, and so the log's step numbers, would
    # change mid-run: refused in one line, the files untouched
    before = [(tmp_path / f).read_bytes() for f in ("dpo.pt", "dpo.jsonl")]
    r = run("--max_iters=3", "--resume=True", "--online_rounds=3", "--online_prompts=8", "--online_k=3",
            "--online_pairs=1")
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith(
        f"error: --resume: {tmp_path / 'dpo.pt'} is in online rounds after 4 offline steps"), r.stderr[-2000:]
    assert [(tmp_path / f).read_bytes() for f in ("dpo.pt", "dpo.jsonl")] == before
    # a dpo.pt of another network is refused in one line, not a traceback from load_state_dict
    other = {**args, "n_embd": 32}
    runtime.save_checkpoint(str(tmp_path / "dpo.pt"), {**ck, "model_args": other,
                                                       "model": M.GPT(M.GPTConfig(**other)).state_dict()})
    r = run("--max_iters=5", "--resume=True")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().endswith("is another network than the SFT model (n_embd 32 vs 16)")


def test_online_pairs_are_best_and_worst_by_hand():
    reply = lambda text, ended=True: {"text": text, "ended": ended}
    replies = [reply("a"), reply("b"), reply("c"),        # prompt 1: best is 1 (0.9), worst is 0 (0.1)
               reply("d"), reply("e"), reply("f"),        # prompt 2: all tie: no pair
               reply("g"), reply("h"), reply("g"),        # prompt 3: best 6, worst 8, the same text: no pair
               reply("i"), reply("i", False), reply("j")]  # prompt 4: same text, but one never ended: a pair
    scores = [0.1, 0.9, 0.5, 0.2, 0.2, 0.2, 0.8, 0.3, 0.1, 0.7, -0.4, 0.0]
    assert dpo.best_and_worst(scores, replies, 3) == [(1, 0), (9, 10)]
    # two pairs per prompt from 4 replies: best vs worst, then second best vs second worst
    replies = [reply(t) for t in "abcdefgh"]
    scores = [0.3, 0.9, 0.1, 0.5,   0.2, 0.8, 0.5, 0.5]  # prompt 2: the inner pair ties, so it gives no pair
    assert dpo.best_and_worst(scores, replies, 4, n=2) == [(1, 2), (3, 0), (5, 4)]


def test_an_answer_that_never_ends_loses_the_penalty_in_the_ranking():
    reply = lambda text, ended=True: {"text": text, "ended": ended}
    # the reward model likes the empty reply that never ended best (0.9); with the penalty of 1 it scores
    # -0.1, below both finished answers (0.5, 0.2), and becomes the rejected answer instead of the chosen one
    replies = [reply("", False), reply("The fox is red."), reply("The fox is sad.")]
    assert dpo.best_and_worst([0.9, 0.5, 0.2], replies, 3) == [(0, 2)]
    assert dpo.best_and_worst([0.9, 0.5, 0.2], replies, 3, no_end_penalty=1.0) == [(1, 0)]
    # penalised scores 0.3 - 1 = -0.7 and 0.2 - 1 = -0.8: both unended, the ranking between them stays
    replies = [reply("a", False), reply("b", False)]
    assert dpo.best_and_worst([0.3, 0.2], replies, 2, no_end_penalty=1.0) == [(0, 1)]


@pytest.mark.parametrize("flags, message", [
    (["--loss=hinge"], "--loss='hinge' is out of range"),
    (["--beta=0"], "--beta=0.0 is out of range"),  # dpo.py's own rule: beta divides in IPO, scales in DPO
    (["--online_rounds=1", "--online_k=4", "--online_pairs=3"],
     "--online_pairs=3 must be <= online_k / 2 = 2"),
    (["--loss=ipo", "--label_smoothing=0.1"], "needs --loss=sigmoid"),
    (["--online_rounds=1", "--data=prefs.jsonl"], "need a reward model"),
    (["--data=none.jsonl"], "--data='none.jsonl' is out of range: it must be a preference file that exists"),
])
def test_bad_options_stop_before_anything_is_touched(tmp_path, refusal, flags, message):
    (tmp_path / "dpo.jsonl").write_text("old log\n")
    write(tmp_path / "prefs.jsonl", [{"prompt": "Hi.", "chosen": "a", "rejected": "b"}])
    flags = [f.replace("prefs.jsonl", str(tmp_path / "prefs.jsonl")) for f in flags]
    got = refusal("dpo", f"--out_dir={tmp_path}", *flags)
    assert got.startswith("error: ") and message in got and "\n" not in got, got
    assert sorted(os.listdir(tmp_path)) == ["dpo.jsonl", "prefs.jsonl"]  # no sft.pt built, nothing written
    assert (tmp_path / "dpo.jsonl").read_text() == "old log\n"


def test_a_reward_model_from_data_is_not_rebuilt_over(tmp_path, refusal, monkeypatch):
    """reward.py --data=... writes reward.pt but no comparisons.jsonl; dpo.py without --data must not run
    reward.py to make comparisons, which would replace that reward model with one of the world's."""
    built = []
    monkeypatch.setattr(runtime, "ensure_checkpoint", lambda *a: built.append(a))
    (tmp_path / "reward.pt").write_bytes(b"a reward model trained on the user's data")
    msg = refusal("dpo", f"--out_dir={tmp_path}")
    assert msg == (f"error: {tmp_path / 'comparisons.jsonl'} not found beside {tmp_path / 'reward.pt'}: pass "
                   "the --data it was trained on") and built == []
    assert os.listdir(tmp_path) == ["reward.pt"]


def test_resume_without_a_checkpoint_is_one_line_before_any_stage_is_built(tmp_path, refusal, monkeypatch):
    """--resume=True in a folder with no dpo.pt must not first pretrain, SFT and collect comparisons there
    for minutes: the missing checkpoint is refused before the inputs are looked for."""
    built = []
    monkeypatch.setattr(runtime, "ensure_checkpoint", lambda *a: built.append(a))
    msg = refusal("dpo", f"--out_dir={tmp_path}", "--resume=True")
    assert msg == f"error: checkpoint {tmp_path / 'dpo.pt'} not found" and built == []
    final = {"kind": "dpo", "step": 3, "model": {}, "model_args": {}}
    runtime.save_checkpoint(str(tmp_path / "dpo.pt"), final)
    msg = refusal("dpo", f"--out_dir={tmp_path}", "--resume=True")  # a final checkpoint without its optimizer
    assert msg.endswith("has no optimizer, scaler, rng: not a complete checkpoint; start afresh without "
                        "--resume") and built == []
    assert os.listdir(tmp_path) == ["dpo.pt"]


def test_a_bad_data_file_is_one_line_before_a_missing_sft_model_is_built(tmp_path, refusal, monkeypatch):
    """--data is read first: a bad line once stopped dpo.py only after pretrain.py and sft.py had run."""
    built = []
    monkeypatch.setattr(runtime, "ensure_checkpoint", lambda *a: built.append(a))
    write(tmp_path / "prefs.jsonl", [{"prompt": "Hi.", "chosen": "a"}])
    got = refusal("dpo", f"--out_dir={tmp_path}", f"--data={tmp_path / 'prefs.jsonl'}")
    assert got.startswith(f"error: {tmp_path / 'prefs.jsonl'}:1: ") and "\n" not in got and built == [], got


def test_online_rounds_need_a_prompt_per_process(tmp_path, refusal, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: a process with no prompt has nothing to rank
    msg = refusal("dpo", f"--out_dir={tmp_path}", "--online_rounds=1", "--online_prompts=1")
    assert msg.startswith("error: --online_prompts=1 is out of range"), msg
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("first", ["5", "null", "true", '"Describe the fox."', '["ranking"]',
                                   pytest.param("[" * 100_000, id="nested-too-deep"),
                                   pytest.param('{"n": ' + "1" * 5000 + "}", id="integer-too-long")])
def test_a_first_line_that_is_not_an_object_is_one_line(tmp_path, first):
    # load_pairs peeks at the first line for "ranking"; a number or null there was a TypeError traceback
    path = tmp_path / "prefs.jsonl"
    write(path, [first, {"prompt": "Describe the fox.", "chosen": "The fox is red.", "rejected": "Go away."}])
    with pytest.raises(DataError, match=r"prefs\.jsonl:1: "):
        dpo.load_pairs(str(path))


def save_online_inputs(tmp_path, **reward_extra):
    """A tiny SFT model, a reward model of the same network and four ranked pairs: what online rounds read."""
    args = dict(block_size=64, vocab_size=get_tokenizer("world").n_vocab, n_layer=1, n_head=2, n_embd=16,
                dropout=0.0)
    torch.manual_seed(0)
    for kind, a in (("sft", args), ("reward", {**args, "scalar_head": True})):
        runtime.save_checkpoint(str(tmp_path / f"{kind}.pt"), {
            "model": M.GPT(M.GPTConfig(**a)).state_dict(), "model_args": a, "config": {}, "kind": kind,
            "step": 0, "tokenizer": "world", "gain": 1.0, "bias": 0.0, **reward_extra})
    write(tmp_path / "comparisons.jsonl", [{"prompt": [{"role": "user", "content": f"Describe the {a}."}],
                                           "responses": [f"The {a} is red.", "No."], "ended": [True, True],
                                           "ranking": [0, 1]} for a in ("fox", "cat", "dog", "owl")])


def test_a_non_finite_reward_in_an_online_round_stops_the_stage(tmp_path):
    """A reward model that overflows (fp16 on a card without bf16, say) scores NaN: best_and_worst would then
    pick pairs by a broken order, or none ("ties"), and train on or skip them without a word."""
    save_online_inputs(tmp_path)
    flags = [f"--out_dir={tmp_path}", "--max_iters=1", "--batch_size=2", "--online_rounds=1",
             "--online_prompts=4", "--online_k=3", "--online_pairs=1", "--max_new_tokens=8"]
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import dpo; real = dpo.reward_scores; "
            "dpo.reward_scores = lambda *a, **k: real(*a, **k) * float('nan'); "
            f"sys.argv = ['dpo.py'] + {flags!r}; dpo.main()")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    last = (r.stderr.strip().splitlines() or [""])[-1]
    assert r.returncode != 0 and last.startswith("error: dpo step 2: score is nan (not finite)"), r.stderr
    assert "online round 1/1" not in r.stdout  # no update was made from the broken ranking


def test_preference_loss_is_the_mean_over_a_batch_of_two_pairs_by_hand():
    """preference_loss averages over the pairs: the two hand-worked pairs of test_sigmoid_loss_by_hand lose
    log(1 + e^-1) = 0.31326169 and log(1 + e) = 1.31326169, mean 0.81326169 (their sum would be 1.62652338);
    with rpo_alpha = 0.5 the chosen answers' per-token NLLs -(-1)/1 = 1 and -(-2)/4 = 0.5, mean 0.75,
    add 0.5 * 0.75 = 0.375."""
    args = t(-1.0, -2.0), t(-3.0, -1.0), t(-2.0, -2.0), t(-2.0, -3.0), t(1.0, 4.0)
    total, pref = dpo.preference_loss(*args, "sigmoid", 0.5, 0.0, 0.0)
    assert total.item() == pref.item() == pytest.approx(0.81326168751822283, abs=1e-6)
    total, pref = dpo.preference_loss(*args, "sigmoid", 0.5, 0.0, 0.5)
    assert pref.item() == pytest.approx(0.81326168751822283, abs=1e-6)
    assert total.item() == pytest.approx(0.81326168751822283 + 0.375, abs=1e-6)


def test_a_step_split_into_micro_batches_has_the_gradient_of_the_whole_step(monkeypatch):
    """train_step with two micro-batches of 2 pairs must give the gradient of one batch of all 4 pairs (the
    loss is a mean over pairs, so each micro-batch's mean is divided by 2 before backward), not twice it."""
    policy, ref = tiny().train(), tiny()
    with torch.no_grad():  # the policy has moved away from the reference: the pairs' losses differ
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (7, 9, 6, 8, 10, 7, 9, 6)]
    masks = [[0] * 3 + [1] * (len(r) - 3) for r in rows]
    rt = SimpleNamespace(device="cpu", ctx=nullcontext(), scaler=torch.amp.GradScaler("cpu", enabled=False),
                         ddp=False, master=True)
    answers = (rows, masks, dpo.answer_logps(ref, rows, masks, 0, rt))
    pairs = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    hp = dict(loss_type="sigmoid", beta=0.5, label_smoothing=0.0, rpo_alpha=0.5)
    grads, real_step = [], runtime.optimizer_step

    def capture(model, optimizer, scaler, grad_clip):
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        return real_step(model, optimizer, scaler, grad_clip)
    monkeypatch.setattr(runtime, "optimizer_step", capture)
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)  # lr 0: both steps see the same weights
    dpo.train_step(policy, opt, rt, [pairs], answers, 0, 0.0, 0.0, 1, hp)
    dpo.train_step(policy, opt, rt, [pairs[:2], pairs[2:]], answers, 0, 0.0, 0.0, 2, hp)
    assert grads[0].abs().max() > 1e-3  # a gradient to compare: the test can fail
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_held_out_takes_about_fraction_of_the_prompts_by_their_hash():
    """held_out keeps a prompt aside when crc32 of its JSON, mod 1000, is below 1000 * fraction: a prompt
    whose hash ends in h is held out at fraction (h + 1) / 1000 and not at h / 1000; of 2000 prompts about
    10% (not 90%) are held out at fraction 0.1, none at 0."""
    prompts = [[{"role": "user", "content": f"Describe animal number {i}."}] for i in range(2000)]
    h = zlib.crc32(json.dumps(prompts[0], sort_keys=True).encode()) % 1000
    assert dpo.held_out(prompts[0], (h + 1) / 1000) and not dpo.held_out(prompts[0], h / 1000)
    share = sum(dpo.held_out(p, 0.1) for p in prompts) / len(prompts)
    assert 0.08 < share < 0.12, share
    assert not any(dpo.held_out(p, 0.0) for p in prompts)


def test_main_hands_the_loss_options_to_every_preference_loss(tmp_path, monkeypatch):
    """--loss, --beta, --label_smoothing and --rpo_alpha reach preference_loss in main()'s training steps and
    held-out evaluations alike (each loss is unit-tested; this checks the wiring)."""
    save_online_inputs(tmp_path, lm_weight=0.05)
    seen, real = [], dpo.preference_loss
    monkeypatch.setattr(dpo, "preference_loss", lambda *a, **hp: seen.append(hp) or real(*a, **hp))
    for loss, beta, smoothing, alpha in [("ipo", 0.3, 0.0, 0.0), ("sigmoid", 0.5, 0.2, 0.5)]:
        seen.clear()
        run_here(monkeypatch, dpo, f"--out_dir={tmp_path}", "--max_iters=2", "--batch_size=2",
                 "--eval_interval=1", "--max_new_tokens=8", "--n_eval=1", "--device=cpu", f"--loss={loss}",
                 f"--beta={beta}", f"--label_smoothing={smoothing}", f"--rpo_alpha={alpha}")
        want = dict(loss_type=loss, beta=beta, label_smoothing=smoothing, rpo_alpha=alpha)
        assert len(seen) >= 3 and all(hp == want for hp in seen), (seen, want)  # 2 steps and held-out checks


def test_the_online_learning_rate_falls_linearly_step_by_step_over_the_rounds(tmp_path, monkeypatch):
    """Online steps use online_lr * (1 - 0.75 * (round + k / per_round) / online_rounds), k the step within
    the round: with 2 rounds of per_round = 4 prompts x 1 pair / 2 pairs a step = 2 steps and online_lr 2e-4,
    the four steps log 2e-4 * (1, 1 - 0.75 * 0.25, 1 - 0.75 * 0.5, 1 - 0.75 * 0.75)
    = 2e-4, 1.625e-4, 1.25e-4, 0.875e-4: a quarter of online_lr is taken off over the rounds, by the step."""
    save_online_inputs(tmp_path, lm_weight=0.05)
    run_here(monkeypatch, dpo, f"--out_dir={tmp_path}", "--max_iters=1", "--batch_size=2",
             "--online_rounds=2", "--online_prompts=4", "--online_k=3", "--online_pairs=1",
             "--online_lr=2e-4", "--max_new_tokens=8", "--n_eval=1", "--device=cpu")
    logs = [json.loads(line) for line in open(tmp_path / "dpo.jsonl")]
    online = [(x["iter"], x["round"], x["lr"]) for x in logs if "round" in x]
    assert [x[:2] for x in online] == [(2, 1), (3, 1), (4, 2), (5, 2)]
    assert [x[2] for x in online] == pytest.approx([2e-4, 1.625e-4, 1.25e-4, 0.875e-4], rel=1e-9)


def test_answers_longer_than_the_context_are_trained_on_cut_and_counted(tmp_path, monkeypatch, capsys):
    """A file's answer that does not fit the context keeps its end, and one line says how many were cut."""
    save_online_inputs(tmp_path)  # block_size 64
    rows = [{"prompt": [{"role": "user", "content": f"Describe the {a}."}], "responses": [f"The {a} is red.",
             "No."], "ended": [True, True], "ranking": [0, 1]} for a in ("fox", "cat", "dog", "owl")]
    rows[0]["responses"][0] = "The fox is red. " * 20
    write(tmp_path / "comparisons.jsonl", rows)
    run_here(monkeypatch, dpo, f"--out_dir={tmp_path}", "--max_iters=1", "--batch_size=2", "--n_eval=1",
             "--max_new_tokens=8", "--device=cpu")
    path = tmp_path / "comparisons.jsonl"  # 8 answers: two to each of 4 prompts
    assert (f"warning: {path}: 1 of 8 answers with their prompts are longer than block_size=64 tokens; each "
            "keeps its last 64 (the prompt's start is cut)") in capsys.readouterr().out


def test_half_an_epoch_of_a_small_file_is_warned_of_when_it_ends_inside_the_warmup(tmp_path, monkeypatch,
                                                                                   capsys):
    """Four pairs, one held out, batch 2: half an epoch is round(0.5 * 2) = 1 step, under the warmup of 10, so
    the lr would reach 1/11 of --lr unseen; with --warmup_iters=0 it starts at --lr, and --max_iters=1 is the
    user's own count, not the data's: no warning."""
    save_online_inputs(tmp_path)
    flags = (f"--out_dir={tmp_path}", "--batch_size=2", "--n_eval=1", "--max_new_tokens=8", "--device=cpu")
    run_here(monkeypatch, dpo, *flags)
    out, err = capsys.readouterr()
    assert "1 steps of 2 pairs" in out, out
    assert "warning: 1 step, not more than --warmup_iters=10: the lr rises to 9% of --lr" in err, err
    for extra in (("--max_iters=1",), ("--max_iters=0", "--warmup_iters=0")):  # (options stay set: reset)
        run_here(monkeypatch, dpo, *flags, *extra)
        assert "warning" not in capsys.readouterr().err
    setup_as(monkeypatch, master=False)  # another rank: rank 0 says it
    run_here(monkeypatch, dpo, *flags, "--warmup_iters=10")
    assert "warning" not in capsys.readouterr().err


def test_an_online_round_scores_its_new_answers_under_the_reference_not_the_policy():
    """The round's new answers get their reference log-probs once, from the frozen SFT model: DPO's anchor.
    With a policy that has moved away from the reference, the returned log-probs are the reference's; the
    policy's would make h = 0 at the start of every new pair and drop the pull toward SFT."""
    enc = get_tokenizer("world")
    args = dict(block_size=64, vocab_size=enc.n_vocab, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    torch.manual_seed(0)
    ref, policy = M.GPT(M.GPTConfig(**args)).eval(), M.GPT(M.GPTConfig(**args)).eval()
    rm = M.GPT(M.GPTConfig(**args, scalar_head=True)).eval()
    rt = SimpleNamespace(rank=0, world_size=1, device="cpu", ctx=nullcontext(), master=True)
    prompts = [[{"role": "user", "content": f"Describe the {a}."}] for a in ("fox", "cat")]
    old = ([[1, 2, 3]], [[0, 1, 1]], torch.tensor([-1.5]))  # one earlier answer, kept in front
    (rows, masks, ref_logps), _, _ = dpo.online_round(
        policy, ref, rm, {"gain": 1.0, "bias": 0.0}, enc, prompts, 0, old, rt, 2, 3, 1, 8, 1.0, 64, 0)
    assert len(rows) == 1 + 2 * 3 and ref_logps[0] == -1.5
    new = (rows[1:], masks[1:], enc.eot_token, rt)
    torch.testing.assert_close(ref_logps[1:], dpo.answer_logps(ref, *new))
    assert not torch.allclose(ref_logps[1:], dpo.answer_logps(policy, *new))


def test_an_online_rounds_pairs_index_its_new_answers_after_the_earlier_ones(monkeypatch):
    """One earlier answer, then 2 prompts x 3 new answers (indices 1-3 and 4-6) scored 0, 2, 1 and 5, 3, 4:
    the pairs are best against worst within each prompt's answers, (2, 1) and (4, 5), as indices into the
    extended answers, not into the round's own."""
    enc = get_tokenizer("world")
    args = dict(block_size=64, vocab_size=enc.n_vocab, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    torch.manual_seed(0)
    ref, policy = M.GPT(M.GPTConfig(**args)).eval(), M.GPT(M.GPTConfig(**args)).eval()
    monkeypatch.setattr(dpo, "reward_scores", lambda *a, **k: torch.tensor([0.0, 2.0, 1.0, 5.0, 3.0, 4.0]))
    rt = SimpleNamespace(rank=0, world_size=1, device="cpu", ctx=nullcontext(), master=True)
    prompts = [[{"role": "user", "content": f"Describe the {a}."}] for a in ("fox", "cat")]
    old = ([[1, 2, 3]], [[0, 1, 1]], torch.tensor([-1.5]))
    (rows, _, _), pairs, mean = dpo.online_round(
        policy, ref, None, {"gain": 1.0, "bias": 0.0}, enc, prompts, 0, old, rt, 2, 3, 1, 8, 0.0, 64, 0)
    assert len(rows) == 7 and mean == pytest.approx(2.5)
    assert pairs.tolist() == [[2, 1], [4, 5]]


def test_an_online_round_samples_every_answer_when_they_take_more_than_one_chunk(monkeypatch):
    """The round samples its conversations in chunks of 256: 44 prompts x 6 answers = 264 take two, and every
    one of them is answered, rendered, scored under the reference and ranked within its own prompt's six."""
    enc = get_tokenizer("world")
    args = dict(block_size=64, vocab_size=enc.n_vocab, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    torch.manual_seed(0)
    ref, policy = M.GPT(M.GPTConfig(**args)).eval(), M.GPT(M.GPTConfig(**args)).eval()
    scored = []
    monkeypatch.setattr(dpo, "reward_scores", lambda rm, enc, convs, replies, *a, **k: scored.append(
        (convs, replies)) or torch.arange(len(replies)).float() % 6)  # each prompt's last answer is best
    rt = SimpleNamespace(rank=0, world_size=1, device="cpu", ctx=nullcontext(), master=True)
    prompts = [[{"role": "user", "content": f"Name {i}."}] for i in range(44)]
    (rows, masks, ref_logps), pairs, _ = dpo.online_round(
        policy, ref, None, {"gain": 1.0, "bias": 0.0}, enc, prompts, 0, ([], [], torch.zeros(0)), rt, 44, 6,
        1, 4, 0.0, 64, 0)
    (convs, replies), = scored
    assert len(convs) == len(replies) == len(rows) == len(masks) == len(ref_logps) == 264
    assert convs == [p for p in prompts for _ in range(6)]
    assert [enc.decode(rows[i]).count(f"Name {i // 6}.") for i in (0, 255, 256, 263)] == [1, 1, 1, 1]
    assert all(b == 6 * (b // 6) + 5 and w == 6 * (b // 6) for b, w in pairs.tolist())  # within one prompt
    assert {b // 6 for b, _ in pairs.tolist()} >= {43}  # the second chunk's prompts are ranked too


def test_online_rounds_answer_each_training_prompt_once_and_no_held_out_one(tmp_path, monkeypatch):
    """The online rounds draw from the prompts trained on offline, each once however many pairs it has, in
    file order: a held-out prompt answered online would be trained on, and its held-out pairs measure a
    policy that saw it; a prompt of several pairs repeated would be sampled and trained on that much more."""
    save_online_inputs(tmp_path)
    animals = ("fox", "cat", "dog", "owl")
    prompts = [[{"role": "user", "content": f"Describe the {a}."}] for a in animals]
    assert [dpo.held_out(p, 0.25) for p in prompts] == [False, False, True, False]  # "dog" is held out
    rows = [{"prompt": p, "responses": [f"The {a} is red.", "No.", "Maybe."], "ended": [True, True, True],
             "ranking": [0, 1, 2]} for a, p in zip(animals, prompts)]  # three pairs per prompt
    write(tmp_path / "comparisons.jsonl", rows)
    seen, real = [], dpo.online_round
    monkeypatch.setattr(dpo, "online_round", lambda policy, ref, rm, rm_ck, enc, fit, *a: seen.append(fit)
                        or real(policy, ref, rm, rm_ck, enc, fit, *a))
    run_here(monkeypatch, dpo, f"--out_dir={tmp_path}", "--max_iters=1", "--batch_size=2", "--n_eval=1",
             "--online_rounds=1", "--online_prompts=3", "--online_k=2", "--online_pairs=1",
             "--max_new_tokens=4", "--eval_fraction=0.25", "--device=cpu")
    assert seen == [[prompts[0], prompts[1], prompts[3]]]


def test_main_trains_on_the_pairs_not_held_out_and_evaluates_on_the_held_out_ones(tmp_path, monkeypatch,
                                                                                  capsys):
    save_online_inputs(tmp_path)  # four prompts, one pair each
    prompts = [[{"role": "user", "content": f"Describe the {a}."}] for a in ("fox", "cat", "dog", "owl")]
    held = [dpo.held_out(p, 0.25) for p in prompts]
    assert sum(held) == 1  # "dog": 1 held out, 3 to train on
    seen = {"train": [], "val": []}
    real_eval, real_step = dpo.evaluate_pairs, dpo.train_step
    monkeypatch.setattr(dpo, "evaluate_pairs",
                        lambda policy, val_pairs, *a, **k: seen["val"].append(val_pairs.tolist())
                        or real_eval(policy, val_pairs, *a, **k))
    monkeypatch.setattr(dpo, "train_step",
                        lambda policy, opt, rt, micro, *a, **k: seen["train"].extend(
                            p for mb in micro for p in mb.tolist())
                        or real_step(policy, opt, rt, micro, *a, **k))
    run_here(monkeypatch, dpo, f"--out_dir={tmp_path}", "--max_iters=2", "--batch_size=2",
             "--eval_interval=1", "--max_new_tokens=8", "--n_eval=1", "--device=cpu", "--eval_fraction=0.25")
    assert re.search(r"\b3 training pairs, 1 held out", capsys.readouterr().out)
    dog = [2 * 2, 2 * 2 + 1]  # responses are two per prompt in file order: (chosen, rejected) of "dog"
    assert seen["val"] and all(v == [dog] for v in seen["val"])
    assert seen["train"] and dog not in seen["train"]


def test_two_equal_texts_that_differ_in_ending_their_turn_still_make_a_pair(tmp_path):
    """The same text ended and cut off render differently (one closes with <|end|>): a real preference."""
    row = {"prompt": [{"role": "user", "content": "Hi"}], "responses": ["Hello.", "Hello."],
           "ended": [True, False], "ranking": [0, 1]}
    (tmp_path / "c.jsonl").write_text(json.dumps(row) + "\n")
    responses, pairs = dpo.load_pairs(str(tmp_path / "c.jsonl"))
    assert pairs == [(row["prompt"], 0, 1)]


def test_epoch_batches_cut_length_sorted_windows_into_batches_and_shuffle_them():
    """30 pairs in batches of 4 fit one window (50 batches): sorted by length, then cut, so no two batches
    interleave in length (each is a run of the sorted lengths); every pair once, seven full batches and one
    of 2. The batches come in a shuffled order, not shortest first, and each epoch draws its own."""
    g = torch.Generator().manual_seed(0)
    pair_len = torch.randint(1, 1000, (30,), generator=g).tolist()
    orders = set()
    for seed, epoch in ((1, 0), (1, 1), (2, 0), (3, 0)):
        batches = dpo.epoch_batches(pair_len, 4, seed, epoch)
        assert batches == dpo.epoch_batches(pair_len, 4, seed, epoch)  # (seed, epoch) decides it
        assert sorted(i for b in batches for i in b) == list(range(30))
        assert sorted(map(len, batches)) == [2] + [4] * 7
        spans = [(min(pair_len[i] for i in b), max(pair_len[i] for i in b)) for b in batches]
        by_length = sorted(spans)
        assert all(hi <= lo for (_, hi), (lo, _) in zip(by_length, by_length[1:])), spans
        assert spans != by_length  # in a shuffled order, not shortest first
        orders.add(tuple(map(tuple, batches)))
    assert len(orders) == 4


def test_pair_stats_by_hand():
    """beta 0.5; chosen log-probs (1, 2) against reference (0, 0): implicit rewards 0.5 and 1; rejected (0, 0)
    against (0, 1): 0 and -0.5. Margin = mean of chosen - rejected = (0.5 + 1.5) / 2 = 1, both pairs won."""
    s = dpo.pair_stats(torch.tensor(0.3), t(1.0, 2.0), t(0.0, 0.0), t(0.0, 0.0), t(0.0, 1.0), beta=0.5)
    assert s == {"loss": pytest.approx(0.3), "rewards/chosen": 0.75, "rewards/rejected": -0.25,
                 "accuracy": 1.0, "margin": 1.0, "logps/chosen": 1.5, "logps/rejected": 0.0}


def test_the_offline_steps_warm_the_learning_rate_up_then_decay_it(tmp_path, monkeypatch):
    """--warmup_iters=2 of 4 steps at lr 1e-4, min_lr 1e-5: 1e-4 x 1/3 and 2/3, then the cosine from 1e-4
    (step 3) to halfway down, 1e-5 + 0.5 x 9e-5 = 5.5e-5 (step 4)."""
    save_online_inputs(tmp_path)
    run_here(monkeypatch, dpo, f"--out_dir={tmp_path}", "--max_iters=4", "--batch_size=2", "--warmup_iters=2",
             "--lr=1e-4", "--min_lr=1e-5", "--eval_interval=10", "--max_new_tokens=8", "--n_eval=1",
             "--device=cpu")
    logs = [json.loads(line) for line in open(tmp_path / "dpo.jsonl")]
    assert [x["lr"] for x in logs] == pytest.approx([1e-4 / 3, 2e-4 / 3, 1e-4, 5.5e-5], rel=1e-9)


def test_prompts_that_leave_no_room_for_a_reply_are_refused_or_left_out_before_training(tmp_path, refusal,
                                                                                       monkeypatch, capsys):
    """What steps 6 and 7 sample is checked before training, not after it: a world held-out prompt with no
    room for --max_new_tokens in the model's 64 tokens is one line, nothing written; the online rounds leave
    out a training prompt too long to answer (said in a line) and refuse a file of only such prompts."""
    save_online_inputs(tmp_path)  # block_size 64
    enc = get_tokenizer("world")
    first = len(dpo.render_prompt(enc, dpo.world.prompts("eval")[0]))
    assert refusal("dpo", f"--out_dir={tmp_path}", "--n_eval=1", f"--max_new_tokens={65 - first}") == (
        f"error: a world prompt is {first} tokens with the chat template; the model's 64 have no room for "
        f"--max_new_tokens={65 - first} more")
    assert not (tmp_path / "dpo.pt").exists() and not (tmp_path / "dpo.jsonl").exists()
    long = "Describe the fox. " * 12
    rows = [{"prompt": [{"role": "user", "content": c}], "responses": ["The fox is red.", "No."],
             "ended": [True, True], "ranking": [0, 1]}
            for c in ("Describe the cat.", "Describe the dog.", long)]
    write(tmp_path / "comparisons.jsonl", rows)
    seen = []
    monkeypatch.setattr(dpo, "online_round", lambda policy, ref, rm, rm_ck, enc, prompts, *a: seen.append(
        prompts) or (_ for _ in ()).throw(SystemExit("stopped")))
    flags = [f"--out_dir={tmp_path}", "--max_iters=1", "--batch_size=2", "--online_rounds=1", "--n_eval=1",
             "--online_prompts=2", "--online_k=2", "--online_pairs=1", "--max_new_tokens=8",
             "--eval_fraction=0.0"]
    with pytest.raises(SystemExit, match="stopped"):
        run_here(monkeypatch, dpo, *flags)
    assert [[p[0]["content"] for p in seen[0]]] == [["Describe the cat.", "Describe the dog."]]
    assert ("online rounds: 1 of 3 training prompts leave no room for --max_new_tokens=8; they are trained "
            "on offline only") in capsys.readouterr().out
    write(tmp_path / "comparisons.jsonl", rows[2:])
    path = tmp_path / "comparisons.jsonl"
    assert refusal("dpo", *flags) == (f"error: no training prompt of {path} leaves room for the online "
                                      "rounds' --max_new_tokens=8 (block_size 64)")


def test_the_online_options_are_checked_only_with_online_rounds(tmp_path, refusal):
    """--online_k=1 leaves no pair per prompt, which matters only when there are online rounds: offline DPO
    (the default) runs past that rule, here to the next check, which stops it."""
    assert refusal("dpo", f"--out_dir={tmp_path}", "--online_k=1", "--loss=ipo", "--label_smoothing=0.1") == (
        "error: --label_smoothing is conservative DPO's; it needs --loss=sigmoid")
    assert refusal("dpo", f"--out_dir={tmp_path}", "--online_k=1", "--online_rounds=1").startswith(
        "error: --online_pairs=2 must be <= online_k / 2 = 0")


def test_a_training_prompt_that_leaves_exactly_max_new_tokens_is_answered_online(tmp_path, monkeypatch):
    """A prompt of block_size - max_new_tokens tokens has room for a whole reply: online rounds keep it."""
    save_online_inputs(tmp_path)  # block_size 64
    enc = get_tokenizer("world")
    exact = "Describe the fox. " * 6
    n = len(dpo.render_prompt(enc, [{"role": "user", "content": exact}]))
    assert n >= len(dpo.render_prompt(enc, dpo.world.prompts("eval")[0]))  # (the held-out prompt fits too)
    rows = [{"prompt": [{"role": "user", "content": c}], "responses": ["The fox is red.", "No."],
             "ended": [True, True], "ranking": [0, 1]} for c in ("Describe the cat.", exact)]
    write(tmp_path / "comparisons.jsonl", rows)
    seen = []
    monkeypatch.setattr(dpo, "online_round", lambda policy, ref, rm, rm_ck, enc, prompts, *a: seen.append(
        prompts) or (_ for _ in ()).throw(SystemExit("stopped")))
    with pytest.raises(SystemExit, match="stopped"):
        run_here(monkeypatch, dpo, f"--out_dir={tmp_path}", "--max_iters=1", "--batch_size=2", "--n_eval=1",
                 "--online_rounds=1", "--online_prompts=2", "--online_k=2", "--online_pairs=1",
                 f"--max_new_tokens={64 - n}", "--eval_fraction=0.0")
    assert sorted(p[0]["content"] for p in seen[0]) == sorted(["Describe the cat.", exact])
