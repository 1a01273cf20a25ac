"""Correctness of model.py: KV cache, padding, causality, tying, GPT-2 import, checkpoints, overrides."""
import json
import math
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
from dataclasses import asdict

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
import runtime  # noqa: E402
import sft  # noqa: E402
from data.gpt2 import CONV1D  # noqa: E402

TINY = dict(block_size=48, vocab_size=97, n_layer=2, n_head=2, n_embd=32)


def tiny(**kw):
    torch.manual_seed(0)
    return M.GPT(M.GPTConfig(**{**TINY, **kw})).eval()


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15, 16, 17]]


def test_kv_cache_logprobs_match_full_forward():
    m = tiny()
    g = torch.Generator().manual_seed(1)
    seq, attn, gen, lp = M.generate(m, PROMPTS, 20, temperature=1.0, generator=g, return_logprobs=True)
    P = max(map(len, PROMPTS))
    assert seq.shape == (4, P + 20) and lp.dtype == torch.float32
    assert gen[:, :P].sum() == 0 and gen[:, P:].all()  # no stop ids: every row generates every step
    assert attn.sum(1).tolist() == [len(p) + 20 for p in PROMPTS]
    with torch.no_grad():
        full = M.sequence_logprobs(m, seq, attn)  # (B, L-1): index t scores seq[:, t+1]
    sel = gen[:, 1:].bool()
    torch.testing.assert_close(full[sel], lp[:, 1:][sel], atol=1e-5, rtol=0)
    cache = [{"size": (4, 8)} for _ in m.transformer.h]
    with pytest.raises(ValueError, match="needs the attention_mask"):  # it alone says where cached keys are
        m.hidden(seq[:, :2], kv_cache=cache)


def test_greedy_cache_equals_no_cache():
    m = tiny()
    a = M.generate(m, PROMPTS, 25, temperature=0)
    b = M.generate(m, PROMPTS, 25, temperature=0, use_cache=False)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_stop_ids_padding_and_masks():
    m = tiny()
    g = torch.Generator().manual_seed(0)
    stop = tuple(range(0, 97, 3))  # a third of the vocabulary stops a row: some rows stop early
    seq, attn, gen = M.generate(m, PROMPTS, 30, stop_ids=stop, pad_id=0, generator=g)
    P = max(map(len, PROMPTS))
    for i in range(len(PROMPTS)):
        toks = seq[i, P:].tolist()
        hit = next((j for j, t in enumerate(toks) if t in stop), None)
        n = len(toks) if hit is None else hit + 1  # the stop token counts as generated
        assert gen[i, P:P + n].all() and attn[i, P:P + n].all()
        assert gen[i, P + n:].sum() == 0 and attn[i, P + n:].sum() == 0
        assert (seq[i, P + n:] == 0).all()
    # every token a stop token: all rows stop after one token and the batch ends there
    seq, attn, gen = M.generate(m, PROMPTS, 30, stop_ids=range(97), generator=g)
    assert seq.shape[1] == P + 1 and gen[:, P].all()


LONG_PROMPTS = [[5] * 33, [1, 2, 3], list(range(20, 40)), [7], list(range(40, 57)), [9, 8, 7, 6, 5, 4]]


def test_cache_with_chunked_prefill_and_early_stops_matches_full_forward():
    """Prompts longer than a prefill chunk and of very different lengths, rows that stop at different steps
    (so finished rows leave the batch): every generated token's log-prob equals the full forward's at 1e-5,
    at a temperature other than 1 and with top-k on (log-probs are taken before the filter)."""
    m = tiny()
    g = torch.Generator().manual_seed(3)
    stop = tuple(range(0, 97, 4))  # a quarter of the vocabulary ends a row
    seq, attn, gen, lp = M.generate(m, LONG_PROMPTS, 14, temperature=0.7, top_k=20, stop_ids=stop,
                                    generator=g, return_logprobs=True)
    P = max(map(len, LONG_PROMPTS))
    n_gen = gen.sum(1).tolist()
    assert len(set(n_gen)) > 2 and 0 < min(n_gen)  # rows did stop at different steps
    assert torch.equal(attn[:, :P].sum(1), torch.tensor([len(p) for p in LONG_PROMPTS]))
    assert torch.equal(attn[:, P:], gen[:, P:])
    with torch.no_grad():
        full = M.sequence_logprobs(m, seq, attn, temperature=0.7)  # (B, L-1): index t scores seq[:, t+1]
    sel = gen[:, 1:].bool()
    torch.testing.assert_close(lp[:, 1:][sel], full[sel], atol=1e-5, rtol=0)
    assert (lp[gen == 0] == 0).all()
    # the sampled tokens are within each step's top 20 under the full forward
    logits, _ = m(seq, attention_mask=attn)
    kth = logits[:, :-1].topk(20, dim=-1).values[..., -1]  # (B, L-1)
    assert (logits[:, :-1].gather(-1, seq[:, 1:, None])[..., 0][sel] >= kth[sel] - 1e-5).all()


def test_greedy_is_the_full_forward_argmax():
    m = tiny()
    seq, attn, gen, lp = M.generate(m, LONG_PROMPTS, 12, temperature=0, stop_ids=(3, 11),
                                    return_logprobs=True)
    with torch.no_grad():
        logits, _ = m(seq, attention_mask=attn)
    sel = gen[:, 1:].bool()
    assert torch.equal(seq[:, 1:][sel], logits[:, :-1].argmax(-1)[sel])
    # greedy records the temperature-1 log-probs
    full = M.token_logprobs(logits[:, :-1], seq[:, 1:])
    torch.testing.assert_close(lp[:, 1:][sel], full[sel], atol=1e-5, rtol=0)


def test_fixed_generator_is_deterministic():
    m = tiny()
    a = M.generate(m, LONG_PROMPTS, 10, top_p=0.9, stop_ids=(3,), generator=torch.Generator().manual_seed(5),
                   return_logprobs=True)
    b = M.generate(m, LONG_PROMPTS, 10, top_p=0.9, stop_ids=(3,), generator=torch.Generator().manual_seed(5),
                   return_logprobs=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_sampler_draws_the_softmax_and_respects_top_k():
    """Inverse-CDF sampling: with probabilities (0.5, 0.3, 0.2, 0) the frequencies match (4 standard errors
    of 20000 draws is under 0.015), top_k=2 never draws the third token, and the log-prob returned is
    log softmax(logits / T) before filtering."""
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.clamp(min=1e-30).log().expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    tok, lp = M.sample(logits, generator=g)
    freq = torch.bincount(tok, minlength=4) / 20000
    assert (freq - probs).abs().max() < 0.015 and freq[3] == 0
    torch.testing.assert_close(lp, probs.log()[tok])
    tok, lp = M.sample(logits, temperature=2.0, top_k=2, generator=g)
    assert set(tok.tolist()) == {0, 1}
    torch.testing.assert_close(lp, torch.log_softmax(logits[0] / 2.0, -1)[tok])
    tok, lp = M.sample(logits[:2], temperature=0)
    assert tok.tolist() == [0, 0]
    torch.testing.assert_close(lp, torch.tensor([0.5, 0.5]).log())


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_top_p():
    """Nucleus sampling (Holtzman et al. 2019, https://arxiv.org/abs/1904.09751, §3.1) keeps the smallest
    set of top tokens whose mass reaches p: a token goes once the mass ahead of it is >= p. The probabilities
    below are exact in fp32, so the boundary is hit exactly: (0.5, 0.25, 0.25) at p = 0.5 keeps only the
    first token (it alone reaches 0.5), four equal tokens at p = 0.5 keep two; the log-probs stay
    unfiltered."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 1.0]).log().expand(2000, 3)
    assert torch.softmax(logits[0], -1).tolist() == [0.5, 0.25, 0.25]  # exact, so p = 0.5 is the boundary
    tok, lp = M.sample(logits, top_p=0.5, generator=g)
    assert tok.tolist() == [0] * 2000
    torch.testing.assert_close(lp, torch.full((2000,), 0.5).log())  # before the filter
    tok, _ = M.sample(logits, top_p=0.6, generator=g)  # 0.5 ahead of the second token is < 0.6: two kept
    assert set(tok.tolist()) == {0, 1}
    tok, _ = M.sample(torch.zeros(2000, 4), top_p=0.5, generator=g)
    assert len(set(tok.tolist())) == 2
    tok, _ = M.sample(torch.zeros(2000, 4), top_p=1.0, generator=g)  # p = 1 keeps everything
    assert set(tok.tolist()) == {0, 1, 2, 3}
    tok, _ = M.sample(logits, top_p=0.0, generator=g)  # p -> 0: the top token, never an empty set
    assert tok.tolist() == [0] * 2000


def test_generate_respects_block_size():
    m = tiny()
    seq, _, _ = M.generate(m, [[1] * 40, [2, 3]], 100, top_k=5, top_p=0.9)
    assert seq.shape[1] == TINY["block_size"]
    with pytest.raises(ValueError, match="block_size"):
        M.generate(m, [[1] * 48], 5)


def test_left_padding_does_not_change_logits():
    m = tiny()
    short, long = [5, 6, 7, 8], list(range(20, 31))
    alone, _ = m(torch.tensor([short]))
    pad = len(long) - len(short)
    idx = torch.tensor([[0] * pad + short, long])
    mask = torch.tensor([[0] * pad + [1] * len(short), [1] * len(long)])
    batched, _ = m(idx, attention_mask=mask)
    assert not torch.isnan(batched).any()  # padded query rows must not produce NaN
    torch.testing.assert_close(batched[0, pad:], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1], m(torch.tensor([long]))[0][0], atol=1e-5, rtol=1e-5)


def test_causality():
    m = tiny()
    x = torch.randint(0, 97, (2, 30))
    y = x.clone()
    y[:, 17] = (y[:, 17] + 1) % 97
    lx, ly = m(x)[0], m(y)[0]
    assert torch.equal(lx[:, :17], ly[:, :17])
    assert not torch.allclose(lx[:, 17:], ly[:, 17:])


def test_weight_tying_survives_a_step():
    m = tiny().train()
    wte, head = m.transformer.wte.weight, m.lm_head.weight
    assert wte is head and wte.data_ptr() == head.data_ptr()
    opt = runtime.configure_optimizer(m, 0.1, 1e-2, (0.9, 0.95), "cpu")
    x = torch.randint(0, 97, (2, 16))
    _, loss = m(x[:, :-1], x[:, 1:])
    loss.backward()
    opt.step()
    assert torch.equal(m.transformer.wte.weight, m.lm_head.weight)
    # where tying can break: a model rebuilt from a checkpoint shares the one matrix again, with the trained
    # values, not the fresh initialisation's
    loaded = runtime.model_from_checkpoint({"model": m.state_dict(), "model_args": vars(m.config)})
    assert loaded.transformer.wte.weight is loaded.lm_head.weight
    assert torch.equal(loaded.lm_head.weight, m.lm_head.weight)


def test_a_reward_model_without_the_unembedding_scores_and_learns_the_same():
    """with_logits=False skips only the unembedding: the scalar head's values and their gradients are those of
    the full forward, the logits are not computed at all."""
    m = tiny(scalar_head=True).train()
    x, mask = torch.randint(0, 97, (3, 12)), torch.ones(3, 12, dtype=torch.long)
    grads = []
    for with_logits in (True, False):
        logits, _, v = m(x, attention_mask=mask, return_values=True, with_logits=with_logits)
        assert (logits is None) == (not with_logits)
        v[:, -1].sum().backward()
        grads.append((v.detach(), [p.grad.clone() for p in m.parameters()]))
        m.zero_grad()
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)


def write_safetensors(path, sd):
    header, blobs, offset = {}, [], 0
    for k, v in sd.items():
        b = v.contiguous().numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def gpt2_state_dict(model):
    """Our weights in GPT2LMHeadModel's layout: 'transformer.' keys, Conv1D (in, out) matrices, mask
    buffers."""
    cfg, out = model.config, {}
    for k, v in model.state_dict().items():
        if k.startswith("transformer."):
            out[k] = v.t().contiguous() if k.endswith(CONV1D) else v
    mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size)).view(1, 1, cfg.block_size, cfg.block_size)
    for i in range(cfg.n_layer):
        out[f"transformer.h.{i}.attn.bias"] = mask
    return out


def test_gpt2_layout_round_trip(tmp_path):
    m = tiny(n_embd=64, n_head=2)
    sd = gpt2_state_dict(m)
    w = m.transformer.h[0].attn.c_attn.weight  # Linear: (out, in) = (192, 64)
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)
    assert torch.equal(sd["transformer.h.0.attn.c_attn.weight"], w.t())
    assert "transformer.h.1.attn.bias" in sd
    x = torch.randint(0, 97, (2, 20))
    ref = m(x)[0]

    (tmp_path / "bin").mkdir()
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text(json.dumps({"n_head": 2}))
    # the hub's gpt2 files carry no 'transformer.' prefix; the reader takes both
    (tmp_path / "st").mkdir()
    write_safetensors(tmp_path / "st" / "model.safetensors",
                      {k.removeprefix("transformer."): v for k, v in sd.items()})
    for path, heads in [(tmp_path / "bin", {}), (tmp_path / "st" / "model.safetensors", {"n_head": 2})]:
        m2 = sft.load_gpt2(str(path), **heads).eval()
        assert m2.config.n_layer == 2 and m2.config.block_size == 48 and m2.config.vocab_size == 97
        torch.testing.assert_close(m2(x)[0], ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(SystemExit, match="not found"):
        sft.load_gpt2(str(tmp_path / "nope"))


def test_checkpoint_survives_kill_mid_write(tmp_path):
    path = str(tmp_path / "ck" / "x.pt")
    script = textwrap.dedent(f"""
        import io, sys, time, torch
        sys.path.insert(0, {ROOT!r})
        import runtime
        runtime.save_checkpoint({path!r}, {{"kind": "base", "step": 1, "model": {{"w": torch.arange(10.0)}},
                                            "model_args": {{}}}})
        real_save = torch.save
        def slow_save(obj, f):  # write half the bytes, then hang: the parent kills us mid-write
            buf = io.BytesIO(); real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()
            print("writing", flush=True); time.sleep(60)
        torch.save = slow_save
        runtime.save_checkpoint({path!r}, {{"kind": "base", "step": 2,
                                            "model": {{"w": torch.randn(1_000_000)}}, "model_args": {{}}}})
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        assert os.path.getsize(path + ".tmp") > 0
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=30)
    ck = runtime.load_checkpoint(path, kinds=("base",))
    assert ck["step"] == 1 and torch.equal(ck["model"]["w"], torch.arange(10.0))
    # a stale .tmp does not get in the way
    runtime.save_checkpoint(path, {"kind": "base", "step": 3, "model": {}, "model_args": {}})
    assert runtime.load_checkpoint(path)["step"] == 3 and not os.path.exists(path + ".tmp")


def test_checkpoint_kind_prefixes_and_rng(tmp_path):
    m = tiny()
    path = str(tmp_path / "reward.pt")
    sd = {"module._orig_mod." + k: v for k, v in m.state_dict().items()}  # as DDP(compile(model)) names them
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    rng = runtime.rng_state()
    runtime.save_checkpoint(path, {"model": sd, "model_args": asdict(m.config), "kind": "reward", "step": 7,
                             "config": {"betas": (0.9, 0.95), "out_dir": "out", "x": None}, "rng": rng})
    with pytest.raises(SystemExit, match=r"reward\.pt is a 'reward' checkpoint; expected one of sft"):
        runtime.load_checkpoint(path, kinds=("sft",))
    with pytest.raises(SystemExit, match="not found"):
        runtime.load_checkpoint(str(tmp_path / "missing.pt"))
    ck = runtime.load_checkpoint(path, kinds=("reward", "sft"))
    assert set(torch.load(path, weights_only=True)["model"]) == set(m.state_dict())  # saved without prefixes
    expect = (random.random(), np.random.rand(), torch.rand(1))
    runtime.set_rng_state(ck["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expect
    m2 = runtime.model_from_checkpoint(ck, scalar_head=True).eval()  # base weights + a fresh scalar head
    x = torch.randint(0, 97, (1, 10))
    assert torch.equal(m2(x)[0], m(x)[0])


def test_a_whole_write_is_synced_then_renamed_over_the_old_file_even_with_no_directory(tmp_path, monkeypatch):
    """write_whole: the new bytes reach the disk (fsync) before one rename puts them in place, so a crash
    leaves the old file or the new, and a reader holding the old file still reads it whole; a bare file name
    is in the working directory. No temp file stays."""
    monkeypatch.chdir(tmp_path)
    runtime.write_whole("r.json", lambda f: f.write(b"old"))
    calls, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(runtime.os, "fsync", lambda fd: calls.append("fsync") or fsync(fd))
    monkeypatch.setattr(runtime.os, "replace", lambda a, b: calls.append(("replace", a, b)) or replace(a, b))
    with open("r.json", "rb") as old:
        runtime.write_whole("r.json", lambda f: f.write(b"new bytes"))
        assert old.read() == b"old"
    assert calls == ["fsync", ("replace", "r.json.tmp", "r.json")]
    assert open("r.json", "rb").read() == b"new bytes" and os.listdir(".") == ["r.json"]


def test_configure_overrides(capsys):
    def g():
        return dict(max_iters=10, lr=3e-4, compile=False, device="auto", betas=(0.9, 0.95), init=None,
                    _private=1, np=np, f=len)
    d = g()
    cfg = runtime.configure(d, ["--max_iters=20", "--lr=1", "--compile=True", "--device=cpu",
                                "--betas=[0.8,0.9]", "--init=gpt2"])
    assert cfg == dict(max_iters=20, lr=1.0, compile=True, device="cpu", betas=(0.8, 0.9), init="gpt2")
    assert type(d["lr"]) is float and d["max_iters"] == 20
    with pytest.raises(SystemExit, match="valid options: max_iters, lr, compile, device, betas, init$"):
        runtime.configure(g(), ["--max_iter=5"])
    with pytest.raises(SystemExit, match=r"--max_iters expects int, got str 'abc'"):
        runtime.configure(g(), ["--max_iters=abc"])
    for bad in ["--lr=fast", "--compile=1", "--max_iters=2.5"]:
        with pytest.raises(SystemExit):
            runtime.configure(g(), [bad])
    with pytest.raises(SystemExit, match="--name=value"):
        runtime.configure(g(), ["max_iters=5"])
    listed = "valid options: max_iters, lr, compile, device, betas, init$"
    with pytest.raises(SystemExit, match=r"^error: '--verbose' is not --name=value; " + listed):
        runtime.configure(g(), ["--verbose"])
    for ask in ("--help", "-h"):  # every option with its default, on stdout, and a clean exit
        with pytest.raises(SystemExit) as e:
            runtime.configure(g(), [ask, "--max_iters=oops"])
        assert e.value.code == 0
        shown = capsys.readouterr().out.splitlines()
        assert shown[1:] == ["  --max_iters=10", "  --lr=0.0003", "  --compile=False", "  --device='auto'",
                             "  --betas=(0.9, 0.95)", "  --init=None"]
    assert runtime.configure(g(), ["--compile"])["compile"] is True  # a bare flag sets a bool option
    for word, value in [("true", True), ("FALSE", False)]:  # as a shell user writes it: any case
        assert runtime.configure(g(), [f"--compile={word}"])["compile"] is value
    with pytest.raises(SystemExit, match="--compile expects bool, got str 'yes'"):
        runtime.configure(g(), ["--compile=yes"])
    for bare in ["--max_iters", "--device", "compile"]:  # ... and nothing else
        with pytest.raises(SystemExit, match="--name=value"):
            runtime.configure(g(), [bare])


def test_a_number_given_to_a_text_option_is_that_text():
    """--out_dir=123 means the directory "123": a str option keeps what was typed, whatever it parses as."""
    cfg = runtime.configure(dict(name="out", tag="x"), ["--name=123", "--tag=[1, 2]"])
    assert cfg == dict(name="123", tag="[1, 2]")


def test_a_learning_rate_floor_equal_to_its_peak_is_a_constant_rate_and_fine():
    assert runtime.configure(dict(lr=0.1, min_lr=0.0), ["--min_lr=0.25", "--lr=0.25"]) == dict(lr=0.25,
                                                                                            min_lr=0.25)


def test_a_checkpoint_without_what_resume_needs_is_one_line(tmp_path):
    path = str(tmp_path / "x.pt")
    runtime.save_checkpoint(path, {"kind": "sft", "step": 1, "model": {}, "model_args": {}})
    assert runtime.load_checkpoint(path, "sft")["step"] == 1  # enough to read
    with pytest.raises(SystemExit, match=r"x\.pt has no optimizer, rng: not a complete checkpoint; start "
                                         r"afresh without --resume$"):
        runtime.load_checkpoint(path, "sft", need=("step", "optimizer", "rng"))


def test_overrides_win_over_the_checkpoints_model_args():
    """A stage that reads an SFT checkpoint saved with dropout 0.3 and asks for dropout=0.0 (a frozen
    reference) gets 0.0, and scalar_head=True adds the head even where the checkpoint says False."""
    m = tiny()
    ck = {"model": m.state_dict(), "model_args": {**TINY, "dropout": 0.3, "scalar_head": False}}
    assert runtime.model_from_checkpoint(ck).config.dropout == 0.3
    m2 = runtime.model_from_checkpoint(ck, dropout=0.0, scalar_head=True)
    assert m2.config.dropout == 0.0 and m2.scalar_head is not None


@pytest.mark.parametrize("script", ["pretrain", "sft", "reward", "dpo"])
def test_a_learning_rate_floor_above_its_peak_is_one_line(tmp_path, refusal, script):
    """--lr below the default min_lr (as the non-finite guard's "try a lower --lr" invites) made the cosine
    schedule climb from lr to min_lr instead of decaying (lr = min_lr, a constant rate, is fine: the test
    above)."""
    got = refusal(script, f"--out_dir={tmp_path}", "--lr=1e-6")
    assert got.startswith("error: --min_lr=") and got.endswith("it must be <= --lr=1e-06"), got
    got = refusal(script, f"--out_dir={tmp_path}", "--min_lr=0.5", "--lr=0.25")
    assert got == "error: --min_lr=0.5 is out of range: it must be <= --lr=0.25", got
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("script", ["pretrain", "sft", "reward", "ppo", "grpo", "dpo", "evaluate", "chat",
                                    "bench"])
def test_options_are_the_config_block(refusal, script):
    """The options a script accepts are exactly the names its config block (between its first two rules)
    assigns: nothing imported (a constant such as a special token) may turn into an option."""
    lines = open(os.path.join(ROOT, f"{script}.py")).read().splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("# -----")][:2]
    block = set()
    for line in lines[rules[0] + 1:rules[1]]:
        if line[:1].isalpha() and "=" in line:
            block.update(n.strip() for n in line.split("=")[0].split(","))
    message = refusal(script, "--not_an_option=1")
    assert message.startswith("error: unknown option --not_an_option; valid options: "), message
    assert set(message.split("valid options: ")[1].split(", ")) == block


def test_scalar_head_and_ignored_loss():
    m = tiny(scalar_head=True).train()
    x = torch.randint(0, 97, (3, 12))
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    r = m.scalar_head(m.hidden(x, mask)).squeeze(-1)  # the head on the trunk's hidden states
    assert r.shape == (3, 12) and r.dtype == torch.float32 and r.abs().max() < 1e-3  # a fresh head says 0
    torch.nn.init.normal_(m.scalar_head.weight)  # a head that reads the states, so the next check can fail
    m.eval()  # (dropout off: the two passes below must see the same states)
    r = m.scalar_head(m.hidden(x, mask)).squeeze(-1)
    logits, loss, values = m(x, attention_mask=mask, return_values=True)  # one trunk pass for both heads
    assert loss is None and logits.shape == (3, 12, 97) and r.abs().max() > 0.1
    torch.testing.assert_close(values, r, atol=1e-6, rtol=0)
    m.train()
    _, loss = m(x, torch.full_like(x, -1))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    _, loss = m(x[:, :-1], x[:, 1:])
    assert abs(loss.item() - np.log(97)) < 0.1  # fresh model: near uniform
    with pytest.raises(ValueError, match="needs the logits"):  # not an AttributeError from inside the loss
        m(x[:, :-1], x[:, 1:], with_logits=False)


def test_get_lr():
    assert runtime.get_lr(0, 10, 100, 1.0, 0.1) == pytest.approx(1 / 11)
    assert runtime.get_lr(10, 10, 100, 1.0, 0.1) == pytest.approx(1.0)
    assert runtime.get_lr(100, 10, 100, 1.0, 0.1) == pytest.approx(0.1)
    # a quarter of the way down the cosine (where a linear decay would give 0.775 instead)
    assert runtime.get_lr(35, 10, 110, 1.0, 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))


def test_a_run_that_ends_inside_its_warmup_is_said_with_the_lr_it_reaches(capsys):
    """3 steps under a warmup of 10: get_lr's last (highest) value is 3/11 of lr and the cosine never starts,
    which the warning says; 11 steps reach lr, and only rank 0 speaks."""
    assert max(runtime.get_lr(it, 10, 3, 1.0, 0.1) for it in range(3)) == pytest.approx(3 / 11)
    runtime.warn_short_schedule(3, 10, True)
    err = capsys.readouterr().err
    assert err == ("warning: 3 steps, not more than --warmup_iters=10: the lr rises to 27% of --lr and never "
                   "decays (raise --epochs or lower --warmup_iters)\n")
    runtime.warn_short_schedule(1, 10, True)
    one = capsys.readouterr().err
    assert one.startswith("warning: 1 step, not more than --warmup_iters=10: the lr rises to 9%")
    assert runtime.get_lr(10, 10, 11, 1.0, 0.1) == 1.0
    runtime.warn_short_schedule(10, 10, True)  # as long as the warmup: lr * 10/11 at the last step
    assert "the lr rises to 91% of --lr" in capsys.readouterr().err
    for steps, warmup, master in ((11, 10, True), (3, 10, False), (1, 0, True)):
        runtime.warn_short_schedule(steps, warmup, master)
        assert capsys.readouterr().err == ""


def test_get_lr_stays_at_min_lr_past_max_iters():
    """From max_iters on the rate stays at min_lr: at step 150 of a 10 + 90 step schedule the cosine's ratio
    is capped at 1 (uncapped, 140 / 90 would climb back up the cosine to 0.1 + 0.45 (1 + cos(1.56 pi)))."""
    for it in (100, 101, 150, 10_000):
        assert runtime.get_lr(it, 10, 100, 1.0, 0.1) == pytest.approx(0.1), it
    assert runtime.get_lr(150, 10, 100, 3e-4, 3e-5) == pytest.approx(3e-5)


def test_sample_kl_at_temperature_zero_uses_the_log_probs_generate_recorded():
    """Greedy decoding records temperature-1 log-probs (model.sample): the reference's must match, or the KL
    of a model against itself is NaN instead of 0."""
    from rollout import sample_kl
    m = tiny()
    seq, attn, gen, lp = M.generate(m, PROMPTS, 10, temperature=0, return_logprobs=True)
    kl = sample_kl(lp, m, seq, attn, gen, temperature=0)
    assert torch.isfinite(kl).all() and kl.abs().max() < 1e-4, kl
    other = tiny(n_layer=1)
    kl = sample_kl(lp, other, seq, attn, gen, temperature=0)
    torch.testing.assert_close(kl, sample_kl(lp, other, seq, attn, gen, temperature=1.0))


def test_sample_kl_scores_the_reference_at_the_sampling_temperature():
    """generate records the policy's log-probs at its temperature (softmax(logits / T)); the reference must
    be scored at the same T, so a policy equal to its reference has KL 0 at T = 0.5 (at T = 1 it would not:
    log softmax(z / 0.5) - log softmax(z) differs on every token)."""
    from rollout import sample_kl
    m = tiny()
    g = torch.Generator().manual_seed(0)
    seq, attn, gen, lp = M.generate(m, PROMPTS, 10, temperature=0.5, generator=g, return_logprobs=True)
    kl = sample_kl(lp, m, seq, attn, gen, temperature=0.5)
    assert kl.shape == (4,) and kl.abs().max() < 1e-5, kl
    assert (sample_kl(lp, m, seq, attn, gen, temperature=1.0) - kl).abs().min() > 1e-2  # T matters here


@pytest.mark.parametrize("bad", ["--gen_prompt_lens=(7.5,36)", "--gen_prompt_lens=(True,36)",
                                 "--gen_prompt_lens=('a','b')", "--gen_batches=(64,'x')",
                                 "--dtypes=(['float32'],)", "--dtypes=('float64',)"])
def test_bench_checks_the_elements_of_its_tuple_options_before_it_runs(refusal, bad):
    message = refusal("bench", bad)
    assert message.startswith(f"error: {bad.split('=')[0]}=") and "out of range" in message, message


def test_weight_decay_reaches_matrices_only():
    """AdamW's decoupled decay (p -= lr * wd * p) on matrices and embeddings, never on biases or LayerNorm
    gains: with zero gradients Adam's update is 0, so one step at lr 1, wd 0.1 leaves the decayed weights at
    0.9 times themselves and the others exactly as they were."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    before = [p.detach().clone() for p in m.parameters()]  # linear weight, bias, LN weight, LN bias
    opt = runtime.configure_optimizer(m, 0.1, 1.0, (0.9, 0.95), "cpu")
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = list(m.parameters())
    torch.testing.assert_close(after[0], 0.9 * before[0])
    assert all(torch.equal(a, b) for a, b in zip(after[1:], before[1:]))


def test_optimizer_step_clips_the_global_norm():
    """Gradient (3, 4) has norm 5: clipped to 1 it is (0.6, 0.8), and plain SGD at lr 1 moves the weight from
    0 by minus that; the step returns the norm before clipping. grad_clip 0 is off: the full (3, 4)."""
    for clip, moved in ((1.0, [0.6, 0.8]), (0.0, [3.0, 4.0])):
        m = torch.nn.Linear(2, 1, bias=False)
        torch.nn.init.zeros_(m.weight)
        m.weight.grad = torch.tensor([[3.0, 4.0]])
        opt, scaler = torch.optim.SGD(m.parameters(), lr=1.0), torch.amp.GradScaler("cpu", enabled=False)
        norm = runtime.optimizer_step(m, opt, scaler, clip)
        assert norm.item() == pytest.approx(5.0)
        torch.testing.assert_close(m.weight.detach(), -torch.tensor([moved]))
        assert m.weight.grad is None  # and the gradients are zeroed


def test_top_p_after_top_k_measures_the_renormalised_mass():
    """Top-k, then the nucleus of what is left: p = (.4, .3, .2, .1) cut to its top 2 is (4/7, 3/7), and the
    mass before token 1 is 4/7 >= 0.5, so top_p = 0.5 keeps token 0 alone (measured against the full
    distribution, 0.4 < 0.5, token 1 would stay)."""
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().expand(2000, 4)
    tok, _ = M.sample(logits, top_k=2, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert tok.tolist() == [0] * 2000


def test_top_p_breaks_ties_by_vocabulary_index():
    """64 equal logits at p = 0.5: the mass before the i-th sorted token is i/64 (exact in fp32), so the
    first 32 stay. Which 32 is the sort's tie order: the stable sort keeps the lowest ids, 0..31, on every
    device (an unstable one on a CPU already reorders ties in a row this long)."""
    tok, _ = M.sample(torch.zeros(4000, 64), top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert set(tok.tolist()) == set(range(32))
    # 24 tokens of weight e ahead of 40 tied ones of weight 1 (Z = 24e + 40 = 105.24): the j-th tied token
    # has 65.24 + j of it ahead, under 0.9 Z = 94.72 for j <= 29, so the tied ids 0..29 stay with ids 40..63
    logits = torch.zeros(4000, 64)
    logits[:, 40:] = 1.0
    tok, _ = M.sample(logits, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert set(tok.tolist()) == set(range(30)) | set(range(40, 64))


def test_temperature_shapes_the_draw_without_filters():
    """softmax(log p / T) at T = 2 is sqrt(p) / sum sqrt(p): (.5, .3, .2, 0) -> (.4154, .3218, .2628, 0).
    20,000 draws land within 0.015 of it (about 4 standard errors); draws from p would be 0.085 off."""
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.clamp(min=1e-30).log().expand(20000, 4)
    tok, _ = M.sample(logits, temperature=2.0, generator=torch.Generator().manual_seed(0))
    want = probs.sqrt() / probs.sqrt().sum()
    assert (torch.bincount(tok, minlength=4) / 20000 - want).abs().max() < 0.015


def test_a_zero_uniform_never_draws_a_filtered_token(monkeypatch):
    """torch.rand can return exactly 0. The cdf of a row whose first token top-k removed starts at 0, so
    only the first entry strictly above u (searchsorted right=True) is a token of non-zero probability."""
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros(*a[:2]))
    tok, _ = M.sample(torch.tensor([[0.0, 5.0, 5.0]]), top_k=2)
    assert tok.item() != 0


def test_same_network_names_a_block_size_difference():
    args = dict(vocab_size=100, n_layer=1, n_head=2, n_embd=32)
    with pytest.raises(SystemExit, match=r"\(block_size 64 vs 32\)"):
        runtime.same_network("x.pt", {"model_args": {**args, "block_size": 64}},
                             {"model_args": {**args, "block_size": 32}})


def test_get_num_params_leaves_out_only_the_position_table():
    cfg = M.GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=8)
    m = M.GPT(cfg)
    total = sum(p.numel() for p in m.parameters())  # the tied wte/lm_head matrix counted once
    assert m.get_num_params(non_embedding=False) == total
    assert m.get_num_params() == total - 16 * 8


def test_dropout_acts_only_in_training_mode():
    torch.manual_seed(0)
    m = M.GPT(M.GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16, dropout=0.5)).eval()
    x = torch.randint(50, (2, 10))
    attn = torch.ones(2, 10, dtype=torch.long)
    attn[1, :3] = 0  # a padded row takes the masked attention path
    for kw in ({}, {"attention_mask": attn}):
        torch.manual_seed(1)
        a = m(x, **kw)[0]
        torch.manual_seed(2)
        b = m(x, **kw)[0]
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    m.train()
    torch.manual_seed(1)
    a = m(x)[0]
    torch.manual_seed(2)
    assert not torch.allclose(a, m(x)[0])


def test_a_finished_row_still_in_the_batch_gets_padding_and_stays_finished():
    """A row that stops while fewer than a quarter of the rows have stopped stays in the batch: every later
    column of it is pad_id with masks 0, however many of its later draws are not stop tokens."""
    m = tiny()
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11, 12], [13], [14, 15, 16], [17, 18]]
    P, pad = 4, 96
    for seed in range(4):
        seq, attn, gen = M.generate(m, prompts, 12, stop_ids=tuple(range(0, 96, 9)), pad_id=pad,
                                    generator=torch.Generator().manual_seed(seed))
        for i in range(len(prompts)):
            toks = seq[i, P:].tolist()
            hit = next((j for j, t in enumerate(toks) if t % 9 == 0 and t < 96), None)
            n = len(toks) if hit is None else hit + 1  # the stop token is the row's last generated one
            assert gen[i, P:P + n].all() and attn[i, P:P + n].all(), (seed, i)
            assert gen[i, P + n:].sum() == 0 and attn[i, P + n:].sum() == 0, (seed, i)
            assert (seq[i, P + n:] == pad).all(), (seed, i, toks)
    assert (gen[:, P:].sum(1) < seq.size(1) - P).any()  # some row did stop before the end


def test_generate_gives_back_the_mode_it_found():
    """generate samples in eval mode (no dropout) and leaves a training model in training mode."""
    for train in (True, False):
        m = tiny(dropout=0.1).train(train)
        M.generate(m, PROMPTS, 3, generator=torch.Generator().manual_seed(0))
        assert m.training is train and all(x.training is train for x in m.modules())


def test_greedy_without_the_cache_equals_the_cache_past_a_prefill_chunk():
    """Prompts longer than prefill's chunk of 16: without a cache the prompt goes through in one pass, so
    every step sees the whole prompt, as the cached path does."""
    m = tiny()
    assert max(map(len, LONG_PROMPTS)) > 16
    a = M.generate(m, LONG_PROMPTS, 6, temperature=0, return_logprobs=True)
    b = M.generate(m, LONG_PROMPTS, 6, temperature=0, use_cache=False, return_logprobs=True)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[3], b[3], atol=1e-5, rtol=0)


def test_a_prompt_asked_for_several_samples_goes_through_the_network_once(monkeypatch):
    """Best-of-n, K answers to rank, a group: copies of a prompt (here interleaved, of lengths across a
    prefill chunk) share one prefill, whose logits, keys and values every copy then reads as its own: each
    sampled token's log-prob is the full forward's, rows finish and leave the batch, greedy copies agree."""
    m = tiny()
    other = [13, 14, 15]  # as long as LONG_PROMPTS[1]: copies of the two interleave in the cache's order
    prompts = [LONG_PROMPTS[i] for i in (2, 0, 2, 5, 3, 0, 2, 5, 1, 3, 3, 0)]
    prompts += [other, LONG_PROMPTS[1], other]
    seen = []
    prefill = M.prefill
    monkeypatch.setattr(M, "prefill", lambda model, idx, *a, **k: seen.append(idx.tolist()) or prefill(
        model, idx, *a, **k))
    g = torch.Generator().manual_seed(4)
    seq, attn, gen, lp = M.generate(m, prompts, 12, temperature=0.8, stop_ids=tuple(range(0, 97, 4)),
                                    generator=g, return_logprobs=True)
    P = max(map(len, prompts))
    assert [[t for t in r if t] for r in seen[0]] == [LONG_PROMPTS[i] for i in (0, 2, 5, 1)] + [other, [7]]
    assert len(set(gen.sum(1).tolist())) > 2  # rows stopped at different steps
    assert all(seq[i, P - len(p):P].tolist() == p for i, p in enumerate(prompts))
    with torch.no_grad():
        full = M.sequence_logprobs(m, seq, attn, temperature=0.8)
    sel = gen[:, 1:].bool()
    torch.testing.assert_close(lp[:, 1:][sel], full[sel], atol=1e-5, rtol=0)
    seen.clear()
    a = M.generate(m, prompts, 8, temperature=0, return_logprobs=True)
    assert len(seen) == 1 and len(seen[0]) == 6
    b = M.generate(m, prompts, 8, temperature=0, use_cache=False, return_logprobs=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[0][12], a[0][14])  # one prompt's copies: one answer
    torch.testing.assert_close(a[3], b[3], atol=1e-5, rtol=0)


def test_init_scales_the_residual_projections_by_depth_and_zeroes_the_biases():
    """GPT-2's init: N(0, 0.02) for every matrix, but 0.02 / sqrt(2 * n_layer) for the two projections that
    write into the residual stream (attention's and the MLP's c_proj), and zero biases."""
    torch.manual_seed(0)
    m = M.GPT(M.GPTConfig(block_size=16, vocab_size=512, n_layer=8, n_head=4, n_embd=128))
    for name, p in m.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() / (0.02 / 4) - 1) < 0.05, name  # sqrt(2 * 8) = 4
        elif p.dim() == 2:
            assert abs(p.std().item() / 0.02 - 1) < 0.05, name
        elif name.endswith(".bias"):
            assert (p == 0).all(), name
