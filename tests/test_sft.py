"""SFT: the loss counts assistant tokens only (data.chat.sft_example, sft.sft_batch and sft.sft_loss, as
sft.py builds its batches), an all-masked batch is harmless, and sft.py resumes exactly, rejects bad options,
data and checkpoints in one line without touching out_dir, and stops at the first non-finite loss keeping the
last good checkpoint."""
import contextlib
import hashlib
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
import runtime  # noqa: E402
from data.chat import render, render_prompt, sft_example  # noqa: E402
import sft  # noqa: E402
from sft import sft_batch, sft_loss  # noqa: E402  (importing sft.py runs nothing)
from conftest import capture_grads, resume_lines, run_here, torchrun_launcher  # noqa: E402
from data.tokenizer import ASSISTANT, END, EOT, USER, get_tokenizer, special_id  # noqa: E402

ENC = get_tokenizer("world")
PAD = special_id(ENC, EOT)
CONVS = [
    [{"role": "user", "content": "Describe the owl."},
     {"role": "assistant", "content": "The owl is calm. The owl sleeps in the forest."},
     {"role": "user", "content": "Tell me more about it."}],  # a trailing user turn: nothing after is learned
    [{"role": "system", "content": "Be kind."},
     {"role": "user", "content": "Where does Tom live?"},
     {"role": "assistant", "content": "Tom lives in the park."}],  # shorter: this row gets padding
]


def tiny(block_size=64):
    torch.manual_seed(0)
    return M.GPT(M.GPTConfig(block_size=block_size, vocab_size=ENC.n_vocab, n_layer=2, n_head=2, n_embd=32))


def batch(convs, block_size=64):
    return sft_batch([sft_example(ENC, c, block_size) for c in convs], PAD)


def loss_of(m, x, y, attn):
    return m(x, y, attention_mask=attn)[1]


def test_targets_are_the_next_assistant_token_or_ignored():
    ids, mask = render(ENC, CONVS[0])
    x, y = sft_example(ENC, CONVS[0])
    assert x == ids[:-1] and len(y) == len(x)
    for t in range(len(x)):
        assert y[t] == (ids[t + 1] if mask[t + 1] else -1)
    learned = [ENC.decode([t]) for t in y if t != -1]
    assert "".join(learned) == "The owl is calm. The owl sleeps in the forest.<|end|>"
    # role markers, user words and the user's <|end|> are never targets
    assert special_id(ENC, USER) not in y and special_id(ENC, ASSISTANT) not in y
    assert y.count(special_id(ENC, END)) == 1
    xs, ys = sft_example(ENC, CONVS[0], block_size=5)
    assert (xs, ys) == (x[:5], y[:5])


def test_padding_is_right_and_ignored():
    x, y, attn = batch(CONVS)
    n1 = len(sft_example(ENC, CONVS[1])[0])
    assert attn[1].tolist() == [1] * n1 + [0] * (x.size(1) - n1)  # real tokens first, then padding
    assert (y[1, n1:] == -1).all() and (x[1, n1:] == PAD).all()


def test_loss_ignores_user_tokens_and_padding_but_not_assistant_tokens():
    m = tiny()
    x, y, attn = batch(CONVS)
    base = loss_of(m, x, y, attn).item()
    # the same batch with the trailing user turn reworded (to as many tokens, so the shapes match)
    other = [CONVS[0][:2] + [{"role": "user", "content": "Tell me more about them."}], CONVS[1]]
    x2, y2, attn2 = batch(other)
    assert x2.shape == x.shape and not torch.equal(x2, x)
    assert loss_of(m, x2, y2, attn2).item() == pytest.approx(base, abs=1e-6)
    # padding ids replaced by arbitrary tokens: masked out of attention and of the loss
    x3 = x.clone()
    x3[attn == 0] = torch.randint(0, ENC.n_vocab, (int((attn == 0).sum()),))
    assert loss_of(m, x3, y, attn).item() == pytest.approx(base, abs=1e-6)
    # one assistant word changed: the loss must move
    sad = {"role": "assistant", "content": "The owl is sad. The owl sleeps in the forest."}
    other = [[CONVS[0][0], sad, CONVS[0][2]], CONVS[1]]
    x4, y4, attn4 = batch(other)
    assert x4.shape == x.shape
    assert abs(loss_of(m, x4, y4, attn4).item() - base) > 1e-4


def test_gradient_reaches_only_positions_that_predict_assistant_tokens():
    m = tiny()
    x, y, attn = batch(CONVS)
    logits = m(x, attention_mask=attn)[0].detach().requires_grad_(True)
    loss = sft_loss(logits, y)  # what sft.py trains on
    loss.backward()
    touched = logits.grad.abs().sum(-1) > 0  # (B, T)
    assert torch.equal(touched, y != -1)
    n = (y != -1).sum()
    manual = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1,
                                               reduction="sum") / n
    assert loss.item() == pytest.approx(manual.item(), abs=1e-6)
    assert loss.item() == pytest.approx(loss_of(m, x, y, attn).item(), abs=1e-6)  # model.py's loss agrees


def test_sft_loss_by_hand():
    """L_SFT is the mean of -log p(target) over the positions whose target is not -1."""
    logits = torch.zeros(1, 4, 2)
    logits[0, 0, 1] = math.log(3)      # p = (1/4, 3/4)
    logits[0, 1] = torch.tensor([100.0, -100.0])  # a confident miss, but its target is ignored
    logits[0, 3, 0] = math.log(3)      # p = (3/4, 1/4)
    targets = torch.tensor([[1, -1, -1, 1]])
    # positions 0 and 3 count: -log(3/4) and -log(1/4); positions 1 and 2 are ignored
    expect = (math.log(4 / 3) + math.log(4)) / 2
    assert sft_loss(logits, targets).item() == pytest.approx(expect, abs=1e-6)
    targets = torch.tensor([[1, -1, 0, -1]])  # position 2: uniform, -log(1/2)
    assert sft_loss(logits, targets).item() == pytest.approx((math.log(4 / 3) + math.log(2)) / 2, abs=1e-6)
    assert sft_loss(logits, torch.full((1, 4), -1)).item() == 0.0  # nothing to learn: 0, not NaN


def test_all_masked_batch_gives_zero_loss_and_finite_gradients():
    m = tiny()
    # cut so short that no assistant token is left: every target is -1
    x, y, attn = batch(CONVS, block_size=3)
    assert (y == -1).all()
    loss = loss_of(m, x, y, attn)
    assert loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and (g == 0).all() for g in grads)


# ---- sft.py end to end on a tiny base model

TINY = ["--batch_size=4", "--max_iters=6", "--eval_interval=3", "--eval_iters=1", "--warmup_iters=2",
        "--compare=False"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    m = tiny(block_size=64)  # shorter than the longest demonstration: the truncation warning fires
    runtime.save_checkpoint(str(d / "base.pt"), {"model": m.state_dict(), "model_args": vars(m.config).copy(),
                                                 "kind": "base", "step": 0, "tokenizer": "world"})
    return d


def run(out, *args):
    r = subprocess.run([sys.executable, "sft.py", f"--out_dir={out}", *TINY, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    return r


def test_resume_continues_with_the_same_losses(base_dir, tmp_path):
    for name in ("a", "b"):
        os.makedirs(tmp_path / name)
        os.link(base_dir / "base.pt", tmp_path / name / "base.pt")
    r = run(tmp_path / "a")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "longer than block_size=64" in r.stdout
    full = [json.loads(line) for line in open(tmp_path / "a" / "sft.jsonl")]
    assert run(tmp_path / "b", "--stop_at=3").returncode == 0  # as if killed after the step-3 checkpoint
    assert run(tmp_path / "b", "--resume=True").returncode == 0
    resumed = [json.loads(line) for line in open(tmp_path / "b" / "sft.jsonl")]
    assert [r["iter"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, resumed):  # same batches, same weights, same optimizer state: same losses, to a
        # few fp32 roundings of a loss near ln(vocab) (the BLAS may sum in another order in another process)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), (a, b)
    ck = torch.load(tmp_path / "b" / "sft.pt", weights_only=True)
    assert ck["kind"] == "sft" and ck["step"] == 6 and ck["tokenizer"] == "world"
    # a new --dropout on resume
    assert run(tmp_path / "b", "--resume=True", "--max_iters=7", "--dropout=0.2").returncode == 0
    assert torch.load(tmp_path / "b" / "sft.pt", weights_only=True)["model_args"]["dropout"] == 0.2
    # a run started from --init=<GPT-2 weights> compares, once resumed, with those weights, not with base.pt
    ck["config"]["init"] = str(tmp_path / "gpt2")
    runtime.save_checkpoint(str(tmp_path / "b" / "sft.pt"), ck)
    r = run(tmp_path / "b", "--resume=True", "--compare=True")
    last = r.stderr.strip().splitlines()[-1]  # after the (finished) progress bar
    assert r.returncode == 1 and last == f"error: {tmp_path / 'gpt2'} not found " \
        "(expected a GPT-2 directory, model.safetensors or pytorch_model.bin)", r.stderr[-2000:]
    # read before training: a run with steps left trained them, rewriting sft.pt and its log, then failed
    files = [tmp_path / "b" / f for f in ("sft.pt", "sft.jsonl")]
    before = [f.read_bytes() for f in files]
    r = run(tmp_path / "b", "--resume=True", "--compare=True", "--max_iters=9")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'gpt2'} not")
    assert [f.read_bytes() for f in files] == before
    # a base.pt made anew with a shorter context: the comparison's prompts had no room (a traceback)
    ck["config"]["init"] = ""
    runtime.save_checkpoint(str(tmp_path / "b" / "sft.pt"), ck)
    m = tiny(block_size=32)
    runtime.save_checkpoint(str(tmp_path / "b" / "base.pt"), {
        "model": m.state_dict(), "kind": "base", "step": 0, "model_args": vars(m.config).copy(),
        "tokenizer": "world"})
    before = [f.read_bytes() for f in files]
    r = run(tmp_path / "b", "--resume=True", "--compare=True", "--max_iters=9")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'b' / 'base.pt'} is another network than the SFT model it resumes "
        "(block_size 32 vs 64); --compare=False skips the comparison"), r.stderr[-2000:]
    assert [f.read_bytes() for f in files] == before


def test_torchrun_two_processes_on_cpu(base_dir, tmp_path):
    os.link(base_dir / "base.pt", tmp_path / "base.pt")
    launcher = torchrun_launcher()
    r = subprocess.run([*launcher, "sft.py", f"--out_dir={tmp_path}", "--device=cpu", *TINY], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    log = [json.loads(line) for line in open(tmp_path / "sft.jsonl")]
    assert [r["iter"] for r in log] == [1, 2, 3, 4, 5, 6]  # only rank 0 logs
    ck = torch.load(tmp_path / "sft.pt", weights_only=True)
    assert ck["kind"] == "sft" and ck["step"] == 6


def test_bad_data_file_is_one_clear_line_and_nothing_is_written(base_dir, tmp_path):
    os.link(base_dir / "base.pt", tmp_path / "base.pt")
    bad = tmp_path / "chats.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "Hi"}, '
                   '{"role": "assistant", "content": "Hello."}]}\n'
                   '{"messages": [{"role": "robot", "content": "Hi"}]}\n')
    r = run(tmp_path, f"--data={bad}")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"error: {bad}:2: 'messages': messages[0].role must be one of "
                                             "system, user, assistant, got 'robot'"]
    assert not os.path.exists(tmp_path / "sft.pt") and not os.path.exists(tmp_path / "sft.jsonl")


def test_conversations_too_long_to_learn_anything_are_one_line_and_nothing_is_touched(used_dir):
    """Every reply cut off by block_size: the run trained at loss 0 on no token and replaced sft.pt."""
    long = {"messages": [{"role": "user", "content": "Describe the owl. " * 40},
                         {"role": "assistant", "content": "The owl is calm."}]}
    path = used_dir / "long.jsonl"
    path.write_text((json.dumps(long) + "\n") * 20)
    before = files_of(used_dir)
    r = run(used_dir, f"--data={path}")
    last = (r.stderr.strip().splitlines() or [""])[-1]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert last == (f"error: {path}: no assistant token of the training conversations fits in block_size=64; "
                    "shorter ones, or a longer context"), last
    assert files_of(used_dir) == before


def files_of(d):
    """{name: sha256} of every file in d: what a failed run must leave exactly as it was."""
    return {p: hashlib.sha256(open(os.path.join(d, p), "rb").read()).hexdigest()
            for p in sorted(os.listdir(d))}


def save_tiny_sft(path, **model_args):
    """An SFT checkpoint with what --resume reads (these tests' checks come before its optimizer is used)."""
    m = tiny(block_size=64)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = runtime.training_state(m, torch.optim.AdamW(m.parameters()), scaler)
    runtime.save_checkpoint(str(path), {**state, "kind": "sft", "step": 3,
                                        "tokenizer": "world", "model_args": {**vars(m.config), **model_args}})


@pytest.fixture
def used_dir(base_dir, tmp_path):
    """An out_dir that holds the files of an earlier run: base.pt, sft.pt and sft.jsonl."""
    os.link(base_dir / "base.pt", tmp_path / "base.pt")
    save_tiny_sft(tmp_path / "sft.pt")
    (tmp_path / "sft.jsonl").write_text('{"iter": 1, "loss": 6.0}\n')
    return tmp_path


BAD_OPTIONS = ["--grad_accum=0", "--batch_size=0", "--lr=-1", "--eval_interval=0", "--max_iters=0",
               "--eval_iters=0", "--beta2=1.0", "--dropout=1.0", "--temperature=0", "--dtype=float64"]


def test_bad_options_are_one_line_and_touch_nothing(used_dir, refusal):
    before = files_of(used_dir)
    assert refusal("sft", f"--out_dir={used_dir}", "--grad_accum=0") == (
        "error: --grad_accum=0 is out of range: it must be >= 1")
    for bad in BAD_OPTIONS:  # each checked before anything is read or written
        msg = refusal("sft", f"--out_dir={used_dir}", bad)
        assert msg.startswith(f"error: {bad.split('=')[0]}=") and "\n" not in msg, (bad, msg)
    assert files_of(used_dir) == before


def test_resume_from_a_checkpoint_that_does_not_fit_is_one_line(used_dir, refusal):
    path = used_dir / "sft.pt"
    save_tiny_sft(path, n_embd=64)  # model_args that its weights do not fit
    before = files_of(used_dir)
    msg = refusal("sft", f"--out_dir={used_dir}", "--resume=True")
    assert msg.startswith(f"error: {path}: the weights do not fit") and "\n" not in msg, msg
    save_tiny_sft(path, vocab_size=100)  # a vocabulary smaller than its tokenizer's
    before = files_of(used_dir)
    msg = refusal("sft", f"--out_dir={used_dir}", "--resume=True")
    assert msg.startswith(f"error: {path}: its vocabulary (100) is smaller") and "\n" not in msg, msg
    assert files_of(used_dir) == before


def test_non_finite_loss_stops_in_one_line_and_keeps_the_last_good_checkpoint(used_dir):
    good = files_of(used_dir)["sft.pt"]
    # a learning rate this large overflows the weights in the first step; the first checkpoint would be at 5
    r = run(used_dir, "--lr=1e30", "--max_iters=10", "--eval_interval=5")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr[-2000:]
    assert re.match(r"error: sft step [1-4]: (loss|grad_norm) is (nan|inf|-inf) \(not finite\); stopped, "
                    r"the last good checkpoint is kept; try a lower --lr$", errors[0]), errors[0]
    assert files_of(used_dir)["sft.pt"] == good and not os.path.exists(used_dir / "sft.pt.tmp")


def prompt_rendering_to(n_tokens):
    """A one-turn prompt whose rendered conversation (data.chat.render) is exactly n_tokens long."""
    words = ("The owl is calm. " * n_tokens).split()
    for k in range(1, len(words) + 1):
        p = [{"role": "user", "content": " ".join(words[:k])}]
        if len(render(ENC, p)[0]) == n_tokens:
            return p
    raise AssertionError(f"no prefix of the owl text renders to {n_tokens} tokens")


def test_a_held_out_prompt_that_fills_the_context_is_skipped_not_a_crash(base_dir, tmp_path):
    """The before/after comparison samples held-out prompts with <|assistant|> appended: a prompt that renders
    to block_size - 1 tokens becomes block_size tokens, with no room for a reply; it once passed the filter
    (which measured it without the marker) and generate() stopped the run with a traceback."""
    os.link(base_dir / "base.pt", tmp_path / "base.pt")
    reply = {"role": "assistant", "content": "The owl is calm."}
    full, fits = prompt_rendering_to(63), prompt_rendering_to(61)  # + <|assistant|>: 64 and 62 of 64
    convs = [[{"role": "user", "content": "Describe the owl."}, reply]] * 38
    convs += [full + [reply], fits + [reply]]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))  # 40: the last 2 held out
    r = run(tmp_path, f"--data={data}", "--compare=True", "--max_new_tokens=4")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    shown = r.stdout.splitlines()
    assert "  " + fits[0]["content"] in shown  # a prompt with room for a reply is still compared
    assert "  " + full[0]["content"] not in shown


def test_resume_with_no_checkpoint_is_one_line_before_anything_is_built(tmp_path, refusal, monkeypatch):
    """--resume=True in an out_dir with no sft.pt must say so at once: it once built the missing base model
    first (a whole pretrain.py run, writing base.pt) and only then found nothing to resume."""
    built = []
    monkeypatch.setattr(runtime, "ensure_checkpoint", lambda *a: built.append(a))
    msg = refusal("sft", f"--out_dir={tmp_path}", "--resume=True")
    assert msg == f"error: checkpoint {tmp_path / 'sft.pt'} not found"
    assert built == [] and not os.listdir(tmp_path)


def test_a_step_split_into_micro_batches_has_the_gradient_of_the_whole_step(base_dir, tmp_path, monkeypatch):
    """L_SFT is a mean over the step's assistant tokens. With --grad_accum=2, or a batch cut into pieces by
    length (--length_groups=2), the gradient must be the one a single batch of both halves gives, although the
    halves hold different numbers of assistant tokens: the mean of the two halves' means would weigh each
    token of the half with fewer of them more."""
    import sft
    long, short = CONVS[0][:2], [CONVS[1][1], {"role": "assistant", "content": "Tom."}]
    data = tmp_path / "chats.jsonl"  # rows 0-1 long answers, rows 2-3 short ones; the last is held out
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in [long, long, short, short, long]))
    monkeypatch.setattr(sft, "train_batch", lambda rows, batch_size, seed, it, micro, rank, pad_id: sft_batch(
        rows[micro * batch_size:(micro + 1) * batch_size], pad_id))  # micro-batch m: rows in order
    widths, cut = [], sft.cut_by_length  # the widths of the pieces the step trains on
    monkeypatch.setattr(sft, "cut_by_length", lambda b, g: [p for p in cut(b, g) if not widths.append(
        p[0].size(1))])
    grads = capture_grads(monkeypatch)
    for batch_size, accum, groups in ((4, 1, 1), (2, 2, 1), (4, 1, 2)):
        d = tmp_path / f"{accum}_{groups}"
        os.makedirs(d)
        os.link(base_dir / "base.pt", d / "base.pt")
        widths.clear()
        run_here(monkeypatch, sft, f"--out_dir={d}", f"--data={data}", "--dropout=0.0",
                 f"--batch_size={batch_size}", f"--grad_accum={accum}", f"--length_groups={groups}",
                 "--max_iters=1", "--compare=False", "--eval_iters=1", "--device=cpu")  # fp32 on any machine
    x, y = zip(*(sft_example(ENC, c, 64) for c in (short, long)))
    assert widths[:2] == [len(x[0]), len(x[1])]  # the last run's pieces: the short rows, then the long ones
    assert sum(t != -1 for t in y[1]) > 2 * sum(t != -1 for t in y[0])  # the halves differ: the test can fail
    for g in grads[1:]:
        assert torch.allclose(grads[0], g, rtol=1e-4, atol=1e-7), (grads[0] - g).abs().max()


def test_a_batch_cut_by_length_keeps_every_row_and_drops_only_padding():
    """Rows of lengths 3, 1, 4, 1, 5 (right-padded to 5) in 2 pieces: sorted by length, the shortest three
    padded to 3 and the longest two to 5; every row's tokens, targets and mask come through unchanged. More
    pieces than rows gives one row a piece, never an empty piece."""
    lengths = [3, 1, 4, 1, 5]
    rows = [([10 * i + t for t in range(n)], [t if t % 2 else -1 for t in range(n)])
            for i, n in enumerate(lengths)]
    batch = ids, targets, attn = sft_batch(rows, PAD)
    pieces = sft.cut_by_length(batch, 2)
    short = [1, 3, 0]
    assert [p[0].shape for p in pieces] == [(3, 3), (2, 5)]
    assert torch.equal(pieces[0][0], ids[short, :3]) and torch.equal(pieces[1][0], ids[[2, 4]])
    assert torch.equal(pieces[0][1], targets[short, :3]) and torch.equal(pieces[0][2], attn[short, :3])
    assert torch.equal(pieces[1][1], targets[[2, 4]]) and torch.equal(pieces[1][2], attn[[2, 4]])
    assert (targets[short, 3:] == -1).all() and (attn[short, 3:] == 0).all()  # what was cut was padding
    assert [p[0].shape for p in sft.cut_by_length(batch, 8)] == [(1, n) for n in sorted(lengths)]
    assert len(whole := sft.cut_by_length(batch, 1)) == 1 and all(map(torch.equal, whole[0], batch))  # as drawn


def test_held_out_loss_is_the_mean_over_all_assistant_tokens_of_its_batches():
    """Batches of one row each, a long answer (n_a assistant tokens, mean loss l_a) and a short one (n_b,
    l_b): the held-out loss is (n_a l_a + n_b l_b) / (n_a + n_b), the loss of one batch of both rows, not the
    mean of the two batches' means (l_a + l_b) / 2, which would weigh each token of the short answer more."""
    import contextlib
    import sft
    m = tiny().eval()
    short = [CONVS[1][1], {"role": "assistant", "content": "Tom."}]
    rows = [sft_example(ENC, c, 64) for c in (CONVS[0], short)]
    n = [sum(t != -1 for t in y) for _, y in rows]
    assert n[0] > 2 * n[1]  # unequal halves: the test can fail
    with torch.no_grad():
        l = [sft_loss(m(x, attention_mask=a)[0], y).item() for x, y, a in (sft_batch([r], PAD) for r in rows)]
        x, y, attn = sft_batch(rows, PAD)
        whole = sft_loss(m(x, attention_mask=attn)[0], y).item()
    assert whole == pytest.approx((n[0] * l[0] + n[1] * l[1]) / (n[0] + n[1]), rel=1e-5)
    assert abs(whole - (l[0] + l[1]) / 2) > 1e-3  # the mean of means is another number
    got = sft.held_out_loss(m, rows, 1, 2, PAD, "cpu", contextlib.nullcontext())  # batch_size 1, 2 batches
    assert got == pytest.approx(whole, rel=1e-5)
    assert sft.held_out_loss(m, rows, 2, 1, PAD, "cpu", contextlib.nullcontext()) == pytest.approx(whole)
    assert sft.held_out_loss(m, rows, 2, 1, PAD, "cpu", contextlib.nullcontext(), 2) == pytest.approx(whole)


def test_micro_steps_and_ranks_past_a_field_width_draw_their_own_batches():
    """The batch generator's seed hashes (seed, step, micro-step, rank) whole; a key packed into fixed bit
    widths gave micro-step 64 of step 0 the batch of micro-step 0 of step 1 (and rank 1024 that of rank 0)."""
    import sft
    rows = [sft_example(ENC, CONVS[i % 2], 64) for i in range(500)]
    rows = [(x + [PAD] * (i % 7), y + [-1] * (i % 7)) for i, (x, y) in enumerate(rows)]  # 14 kinds of row

    def draw(it, micro, rank):
        return sft.train_batch(rows, 16, 1337, it, micro, rank, PAD)[0]
    assert not torch.equal(draw(0, 64, 0), draw(1, 0, 0))
    assert not torch.equal(draw(0, 0, 1024), draw(0, 1, 0))
    assert torch.equal(draw(3, 2, 1), draw(3, 2, 1))  # and the same key, the same batch: resume is exact


@pytest.mark.parametrize("rows", [257, 304, 100])
def test_gpt2_weights_give_the_chat_markers_rows_at_the_mean_embedding(monkeypatch, rows):
    """--init: the markers take the rows after <|endoftext|>, appended to GPT-2's table or inside one padded
    past them (nanoGPT's 50304 rows was a traceback); a padded table is cut to the tokenizer's vocabulary, so
    no sampled id is one decode has no text for (a KeyError); a table smaller than GPT-2's vocabulary is one
    line. Offline here, so a stand-in tokenizer knows 257 tokens (<|endoftext|> 256), the markers 257..260."""
    import tiktoken
    import sft
    from data.tokenizer import PAT, SPECIALS
    base = tiktoken.Encoding(name="gpt2", pat_str=PAT, mergeable_ranks={bytes([b]): b for b in range(256)},
                             special_tokens={EOT: 256})
    enc = tiktoken.Encoding(name="gpt2-chat", pat_str=PAT, mergeable_ranks=base._mergeable_ranks,
                            special_tokens={EOT: 256, **{s: 257 + i for i, s in enumerate(SPECIALS[1:])}})
    monkeypatch.setattr(sft, "get_tokenizer", lambda name: enc)
    torch.manual_seed(0)
    gpt2 = M.GPT(M.GPTConfig(block_size=16, vocab_size=rows, n_layer=1, n_head=2, n_embd=8))
    monkeypatch.setattr(sft, "load_gpt2", lambda path, **kw: gpt2)
    if rows < 257:
        with pytest.raises(SystemExit, match="^error: gpt2dir: an embedding of 100 tokens, fewer than GPT-2"):
            sft.load_base("gpt2dir", None, 0.0)
        return
    model, args, name = sft.load_base("gpt2dir", None, 0.0)
    wte, old = model.transformer.wte.weight.detach(), gpt2.transformer.wte.weight.detach()
    assert name == "gpt2" and args["vocab_size"] == wte.size(0) == enc.n_vocab == 261
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied: the logits cover 261 ids too
    torch.testing.assert_close(wte[:257], old[:257])  # GPT-2's own rows are kept
    torch.testing.assert_close(wte[257:261], old[:257].mean(0).expand(4, -1))  # the markers: the mean
    # every id a sample can take is one the tokenizer decodes
    assert model(torch.tensor([[256]]))[0].size(-1) == enc.n_vocab
    enc.decode(list(range(enc.n_vocab)))


def test_two_processes_on_the_same_batches_log_the_one_process_loss(base_dir, tmp_path):
    """Each process divides its summed loss by the step's assistant tokens over all processes / world_size,
    so that DDP's average of the gradients is the gradient of the mean over every token. Two processes given
    the same batches (train_batch told rank 0 in both) must then log the loss of one process alone; dividing
    by the total count alone would log half of it and halve every gradient."""
    for d in ("one", "two"):
        os.makedirs(tmp_path / d)
        os.link(base_dir / "base.pt", tmp_path / d / "base.pt")
    flags = ["--device=cpu", "--max_iters=2", "--dropout=0.0"]  # dropout draws differ by rank
    assert run(tmp_path / "one", *flags).returncode == 0
    same = tmp_path / "same_batches.py"
    same.write_text(f"import sys; sys.path.insert(0, {ROOT!r}); import sft\n"
                    "real = sft.train_batch\n"
                    "sft.train_batch = lambda rows, b, seed, it, m, rank, eot: "
                    "real(rows, b, seed, it, m, 0, eot)\n"
                    "sft.main()\n")
    launcher = torchrun_launcher()
    r = subprocess.run([*launcher, str(same), f"--out_dir={tmp_path / 'two'}", *TINY, *flags], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    one, two = ([json.loads(line) for line in open(tmp_path / d / "sft.jsonl")] for d in ("one", "two"))
    assert two[0]["targets"] == 2 * one[0]["targets"]  # the count is over both processes
    for a, b in zip(one, two):  # step 2 too: the averaged gradient was the one process's
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)


def test_fewer_assistant_tokens_than_processes_still_give_the_mean_gradient(base_dir, tmp_path):
    """The zero-count guard acts on the step's count over all processes: one assistant token on rank 0 and
    none on rank 1 must average to the gradient of that one token alone. Guarding count / world_size
    instead (max(1/2, 1) = 1) would halve it."""
    script = tmp_path / "one_token.py"
    script.write_text(
        f"import os, sys, torch; sys.path.insert(0, {ROOT!r}); import runtime, sft\n"
        "real_batch, real_step = sft.train_batch, runtime.optimizer_step\n"
        "def one_token(rows, b, seed, it, m, rank, eot):  # rank 0: one target; other ranks: none\n"
        "    x, y, attn = real_batch(rows, b, seed, it, m, 0, eot)\n"
        "    first = (y.flatten() != -1).nonzero()[0]\n"
        "    keep = torch.full_like(y.flatten(), -1)\n"
        "    if rank == 0:\n"
        "        keep[first] = y.flatten()[first]\n"
        "    return x, keep.view_as(y), attn\n"
        "def step(model, optimizer, scaler, grad_clip):  # the gradient DDP averaged, before it steps\n"
        "    if os.environ.get('RANK', '0') == '0':\n"
        "        g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])\n"
        "        torch.save(g, os.path.join(sft.out_dir, 'grad.pt'))\n"
        "    return real_step(model, optimizer, scaler, grad_clip)\n"
        "sft.train_batch, runtime.optimizer_step = one_token, step\n"
        "runtime.run(sft.main)\n")
    flags = [*TINY, "--device=cpu", "--max_iters=1", "--dropout=0.0"]
    for d, launcher in (("one", [sys.executable]), ("two", list(torchrun_launcher()))):
        os.makedirs(tmp_path / d)
        os.link(base_dir / "base.pt", tmp_path / d / "base.pt")
        r = subprocess.run([*launcher, str(script), f"--out_dir={tmp_path / d}", *flags], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    one, two = (torch.load(tmp_path / d / "grad.pt") for d in ("one", "two"))
    torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-7)


def test_train_batch_draws_every_conversation_with_replacement():
    rows = [([i + 1, i + 1], [i + 1, -1]) for i in range(3)]
    seen = set()
    for it in range(4):
        ids, _, _ = sft.train_batch(rows, 16, 0, it, 0, 0, pad_id=0)
        assert ids.shape == (16, 2)  # more than len(rows): drawn with replacement
        seen |= set(ids[:, 0].tolist())
    assert seen == {1, 2, 3}  # the last conversation is drawn too


def test_held_out_prompts_are_the_held_out_conversations_that_end_with_a_user_turn_and_its_reply():
    """The before/after comparison asks the held-out conversations again, less their last reply: only those
    whose last reply answers a user turn (one after a system message or another reply has no question)."""
    u, a = {"role": "user", "content": "Describe the owl."}, {"role": "assistant", "content": "It is calm."}
    s = {"role": "system", "content": "Be kind."}
    convs = [[u, a], [u, a, u, a], [s, a], [u, a, a], [s, u, a]]
    assert sft.held_out_prompts(convs, 4, True) == [[u, a, u], [s, u]]
    assert sft.held_out_prompts(convs, 4, False) == sft.world.prompts("eval")


def test_the_last_five_percent_of_the_conversations_are_held_out(base_dir, tmp_path, monkeypatch, capsys):
    os.link(base_dir / "base.pt", tmp_path / "base.pt")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS * 20))  # 40 conversations
    run_here(monkeypatch, sft, f"--out_dir={tmp_path}", f"--data={data}", "--max_iters=1", "--compare=False",
             "--eval_iters=1", "--batch_size=2", "--device=cpu")
    assert re.search(r"\b38 training conversations \(.*\), 2 held out", capsys.readouterr().out)


def test_held_out_conversations_with_no_assistant_token_in_the_context_log_null_not_zero(base_dir, tmp_path,
                                                                                         monkeypatch):
    """A held-out conversation whose reply starts past block_size has no token to measure: its loss was
    logged as 0.0, a perfect score. It is null (None), and the run still saves sft.pt at each evaluation."""
    cut = sft_example(ENC, CONVS[0], 4)  # 4 tokens: the reply is cut away
    assert all(t == -1 for t in cut[1]) and sft.held_out_loss(tiny(), [cut], 1, 1, PAD, "cpu",
                                                               contextlib.nullcontext()) is None
    os.link(base_dir / "base.pt", tmp_path / "base.pt")
    block = torch.load(base_dir / "base.pt", weights_only=True)["model_args"]["block_size"]
    long = [{"role": "user", "content": "Describe the owl. " * block},
            {"role": "assistant", "content": "Hi."}]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in [*CONVS, long]))  # the last held out
    assert len(render_prompt(ENC, long[:1])) > block
    run_here(monkeypatch, sft, f"--out_dir={tmp_path}", f"--data={data}", "--max_iters=2",
             "--eval_interval=1", "--compare=False", "--batch_size=2", "--device=cpu")
    rows = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in rows] == [None, None]
    assert torch.load(tmp_path / "sft.pt", weights_only=True)["step"] == 2


def test_a_resumed_run_says_so_on_rank_0_only(base_dir, tmp_path, monkeypatch, capsys):
    """Every process restores the checkpoint; only rank 0 says so, as it prints the rest of the run (each
    process's line once made one line per GPU). The other ranks are stood in for by setup's master=False."""
    os.link(base_dir / "base.pt", tmp_path / "base.pt")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS * 20))
    flags = [f"--out_dir={tmp_path}", f"--data={data}", *TINY, "--max_iters=3", "--device=cpu"]
    run_here(monkeypatch, sft, *flags, "--max_iters=2")
    said = f"resuming from {tmp_path / 'sft.pt'} at step 2"
    assert resume_lines(monkeypatch, capsys, sft, flags, said) == [0, 1]
