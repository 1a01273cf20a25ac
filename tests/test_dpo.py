"""Correctness of dpo.py: the three losses against hand-worked numbers, the response-only log-prob sum, a
gradient step that widens the margin, the pairs a ranking gives, and a tiny end-to-end run with resume."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dpo  # noqa: E402  (importing must not start the stage)
import model as M  # noqa: E402
import runtime
from data.readers import DataError  # noqa: E402
from data.tokenizer import END, get_tokenizer, special_id  # noqa: E402

TINY = dict(block_size=48, vocab_size=97, n_layer=2, n_head=2, n_embd=32)


def tiny():
    torch.manual_seed(0)
    return M.GPT(M.GPTConfig(**TINY)).eval()


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_policy_equal_to_reference_gives_ln2_and_no_wins():
    lp_c, lp_r = torch.randn(8) * 10, torch.randn(8) * 10
    loss, rc, rr = dpo.dpo_loss(lp_c, lp_r, lp_c.clone(), lp_r.clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # sigma(0) = 1/2 for every pair
    assert (rc == 0).all() and (rr == 0).all()
    assert (rc > rr).float().mean().item() == 0.0  # accuracy counts strict wins only


def test_sigmoid_loss_by_hand():
    # h = (pi_c - ref_c) - (pi_r - ref_r) = (-1 + 2) - (-3 + 2) = 2, beta h = 1
    # loss = -log sigma(1) = log(1 + e^-1) = 0.3132616875...; rewards = beta * log-ratio = +0.5 and -0.5
    loss, rc, rr = dpo.dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, loss_type="sigmoid")
    assert loss.item() == pytest.approx(0.31326168751822286, abs=1e-6)
    assert rc.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)


def test_ipo_loss_by_hand():
    # beta = 0.5, target margin 1/(2 beta) = 1.  pair 1: h = 2 -> (2 - 1)^2 = 1.
    # pair 2: pi_c = -2, pi_r = -1, refs -2: h = 0 - 1 = -1 -> (-1 - 1)^2 = 4.  mean = 2.5
    loss, _, _ = dpo.dpo_loss(t(-1.0, -2.0), t(-3.0, -1.0), t(-2.0, -2.0), t(-2.0, -2.0), beta=0.5, loss_type="ipo")
    assert loss.item() == pytest.approx(2.5, abs=1e-6)


def test_label_smoothed_loss_by_hand():
    # beta h = 1, eps = 0.1: -0.9 log sigma(1) - 0.1 log sigma(-1) = 0.9 * 0.31326169 + 0.1 * 1.31326169
    # = 0.28193552 + 0.13132617 = 0.41326169 (= DPO's loss + eps * beta h, as log sigma(x) - log sigma(-x) = x)
    loss, _, _ = dpo.dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, loss_type="sigmoid", label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.41326168751822285, abs=1e-6)


def test_unknown_loss_type_is_an_error():
    with pytest.raises(ValueError, match="unknown loss"):
        dpo.dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), beta=0.1, loss_type="hinge")


ROW = [5, 6, 7, 8, 9, 10, 11]
MASK = [0, 0, 0, 1, 1, 1, 0]  # prompt 5 6 7, answer 8 9 10, then a token that is not the answer's


def test_summed_logprob_counts_answer_tokens_only():
    m = tiny()
    with torch.no_grad():
        got = dpo.response_logps(m, [ROW], [MASK], pad_id=0, device="cpu")
        logp = torch.log_softmax(m(torch.tensor([ROW]))[0][0], -1)  # (T, V): row t predicts token t+1
    by_hand = sum(logp[i - 1, ROW[i]].item() for i in range(len(ROW)) if MASK[i])  # 8 | 5 6 7, 9 | .., 10 | ..
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


def test_gradient_step_widens_the_margin():
    policy, ref = tiny(), tiny()
    chosen = [[1, 2, 3, 10, 11, 12], [4, 5, 20, 21, 22, 23]]
    rejected = [[1, 2, 3, 30, 31], [4, 5, 40, 41, 42]]
    masks = [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]
    with torch.no_grad():
        ref_lp = dpo.response_logps(ref, chosen + rejected, masks, 0, "cpu")
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)

    def margin_and_loss():
        lp = dpo.response_logps(policy, chosen + rejected, masks, 0, "cpu")  # one forward, chosen over rejected
        loss, rc, rr = dpo.dpo_loss(lp[:2], lp[2:], ref_lp[:2], ref_lp[2:], beta=0.1)
        return (rc - rr).mean().item(), loss

    before, loss = margin_and_loss()
    assert before == pytest.approx(0.0, abs=1e-6)  # policy = reference
    loss.backward()
    opt.step()
    after, _ = margin_and_loss()
    assert after > before + 1e-3


def test_encode_drops_end_of_an_unfinished_answer():
    enc = get_tokenizer("world")
    prompt = [{"role": "user", "content": "Describe the fox."}]
    ids, mask = dpo.encode(enc, prompt, "The fox is red.", True, 256)
    cut, cut_mask = dpo.encode(enc, prompt, "The fox is red.", False, 256)
    assert ids[-1] == special_id(enc, END) and mask[-1] == 1
    assert cut == ids[:-1] and cut_mask == mask[:-1]  # the user turn's <|end|> stays, the answer's goes
    assert sum(cut_mask) == len(enc.encode_ordinary("The fox is red."))
    short, short_mask = dpo.encode(enc, prompt, "The fox is red.", True, 5)
    assert short == ids[:5] and len(short_mask) == 5


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
    # 4 answers -> 6 pairs, the better-ranked one chosen; "b" vs "b" (identical, both ended) carries no preference
    assert texts == [("c", "a"), ("c", "b"), ("c", "b"), ("a", "b"), ("a", "b")]
    assert responses[2] == (p, "c", False)


def test_trl_pairs_and_bad_lines(tmp_path):
    path = tmp_path / "prefs.jsonl"
    write(path, [{"prompt": "Describe the fox.", "chosen": "The fox is red.", "rejected": "You are dumb."}])
    responses, pairs = dpo.load_pairs(str(path))
    assert [(responses[c][1], responses[r][1]) for _, c, r in pairs] == [("The fox is red.", "You are dumb.")]
    write(path, [{"prompt": [{"role": "user", "content": "Hi."}], "responses": ["a", "b"], "ranking": [0, 1]},
                 {"prompt": [{"role": "user", "content": "Hi."}], "responses": ["a", "b"], "ranking": [0, 0]}])
    with pytest.raises(DataError, match=r"prefs.jsonl:2: "):
        dpo.load_pairs(str(path))


def test_tiny_run_logs_saves_and_resumes(tmp_path):
    enc = get_tokenizer("world")
    args = dict(block_size=64, vocab_size=enc.n_vocab, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    torch.manual_seed(0)
    runtime.save_checkpoint(str(tmp_path / "sft.pt"), {"model": M.GPT(M.GPTConfig(**args)).state_dict(), "model_args": args,
                                                 "config": {}, "kind": "sft", "step": 0, "tokenizer": "world"})
    rows = [{"prompt": [{"role": "user", "content": f"Describe the {a}."}],
             "responses": [f"The {a} is red.", f"The {a} is sad.", "You are dumb."], "ended": [True, True, False],
             "ranking": [0, 1, 2]} for a in ("fox", "cat", "dog", "owl", "frog", "bird", "duck", "bear")]
    write(tmp_path / "comparisons.jsonl", rows)
    flags = [f"--out_dir={tmp_path}", "--batch_size=4", "--eval_interval=2", "--max_new_tokens=8",
             "--eval_fraction=0.25", "--n_eval=8"]
    run = lambda *a: subprocess.run([sys.executable, "dpo.py", *flags, *a], cwd=ROOT, capture_output=True,
                                    text=True, timeout=300)
    r = run("--max_iters=3", "--online_rounds=0")  # offline DPO first: no reward model here yet
    assert r.returncode == 0, r.stderr[-2000:]
    assert "dpo wins" in r.stdout and "KL(dpo || sft)" in r.stdout
    logs = [json.loads(line) for line in open(tmp_path / "dpo.jsonl")]
    assert [x["iter"] for x in logs] == [1, 2, 3] and len({tuple(x) for x in logs}) == 1  # same keys every step
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1's batch: policy = reference
    assert logs[1]["val/accuracy"] is not None and logs[0]["val/accuracy"] is None
    ck = runtime.load_checkpoint(str(tmp_path / "dpo.pt"), "dpo")
    assert ck["step"] == 3 and ck["tokenizer"] == "world"
    r = run("--max_iters=4", "--resume=True", "--online_rounds=0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert runtime.load_checkpoint(str(tmp_path / "dpo.pt"), "dpo")["step"] == 4
    assert [json.loads(line)["iter"] for line in open(tmp_path / "dpo.jsonl")] == [1, 2, 3, 4]
    # online DPO after the offline steps: one round of fresh answers judged by a (random) reward model
    rm_args = {**args, "scalar_head": True}
    runtime.save_checkpoint(str(tmp_path / "reward.pt"), {"model": M.GPT(M.GPTConfig(**rm_args)).state_dict(),
                                                    "model_args": rm_args, "config": {}, "kind": "reward", "step": 0,
                                                    "tokenizer": "world", "gain": 1.0, "bias": 0.0, "lm_weight": 0.05})
    r = run("--max_iters=4", "--resume=True", "--online_rounds=1", "--online_prompts=4", "--online_k=3",
            "--online_pairs=1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "online round 1/1: 4 prompts x 3 answers" in r.stdout
    ck = runtime.load_checkpoint(str(tmp_path / "dpo.pt"), "dpo")
    assert ck["step"] == 4 and ck["round"] == 1
    logs = [json.loads(line) for line in open(tmp_path / "dpo.jsonl")]
    assert [x["iter"] for x in logs] == [1, 2, 3, 4, 5] and logs[-1]["round"] == 1  # 4 prompts: one step of 4 pairs


def test_online_pairs_are_best_and_worst_by_hand():
    reply = lambda text, ended=True: {"text": text, "ended": ended}
    replies = [reply("a"), reply("b"), reply("c"),        # prompt 1: best is 1 (0.9), worst is 0 (0.1)
               reply("d"), reply("e"), reply("f"),        # prompt 2: all tie: no pair
               reply("g"), reply("h"), reply("g"),        # prompt 3: best 6 and worst 8 are the same text: no pair
               reply("i"), reply("i", False), reply("j")]  # prompt 4: same text, but one never ended: a pair
    scores = [0.1, 0.9, 0.5, 0.2, 0.2, 0.2, 0.8, 0.3, 0.1, 0.7, -0.4, 0.0]
    assert dpo.best_and_worst(scores, replies, 3) == [(1, 0), (9, 10)]
    # two pairs per prompt from 4 replies: best vs worst, then second best vs second worst
    replies = [reply(t) for t in "abcdefgh"]
    scores = [0.3, 0.9, 0.1, 0.5,   0.2, 0.8, 0.5, 0.5]  # prompt 2: the inner pair ties, so it gives no pair
    assert dpo.best_and_worst(scores, replies, 4, n=2) == [(1, 2), (3, 0), (5, 4)]
