"""bench.py's arithmetic: the sampling FLOPs are the forward passes generate really makes (by hand, and
against torch's FLOP counter); a prompt length that leaves no room for the new tokens, more threads than
cores, no precision to train in and dims too large for memory are each refused in one line; the sampling
table shows each row as soon as it is timed, and its header the sampling model's context; a float32 row that
ran in TF32 says so."""
import os
import sys
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402  (importing bench.py runs nothing)
import model as M  # noqa: E402
from bench import forward_flops  # noqa: E402

TINY = ["--train_iters=1", "--warmup_iters=0", "--gen_repeats=1", "--gen_batches=(2,)", "--matmul_size=256",
        "--dtypes=('float32',)", "--block_size=32", "--n_layer=1", "--n_head=2", "--n_embd=32"]


def test_sampling_flops_by_hand():
    """A row of 3 prompt tokens (after 1 padding) and 2 sampled: 4 tokens go through the trunk (the last
    sampled one never does), the i-th attending to i keys, and the head makes logits twice."""
    attn = torch.tensor([[0, 1, 1, 1, 1, 1]])
    gen = torch.tensor([[0, 0, 0, 0, 1, 1]])
    n_params, head, n_layer, n_embd = 1000, 100, 2, 8
    trunk = 2 * (1000 - 100) * 4
    logits = 2 * 100 * 2
    attention = 4 * 2 * 8 * (1 + 2 + 3 + 4)
    assert forward_flops(n_params, head, n_layer, n_embd, attn, gen) == trunk + logits + attention
    # the same row twice, the second a copy that reads the first's prompt pass: its 3 prompt tokens skip the
    # trunk, their queries' 1 + 2 + 3 pairs are not attended again, and its first logits are the first row's
    both = forward_flops(n_params, head, n_layer, n_embd, attn.repeat(2, 1), gen.repeat(2, 1), shared=[0, 3])
    assert both == 2 * (trunk + logits + attention) - 2 * 900 * 3 - 2 * 100 - 4 * 2 * 8 * (1 + 2 + 3)
    assert bench.shared_prompt_tokens([[1, 2, 3], [4], [1, 2, 3], [4], [1, 2]]) == [0, 0, 3, 1, 0]


def test_sampling_flops_are_the_matmuls_generate_runs():
    """torch's FLOP counter sees generate's weight matmuls (aten.mm, addmm): with one-token prompts (no
    padding, no prompt positions without logits) and no biases they are exactly the count's matmul part
    for the network's matrices. The attention term is the hand-worked one above (n_layer=0 leaves it out)."""
    torch.manual_seed(0)
    m = M.GPT(M.GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=16, bias=False)).eval()
    with FlopCounterMode(display=False) as counter:
        _, attn, gen = M.generate(m, [[3], [7], [1]], 8, generator=torch.Generator().manual_seed(0))
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(v for k, v in counts.items() if str(k).split(".")[-1] in ("mm", "addmm"))
    matrices = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and "wpe" not in n)
    assert matmuls == forward_flops(matrices, m.lm_head.weight.numel(), 0, 16, attn, gen)
    prompts = [[3], [7], [3], [3], [7]]  # copies of a prompt share its pass: fewer matmuls, counted
    with FlopCounterMode(display=False) as counter:
        _, attn, gen = M.generate(m, prompts, 8, generator=torch.Generator().manual_seed(0))
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(v for k, v in counts.items() if str(k).split(".")[-1] in ("mm", "addmm"))
    shared = bench.shared_prompt_tokens(prompts)
    assert matmuls == forward_flops(matrices, m.lm_head.weight.numel(), 0, 16, attn, gen, shared)
    assert matmuls < forward_flops(matrices, m.lm_head.weight.numel(), 0, 16, attn, gen)


def test_a_prompt_with_no_room_for_the_new_tokens_is_refused(refusal):
    """generate clips a reply to the room the context leaves: a longest prompt of 250 in the sampling model's
    256 would time 6 new tokens under a header that says 32."""
    message = refusal("bench", *TINY, "--gen_prompt_lens=(7,250)")
    assert message.startswith("error: --gen_prompt_lens=(7, 250) is out of range") and "\n" not in message
    assert "<= 256" in message, message


def test_more_threads_than_cores_are_refused(refusal):
    """They only wait on each other, and far more (--threads=100000) crash torch with a segfault."""
    cores = os.cpu_count()
    message = refusal("bench", *TINY, f"--threads={cores + 1}")
    assert message == (f"error: --threads={cores + 1} is out of range: it must be between 0 and {cores}, "
                       "this machine's cores"), message


def test_no_precision_to_train_in_is_refused(refusal):
    """--dtypes=() would print an empty training table without saying why."""
    message = refusal("bench", *TINY, "--dtypes=()")
    assert message.startswith("error: --dtypes=() is out of range: it must be a non-empty tuple"), message


def test_a_matmul_too_small_to_measure_a_peak_is_refused(refusal):
    """A 16 x 16 product is over before the clock moves: its "peak" was a fraction of the model's own speed,
    and the training and sampling rows read thousands of per cent of it."""
    message = refusal("bench", *TINY, "--matmul_size=16")
    assert message == ("error: --matmul_size=16 is out of range: it must be >= 256: a smaller product is too "
                       "brief to measure a peak")


def test_dims_too_large_for_memory_are_one_line(refusal):
    """A vocabulary of 10**15 (a 128 PB embedding, past any address space) is the allocator's error, shown as
    one line naming the dims rather than its traceback; nothing of the tables is printed first."""
    message = refusal("bench", *TINY, "--vocab_size=1000000000000000")
    assert message.startswith("error: out of memory on ") and "\n" not in message, message
    assert "--n_embd=32" in message and "--vocab_size=1000000000000000" in message, message


def test_an_error_that_is_not_out_of_memory_is_not_hidden():
    assert bench.out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to ..."))
    assert bench.out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    assert not bench.out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_each_sampling_row_comes_as_soon_as_its_batch_size_is_timed(monkeypatch):
    """A default run spends minutes sampling: the first row must not wait for the other batch sizes."""
    timed = []

    def speed(fn, model, prompts):  # records the batch size it was asked to time
        timed.append(len(prompts))
        return 1.0, 1.0
    monkeypatch.setattr(bench, "sampling_speed", speed)
    monkeypatch.setattr(bench, "gen_batches", (2, 3))
    rows = bench.sampling_table(types.SimpleNamespace(config=M.GPTConfig(vocab_size=50)), None)
    assert next(iter(rows))[0] == 2
    assert set(timed) == {2}, timed


def test_gen_copies_samples_each_prompt_that_many_times_in_a_row(monkeypatch):
    """--gen_copies=3 at batch 7: 3 distinct prompts, each 3 times in a row, the last cut to 1 (as best-of-n
    and reward.py's K answers lay them out); 1, the default, keeps every prompt distinct."""
    timed = []
    monkeypatch.setattr(bench, "sampling_speed", lambda fn, m, prompts: timed.append(prompts) or (1.0, 1.0))
    monkeypatch.setattr(bench, "gen_batches", (7,))
    monkeypatch.setattr(bench, "gen_repeats", 1)
    for copies in (3, 1):
        monkeypatch.setattr(bench, "gen_copies", copies)
        timed.clear()
        list(bench.sampling_table(types.SimpleNamespace(config=M.GPTConfig(vocab_size=50)), None))
        p = timed[0]
        assert len(p) == 7 and all(q == p for q in timed)  # the same prompts for generate and the plain loop
        if copies == 3:
            assert p[0] == p[1] == p[2] != p[3] == p[4] == p[5] != p[6] and p[6] not in p[:6]
        else:
            assert len(set(map(tuple, p))) == 7


def test_training_flops_are_nanogpts_estimate_by_hand(monkeypatch):
    """A step of B x T tokens timed at 2 s: tokens/s = B * T / 2, and FLOP/s =
    (6 N + 12 * n_layer * n_embd * T) per token (2N forward, 4N backward, the attention's q.k and sum of v)
    times the tokens, over 2 s."""
    monkeypatch.setattr(bench, "env", types.SimpleNamespace(device="cpu", device_type="cpu"), raising=False)
    for name, value in dict(n_layer=2, n_head=2, n_embd=16, vocab_size=40, block_size=8, batch_size=3,
                            compile=False).items():
        monkeypatch.setattr(bench, name, value)
    monkeypatch.setattr(bench, "timed", lambda fn, iters, warmup: 2.0)
    n = M.GPT(M.GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=40, block_size=8)).get_num_params()
    tps, flops = bench.train_speed("float32")
    assert tps == 3 * 8 / 2.0
    assert flops == pytest.approx((6 * n + 12 * 2 * 16 * 8) * 3 * 8 / 2.0)


def test_sampling_speed_counts_generated_tokens_over_the_call(monkeypatch):
    """tokens/s is the generated tokens (not the prompts') over the call's time; FLOP/s is forward_flops of
    the result over the same time."""
    monkeypatch.setattr(bench, "env", types.SimpleNamespace(device="cpu", device_type="cpu"), raising=False)
    ticks = iter([1.0, 3.0])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks))
    attn = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    gen = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]])
    m = M.GPT(M.GPTConfig(block_size=8, vocab_size=40, n_layer=1, n_head=2, n_embd=16))
    tps, flops = bench.sampling_speed(lambda *a, **k: (attn, attn, gen), m, [[1]])
    assert tps == 3 / 2.0
    expect = forward_flops(m.get_num_params(), m.lm_head.weight.numel(), 1, 16, attn, gen)
    assert flops == pytest.approx(expect / 2.0)


def test_the_sampling_row_shows_medians_and_the_median_of_the_per_turn_ratios(monkeypatch):
    """Three turns, generate at 10, 30, 20 tok/s and plain at 5, 20, 40: per-turn ratios 2, 1.5, 0.5, median
    1.5 (the ratio of the medians, 20 / 20, would hide a busy turn's pairing); FLOP/s 100, 400, 300 have
    median 300, and a peak of 600 makes it half of peak."""
    speeds = iter([(0.0, 0.0), (0.0, 0.0),  # the untimed warm-up turn
                   (10.0, 100.0), (5.0, 0.0), (30.0, 400.0), (20.0, 0.0), (20.0, 300.0), (40.0, 0.0)])
    monkeypatch.setattr(bench, "sampling_speed", lambda fn, model, prompts: next(speeds))
    monkeypatch.setattr(bench, "gen_batches", (2,))
    monkeypatch.setattr(bench, "gen_repeats", 3)
    (row,) = bench.sampling_table(types.SimpleNamespace(config=M.GPTConfig(vocab_size=50)), 600.0)
    assert row == (2, 20.0, 20.0, 1.5, 300.0, 0.5)


def test_a_low_precision_under_half_of_fp32s_speed_is_emulated_and_over_half_is_not(monkeypatch, capsys):
    """The rule runtime.setup warns by: bf16 at 50 of fp32's 80 GFLOP/s has units (its fraction is shown),
    fp16 at 30 is emulated (no peak, no fraction, and one line saying so)."""
    import runtime
    from conftest import run_here
    speeds = {torch.float32: 80e9, torch.bfloat16: 50e9, torch.float16: 30e9}
    for mod in (bench, runtime):
        monkeypatch.setattr(mod, "matmul_flops", lambda ptdtype, *a, **k: speeds[ptdtype])
    args = [a for a in TINY if not a.startswith("--dtypes")]
    run_here(monkeypatch, bench, *args, "--dtypes=('bfloat16','float16')", "--device=cpu")
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["bfloat16"],
                                                                                               ["float16"])}
    assert rows["bfloat16"][3] == "50.0" and rows["bfloat16"][4].endswith("%"), out
    assert rows["float16"][3:5] == ["n/a", "n/a"], out
    assert "float16: this CPU has no float16 matmul units" in out and "bfloat16: this CPU" not in out
    # the sampling model's context is not --block_size=32 (the training rows'): the header says which it is
    assert "sampling (float32, KV cache, context 256 = max(--block_size, 256)): prompts of 7-36" in out, out


@pytest.mark.parametrize("device_type, precision, capability, want", [
    ("cuda", "high", (9, 0), "float32 (TF32)"),  # runtime.setup's allow_tf32 on a card with TF32
    ("cuda", "highest", (9, 0), "float32"),      # TF32 turned off
    ("cuda", "high", (7, 0), "float32"),         # before Ampere: no TF32 to run in
    ("cuda", "high", (8, 0), "float32 (TF32)"),  # Ampere itself (an A100) has it
    ("cuda", "medium", (8, 6), "float32 (TF32)"),  # "medium" allows TF32 too: only "highest" turns it off
    ("cpu", "high", None, "float32"),
])
def test_the_float32_row_says_tf32_where_its_matmuls_run_in_tf32(monkeypatch, device_type, precision,
                                                                   capability, want):
    """On CUDA runtime.setup enables TF32: the "float32" row (and its peak) then measured TF32 matmuls
    under fp32's name."""
    monkeypatch.setattr(bench, "env", types.SimpleNamespace(device_type=device_type), raising=False)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: precision)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert bench.label("float32") == want
    assert bench.label("bfloat16") == "bfloat16"


def test_the_rows_and_the_sampling_header_name_each_precision_by_its_label(monkeypatch, capsys):
    """Where label() says TF32 (a CUDA card, stood in for on this CPU), the float32 training row and the
    sampling header carry that name, the other precisions their own."""
    from conftest import run_here
    monkeypatch.setattr(bench, "label", lambda d: "float32 (TF32)" if d == "float32" else d)
    run_here(monkeypatch, bench, *[a for a in TINY if not a.startswith("--dtypes")], "--device=cpu",
             "--dtypes=('float32','bfloat16')")
    out = capsys.readouterr().out
    names = [line[:14] for line in out.splitlines()
             if line[:14].rstrip() in ("float32", "bfloat16", "float32 (TF32)")]  # the rows' dtype column
    assert names == ["float32 (TF32)", "bfloat16      "], out
    assert "sampling (float32 (TF32), KV cache, context 256" in out, out


def test_each_precisions_peak_is_timed_for_at_least_half_a_second(monkeypatch, capsys):
    """A GPU does a matmul in microseconds: a few of them would time the launches, so each peak keeps
    multiplying for 0.5 s (--matmul_size=256 takes milliseconds here), once per precision."""
    import time
    from conftest import run_here
    real, took = bench.matmul_flops, []

    def timed(ptdtype, *a, **k):
        t0 = time.perf_counter()
        flops = real(ptdtype, *a, **k)
        took.append((ptdtype, time.perf_counter() - t0))
        return flops
    monkeypatch.setattr(bench, "matmul_flops", timed)
    run_here(monkeypatch, bench, *TINY, "--device=cpu")  # trains and samples in float32: one peak
    capsys.readouterr()
    assert [d for d, _ in took] == [torch.float32] and took[0][1] >= 0.5, took
