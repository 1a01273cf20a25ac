"""pretrain.py: the next-token loss and the batches by hand; end to end on a tiny config, resume is exact and
torchrun DDP (gloo, 2 processes) runs; bad options, a checkpoint of another network and a non-finite loss are
one line each and leave out_dir as it was."""
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
from data.tokenizer import get_tokenizer  # noqa: E402
import pretrain  # noqa: E402
from pretrain import get_batch, next_token_loss  # noqa: E402  (importing pretrain.py runs nothing)
from conftest import capture_grads, resume_lines, run_here, torchrun_launcher  # noqa: E402

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=6",
        "--eval_interval=3", "--eval_iters=1", "--n_samples=0", "--warmup_iters=2"]


def test_next_token_loss_by_hand():
    """The mean of -log p(next token) over every position of every row."""
    logits = torch.zeros(2, 2, 2)
    logits[0, 0, 1] = math.log(3)  # p = (1/4, 3/4)
    logits[0, 1, 0] = math.log(3)  # p = (3/4, 1/4)
    targets = torch.tensor([[1, 1], [0, 1]])  # row 1 is uniform: -log(1/2) twice
    expect = (math.log(4 / 3) + math.log(4) + 2 * math.log(2)) / 4
    assert next_token_loss(logits, targets).item() == pytest.approx(expect, abs=1e-6)


def test_batches_are_windows_and_their_next_tokens():
    stream = torch.arange(100)
    x, y = get_batch(stream, 8, 5, seed=1, it=3, micro=0, rank=0)
    assert x.shape == y.shape == (5, 8)
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(5, 7, dtype=torch.long))  # contiguous windows
    assert torch.equal(y, x + 1)  # each target is the token after its input
    again = get_batch(stream, 8, 5, seed=1, it=3, micro=0, rank=0)
    assert torch.equal(again[0], x)  # the same (seed, step, micro-step, rank): the same batch (exact resume)
    others = [get_batch(stream, 8, 5, 1, 4, 0, 0), get_batch(stream, 8, 5, 1, 3, 1, 0),
              get_batch(stream, 8, 5, 1, 3, 0, 1), get_batch(stream, 8, 5, 1, 3, 0, 0, val=True)]
    assert all(not torch.equal(o[0], x) for o in others)  # another step, micro-step, rank or split: another


def test_every_window_can_be_drawn():
    """A stream of block_size + 2 tokens holds two windows, starting at 0 and 1; the one at 1 is the only one
    whose targets reach the stream's last token. block_size + 1 tokens hold exactly one."""
    stream = torch.arange(10)
    starts = {int(x[0]) for it in range(40) for x in get_batch(stream, 8, 4, 1, it, 0, 0)[0]}
    assert starts == {0, 1}
    x, y = get_batch(torch.arange(9), 8, 2, 1, 0, 0, 0)
    assert torch.equal(x, torch.arange(8).expand(2, 8)) and torch.equal(y, torch.arange(1, 9).expand(2, 8))


def test_micro_steps_and_ranks_past_a_field_width_draw_their_own_batches():
    """Each (step, micro-step, rank) has its own batch, however many micro-steps (--grad_accum) or ranks: a
    key packed in fixed bits gave micro-step 64 of step 0 the batch of micro-step 0 of step 1."""
    stream = torch.arange(10_000)
    x = get_batch(stream, 8, 4, 1, 1, 0, 0)[0]
    assert not torch.equal(get_batch(stream, 8, 4, 1, 0, 64, 0)[0], x)
    assert not torch.equal(get_batch(stream, 8, 4, 1, 0, 63, 1024)[0], x)


def test_a_step_split_into_micro_batches_has_the_gradient_of_the_whole_step(tmp_path, monkeypatch):
    """The loss is a mean over the step's B x T tokens, and every micro-batch holds as many: with
    --grad_accum=2 each half's loss is divided by 2 before backward, so the step's gradient is the one a
    single batch of both halves gives (without the division it would be twice that)."""
    import pretrain
    doc = "The owl is calm. The owl sleeps in the forest. " * 6
    (tmp_path / "corpus.txt").write_text("\n\n".join([doc, doc.replace("owl", "fox")] * 5))
    real = pretrain.get_batch

    def halves(stream, block_size, batch_size, seed, it, micro, rank, val=False):
        """Micro-batch m of a step: rows m * batch_size.. of the step's one batch of 4 windows."""
        if val:
            return real(stream, block_size, batch_size, seed, it, micro, rank, val)
        x, y = real(stream, block_size, 4, seed, it, 0, rank)
        return x[micro * batch_size:(micro + 1) * batch_size], y[micro * batch_size:(micro + 1) * batch_size]
    monkeypatch.setattr(pretrain, "get_batch", halves)
    grads = capture_grads(monkeypatch)
    for batch_size, accum in ((4, 1), (2, 2)):
        out = tmp_path / str(accum)
        os.makedirs(out)
        run_here(monkeypatch, pretrain, f"--out_dir={out}", *TINY, "--max_iters=1",
                 f"--batch_size={batch_size}", f"--grad_accum={accum}", "--eval_interval=1",
                 f"--data={tmp_path / 'corpus.txt'}", "--device=cpu")  # fp32 on any machine
    assert len(grads) == 2 and grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7), (grads[0] - grads[1]).abs().max()


def run(args, out, launcher=(sys.executable,), check=True):
    r = subprocess.run([*launcher, "pretrain.py", f"--out_dir={out}", *TINY, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    if not check:
        return r
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return [json.loads(line) for line in open(os.path.join(out, "pretrain.jsonl"))]


def test_resume_continues_with_the_same_losses(tmp_path):
    full = run([], tmp_path / "a")
    part = run(["--stop_at=3"], tmp_path / "b")  # as if killed after the step-3 checkpoint
    assert [r["iter"] for r in part] == [1, 2, 3]
    assert torch.load(tmp_path / "b" / "base.pt", weights_only=True)["step"] == 3
    resumed = run(["--resume=True"], tmp_path / "b")
    assert [r["iter"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, resumed):  # same batches, same weights, same optimizer state: same losses, to a
        # few fp32 roundings of a loss near ln(vocab) (the BLAS may sum in another order in another process)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), (a, b)
    assert full[-1]["val_loss"] == pytest.approx(resumed[-1]["val_loss"], abs=1e-6)
    # --stop_at at or before the checkpoint's step: nothing to train (it ran on to max_iters and overwrote it)
    ck = (tmp_path / "b" / "base.pt").read_bytes()
    r = run(["--resume=True", "--max_iters=8", "--stop_at=6"], tmp_path / "b", check=False)
    assert r.returncode == 0 and "is already at step 6 >= 6 (--max_iters=8, --stop_at=6)" in r.stdout
    assert (tmp_path / "b" / "base.pt").read_bytes() == ck
    # a later fresh run replaced the log and was killed before its first checkpoint: resuming base.pt would
    # splice its rows with base.pt's steps; one line instead, nothing touched
    log = tmp_path / "b" / "pretrain.jsonl"
    log.write_text('{"iter": 1, "loss": 6.5}\n')
    r = run(["--resume=True", "--max_iters=8"], tmp_path / "b", check=False)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith(
        f"error: --resume: {log} is the log of a later run than the checkpoint"), r.stderr[-2000:]
    assert (tmp_path / "b" / "base.pt").read_bytes() == ck and log.read_text() == '{"iter": 1, "loss": 6.5}\n'


def test_a_text_files_documents_split_at_blank_lines_even_with_spaces_and_a_bom(tmp_path):
    from pretrain import read_documents
    path = tmp_path / "docs.txt"
    path.write_text("The owl is calm.\n  \nThe fox sleeps.\r\n\t\r\nThe cat runs.\n\n\n",
                    encoding="utf-8-sig")
    assert read_documents(str(path)) == ["The owl is calm.", "The fox sleeps.", "The cat runs."]


def test_a_text_file_that_cannot_be_read_or_is_not_utf8_is_one_line(tmp_path, monkeypatch):
    from pretrain import read_documents
    path = tmp_path / "docs.txt"
    path.write_bytes(b"The owl is calm.\n\nThe fox \xff sleeps.")
    with pytest.raises(SystemExit, match=r"docs\.txt is not UTF-8 \(invalid start byte at byte 26\)$"):
        read_documents(str(path))
    path.write_text("The owl is calm.\n\nThe fox sleeps.")

    def refused(*a, **k):  # what open() raises on a file this user may not read (root reads any file)
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr("builtins.open", refused)
    with pytest.raises(SystemExit, match=r"docs\.txt: cannot read \(Permission denied\)$"):
        read_documents(str(path))


def test_torchrun_two_processes_on_cpu(tmp_path):
    launcher = torchrun_launcher()
    log = run(["--device=cpu"], tmp_path, launcher)  # gloo: on a GPU machine too
    assert [r["iter"] for r in log] == [1, 2, 3, 4, 5, 6]  # only rank 0 logs
    assert log[-1]["tokens"] == 6 * 2 * 4 * 32  # both ranks' batches count
    ck = torch.load(tmp_path / "base.pt", weights_only=True)
    assert ck["kind"] == "base" and ck["step"] == 6


def test_under_torchrun_an_input_that_cannot_be_built_is_rank_0s_one_line(tmp_path):
    """`torchrun sft.py` with no base.pt: rank 0 runs pretrain.py while the others wait at a barrier. When the
    build failed, rank 0 raised before the barrier and rank 1's wait broke with a gloo traceback."""
    (tmp_path / "pretrain.jsonl").mkdir()  # pretrain.py, run to make base.pt, cannot write its log
    launcher = torchrun_launcher()
    r = subprocess.run([*launcher, "sft.py", "--device=cpu", f"--out_dir={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and f"error: could not write {tmp_path / 'pretrain.jsonl'}" in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    built = f"`python pretrain.py --out_dir={tmp_path}`"
    assert errors[-1] == f"error: {built} did not produce {tmp_path / 'base.pt'}", r.stderr
    assert "[rank1]" not in r.stderr and "Connection closed" not in r.stderr, r.stderr[-3000:]


# ---- failures: one line, out_dir as it was


def files_of(d):
    """{name: sha256} of every file in d: what a failed run must leave exactly as it was."""
    return {p: hashlib.sha256(open(os.path.join(d, p), "rb").read()).hexdigest()
            for p in sorted(os.listdir(d))}


def save_tiny_base(path, **model_args):
    """A base checkpoint of TINY's network with what --resume reads, its model_args changed by model_args."""
    torch.manual_seed(0)
    n_vocab = get_tokenizer("world").n_vocab
    m = M.GPT(M.GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=n_vocab))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = runtime.training_state(m, torch.optim.AdamW(m.parameters()), scaler)
    runtime.save_checkpoint(str(path), {**state, "kind": "base", "step": 3,
                                        "tokenizer": "world", "model_args": {**vars(m.config), **model_args}})


@pytest.fixture
def used_dir(tmp_path):
    """An out_dir with an earlier run's base.pt and pretrain.jsonl, and a small corpus (fast to read)."""
    save_tiny_base(tmp_path / "base.pt")
    (tmp_path / "pretrain.jsonl").write_text('{"iter": 1, "loss": 6.0}\n')
    doc = "The owl is calm. The owl sleeps in the forest. " * 6  # the held-out document is longer than TINY's
    (tmp_path / "corpus.txt").write_text("\n\n".join([doc] * 10))  # block_size, as pretrain.py requires
    return tmp_path


BAD_OPTIONS = ["--grad_accum=0", "--batch_size=0", "--lr=-1", "--eval_interval=0", "--max_iters=0",
               "--eval_iters=0", "--n_head=0", "--n_embd=30", "--block_size=1", "--beta1=-0.1",
               "--dropout=1.0", "--tokenizer=bpe", "--n_samples=-1", "--device=gpu"]


def test_bad_options_are_one_line_and_touch_nothing(used_dir, refusal):
    before = files_of(used_dir)
    assert refusal("pretrain", f"--out_dir={used_dir}", "--batch_size=0") == (
        "error: --batch_size=0 is out of range: it must be >= 1")
    for bad in BAD_OPTIONS:  # each checked before anything is read or written
        msg = refusal("pretrain", f"--out_dir={used_dir}", bad)
        assert msg.startswith(f"error: {bad.split('=')[0]}=") and "\n" not in msg, (bad, msg)
    assert files_of(used_dir) == before


def test_resume_from_another_network_is_one_line(used_dir, refusal):
    path, args = used_dir / "base.pt", [f"--out_dir={used_dir}", *TINY, f"--data={used_dir / 'corpus.txt'}"]
    before = files_of(used_dir)
    msg = refusal("pretrain", *args, "--resume=True", "--n_layer=2")
    assert msg.startswith(f"error: {path} is another network than the options ask for (n_layer 1 vs 2)"), msg
    assert "\n" not in msg and files_of(used_dir) == before
    save_tiny_base(path, n_embd=64, n_head=4)  # model_args that its own weights do not fit
    before = files_of(used_dir)
    msg = refusal("pretrain", *args, "--resume=True", "--n_embd=64", "--n_head=4")
    assert msg.startswith(f"error: {path}: the weights do not fit") and "\n" not in msg, msg
    assert files_of(used_dir) == before


def test_non_finite_loss_stops_in_one_line_and_keeps_the_last_good_checkpoint(used_dir):
    good = files_of(used_dir)["base.pt"]
    # a learning rate this large overflows the weights in the first step; the first checkpoint would be at 5
    r = run([f"--data={used_dir / 'corpus.txt'}", "--lr=1e30", "--max_iters=10", "--eval_interval=5"],
            used_dir, check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr[-2000:]
    assert re.match(r"error: pretrain step [1-4]: (loss|grad_norm) is (nan|inf|-inf) \(not finite\); "
                    r"stopped, the last good checkpoint is kept; try a lower --lr$", errors[0]), errors[0]
    assert files_of(used_dir)["base.pt"] == good and not os.path.exists(used_dir / "base.pt.tmp")


def doc_of(n_tokens, enc):
    """A document of exactly n_tokens world tokens; in the stream it takes one more (its <|endoftext|>)."""
    words = ("The owl is calm. " * n_tokens).split()
    for k in range(1, len(words) + 1):
        doc = " ".join(words[:k])
        if len(enc.encode_ordinary(doc)) == n_tokens:
            return doc
    raise AssertionError(f"no prefix of the owl text is {n_tokens} tokens long")


@pytest.mark.parametrize("train, val, what", [
    (200, 31, "held-out text (the last 5% of the documents) has 32 tokens"),  # block_size: one short
    (10, 200, "training text has 11 tokens"),
])
def test_a_stream_too_short_for_one_window_is_one_line(used_dir, refusal, train, val, what):
    """get_batch needs block_size + 1 tokens of each stream (a window and its targets): a held-out stream one
    token short once passed the check and crashed at the first evaluation, and the training stream was never
    checked."""
    enc = get_tokenizer("world")
    corpus = used_dir / "tiny.txt"
    corpus.write_text(doc_of(train, enc) + "\n\n" + doc_of(val, enc))  # 2 documents: the last one held out
    before = files_of(used_dir)
    msg = refusal("pretrain", f"--out_dir={used_dir}", *TINY, f"--data={corpus}")
    assert msg == (f"error: {corpus}: the {what}; need at least block_size + 1 = 33 (more text, or a smaller "
                   "--block_size)"), msg
    assert files_of(used_dir) == before


def test_streams_of_exactly_one_window_train_and_evaluate(tmp_path):
    enc = get_tokenizer("world")
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(doc_of(32, enc) + "\n\n" + doc_of(32, enc))  # block_size + 1 tokens per stream
    log = run([f"--data={corpus}", "--max_iters=1", "--eval_interval=1"], tmp_path / "out")
    assert len(log) == 1 and math.isfinite(log[0]["val_loss"])


PATCHED = """
import json, sys
sys.path.insert(0, {root!r})
import pretrain
real, calls = pretrain.next_token_loss, []
def recorded(logits, y):  # each micro-batch's (and held-out batch's) loss; a step's first NaN if asked
    loss = real(logits, y)
    calls.append(loss.item())
    return loss * float("nan") if {nan} and len(calls) % 2 == 1 else loss
pretrain.next_token_loss = recorded
sys.argv = ["pretrain.py"] + {args!r}
pretrain.main()
print("CALLS", json.dumps(calls))
"""


@pytest.mark.parametrize("nan", [False, True])
def test_a_step_checks_and_logs_the_mean_of_its_micro_batches(used_dir, nan):
    """With --grad_accum=2 the log and the non-finite guard see both micro-batches, not only the last one: a
    NaN in the first stops the stage even under fp16, whose GradScaler would skip that step without a word."""
    args = [f"--out_dir={used_dir}", *TINY, f"--data={used_dir / 'corpus.txt'}", "--grad_accum=2",
            "--max_iters=2", "--eval_interval=2"] + ["--dtype=float16"] * nan
    r = subprocess.run([sys.executable, "-c", PATCHED.format(root=ROOT, nan=nan, args=args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    if nan:
        assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith(
            "error: pretrain step 1: loss is nan (not finite)"), r.stderr[-2000:]
        return
    assert r.returncode == 0, r.stderr[-2000:]
    calls = json.loads(r.stdout.split("CALLS")[-1])
    log = [json.loads(line) for line in open(used_dir / "pretrain.jsonl")]
    means = [(calls[0] + calls[1]) / 2, (calls[2] + calls[3]) / 2]  # then the held-out batch
    assert [row["loss"] for row in log] == pytest.approx(means)


def test_a_short_context_shows_only_the_instructions_that_fit(tmp_path):
    """The end-of-run samples skip eval instructions too long for --block_size (generate refuses a prompt that
    fills the context): the run ends normally instead of with a traceback after its checkpoint."""
    args = ["--block_size=8", "--n_layer=1", "--n_head=1", "--n_embd=8", "--max_iters=1", "--eval_iters=1",
            "--batch_size=2", "--n_samples=4"]
    r = subprocess.run([sys.executable, "pretrain.py", f"--out_dir={tmp_path}", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    shown = re.search(r"does not answer \d+% of (\d+)", r.stdout)
    assert shown and 1 <= int(shown.group(1)) <= 4, r.stdout[-2000:]


def test_held_out_loss_is_the_mean_over_its_eval_iters_fixed_val_batches():
    torch.manual_seed(0)
    m = M.GPT(M.GPTConfig(block_size=8, vocab_size=50, n_layer=1, n_head=2, n_embd=16)).train()
    stream = torch.randint(50, (400,))
    want = []
    for k in range(3):  # the same batches every call: step -1, micro-step k, the val split
        x, y = pretrain.get_batch(stream, 8, 4, 1337, -1, k, 0, val=True)
        with torch.no_grad():
            want.append(pretrain.next_token_loss(m.eval()(x)[0], y).item())
    assert max(want) - min(want) > 1e-4  # the three batches differ
    # rank 0's batches in every process: under torchrun all get the same loss, and stop together on a bad one
    got = pretrain.held_out_loss(m.train(), stream, 8, 4, 3, 1337, "cpu", contextlib.nullcontext())
    assert got == pytest.approx(sum(want) / 3, abs=1e-6)
    assert m.training  # back in training mode


def test_the_last_five_percent_of_the_documents_are_held_out():
    """40 documents: the last 2 (5%) make the held-out stream and the other 38 the training stream, each
    document opened by <|endoftext|>; 19 documents still hold one out."""
    enc = get_tokenizer("world")
    docs = [f"The owl number {i} sleeps." for i in range(40)]
    streams = pretrain.token_streams(docs, enc)
    for split, part in (("train", docs[:38]), ("val", docs[38:])):
        ids = streams[split].tolist()
        assert ids.count(enc.eot_token) == len(part), split
        assert enc.decode([t for t in ids if t != enc.eot_token]) == "".join(part), split
    assert pretrain.token_streams(docs[:19], enc)["val"].tolist().count(enc.eot_token) == 1


def test_a_document_with_a_million_spaces_becomes_tokens_not_a_panic():
    """A --data document holding a very long whitespace run: tiktoken's pre-split panicked on it (a
    BaseException, past every except Exception); it is encoded in pieces, every character kept."""
    enc = get_tokenizer("world")
    docs = ["The owl" + " " * 1_100_000 + "is calm.", "The fox is red."]
    streams = pretrain.token_streams(docs, enc)
    assert enc.decode(streams["train"].tolist()) == "<|endoftext|>" + docs[0]
    assert enc.decode(streams["val"].tolist()) == "<|endoftext|>" + docs[1]


def test_a_resumed_run_says_so_on_rank_0_only(tmp_path, monkeypatch, capsys):
    """Every process restores the checkpoint; only rank 0 says so, as it prints the rest of the run (each
    process's line once made one line per GPU). The other ranks are stood in for by setup's master=False."""
    doc = "The owl is calm. The owl sleeps in the forest. " * 6
    (tmp_path / "corpus.txt").write_text("\n\n".join([doc, doc.replace("owl", "fox")] * 5))
    flags = [f"--out_dir={tmp_path}", *TINY, f"--data={tmp_path / 'corpus.txt'}", "--device=cpu"]
    run_here(monkeypatch, pretrain, *flags, "--max_iters=2")
    said = f"resuming from {tmp_path / 'base.pt'} at step 2"
    assert resume_lines(monkeypatch, capsys, pretrain, [*flags, "--max_iters=3"], said) == [0, 1]


def test_the_logged_held_out_loss_is_the_saved_weights_loss_on_the_held_out_documents(tmp_path, monkeypatch):
    """The last row's val_loss is held_out_loss of the checkpoint it saved, on the held-out stream (the last
    5% of the documents: here about a fox, where the training documents are about an owl), not on the
    training stream, which this network already scores differently."""
    owl = "The owl is calm. The owl sleeps in the forest. " * 6
    fox = "A fox runs far. Two foxes hide under the bridge. " * 6
    data = tmp_path / "corpus.txt"
    data.write_text("\n\n".join([owl] * 38 + [fox] * 2))
    run_here(monkeypatch, pretrain, f"--out_dir={tmp_path}", *TINY, "--max_iters=2", "--eval_interval=2",
             "--eval_iters=2", f"--data={data}", "--device=cpu")
    (*_, last) = (json.loads(line) for line in open(tmp_path / "pretrain.jsonl"))
    ck = torch.load(tmp_path / "base.pt", weights_only=True)
    m = runtime.model_from_checkpoint(ck)
    streams = pretrain.token_streams(pretrain.read_documents(str(data)), get_tokenizer("world"))
    loss = {split: pretrain.held_out_loss(m, streams[split], 32, 4, 2, 1337, "cpu", contextlib.nullcontext())
            for split in ("train", "val")}
    assert abs(loss["train"] - loss["val"]) > 0.1, loss  # the two streams tell apart
    assert last["iter"] == 2 and last["val_loss"] == pytest.approx(loss["val"], abs=1e-5), (last, loss)
