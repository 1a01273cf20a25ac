"""bench.py's arithmetic: the sampling FLOPs are the forward passes generate really makes (by hand, and
against torch's FLOP counter), and a prompt length that leaves no room for the new tokens is refused in one
line."""
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
from bench import forward_flops  # noqa: E402  (importing bench.py runs nothing)

TINY = ["--train_iters=1", "--warmup_iters=0", "--gen_repeats=1", "--gen_batches=(2,)", "--matmul_size=64",
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


def test_a_prompt_with_no_room_for_the_new_tokens_is_refused(refusal):
    """generate clips a reply to the room the context leaves: a longest prompt of 250 in the sampling model's
    256 would time 6 new tokens under a header that says 32."""
    message = refusal("bench", *TINY, "--gen_prompt_lens=(7,250)")
    assert message.startswith("error: --gen_prompt_lens=(7, 250) is out of range") and "\n" not in message
    assert "<= 256" in message, message
