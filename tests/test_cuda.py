"""The CUDA paths, on a machine with a GPU (skipped elsewhere): the KV cache against the full forward in fp32
and under bf16 autocast, repeatable sampling from a CUDA generator, an fp16 step through the GradScaler and
fused AdamW, PPO's first ratio under bf16, and a checkpoint written from the GPU and read on a CPU."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
import ppo  # noqa: E402
import runtime  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TINY = dict(block_size=64, vocab_size=97, n_layer=2, n_head=2, n_embd=32)
PROMPTS = [[5] * 33, [1, 2, 3], list(range(20, 40)), [7], list(range(40, 57)), [9, 8, 7, 6, 5, 4]]


def tiny(**kw):
    torch.manual_seed(0)
    return M.GPT(M.GPTConfig(**{**TINY, **kw})).cuda().eval()


def cache_against_full_forward(m, ctx, seed=3):
    """Max |log-prob from generate - log-prob from one full forward| over the generated tokens (three rows
    are copies of other rows' prompts: they share its prefill, whose keys and values are indexed on the
    GPU)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    prompts = PROMPTS + [PROMPTS[2], PROMPTS[0], PROMPTS[2]]
    with torch.no_grad(), ctx:
        seq, attn, gen, lp = M.generate(m, prompts, 14, temperature=0.7, stop_ids=tuple(range(0, 97, 4)),
                                        generator=g, return_logprobs=True)
        full = M.sequence_logprobs(m, seq, attn, temperature=0.7)
    sel = gen[:, 1:].bool()
    assert sel.sum() > len(prompts) and len(set(gen.sum(1).tolist())) > 1  # rows stopped at different steps
    return (lp[:, 1:][sel] - full[sel]).abs().max().item()


def test_kv_cache_matches_full_forward_on_cuda_in_fp32(no_tf32):
    delta = cache_against_full_forward(tiny(), torch.autocast("cuda", enabled=False))
    print(f"cache vs full forward, fp32, max |delta log-prob|: {delta:.2e}")
    assert delta < 1e-5


def test_kv_cache_under_bf16_autocast_stays_within_bf16_rounding(no_tf32):
    # bf16 keeps 8 bits of mantissa: logits of a few units round by a few hundredths per matmul, while a
    # wrong key, position or mask moves a log-prob by about its spread over tokens (weights scaled up to make
    # that spread about 1.5)
    m = tiny()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4.0)
    bf16 = cache_against_full_forward(m, torch.autocast("cuda", dtype=torch.bfloat16))
    full = cache_against_full_forward(m, torch.autocast("cuda", enabled=False))
    print(f"cache vs full forward, max |delta log-prob|: bf16 {bf16:.2e}, fp32 {full:.2e}")
    assert bf16 < 0.2 and full < 1e-4


def test_a_cuda_generator_repeats_its_samples():
    m = tiny()
    a, b = (M.generate(m, PROMPTS, 10, top_p=0.9, generator=torch.Generator("cuda").manual_seed(5),
                       return_logprobs=True) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and a[0].is_cuda


def test_fp16_step_through_the_grad_scaler_and_fused_adamw():
    m = tiny().train()
    opt = runtime.configure_optimizer(m, 0.1, 1e-3, (0.9, 0.95), "cuda")
    assert opt.defaults["fused"]
    x = torch.randint(0, 97, (4, 24), device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        m(x[:, :-1], x[:, 1:])[1].backward()  # the true gradient, unscaled
    true = torch.stack([p.grad.norm() for p in m.parameters()]).norm()
    m.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cuda")
    before = [p.detach().clone() for p in m.parameters()]
    with torch.autocast("cuda", dtype=torch.float16):
        scaler.scale(m(x[:, :-1], x[:, 1:])[1]).backward()
    norm = runtime.optimizer_step(m, opt, scaler, 1.0)
    assert torch.allclose(norm, true, rtol=1e-2), (norm, true)  # unscaled before the clip
    assert all(not torch.equal(a, p) and torch.isfinite(p).all() for a, p in zip(before, m.parameters()))


def test_ppo_first_minibatch_ratio_under_bf16_is_one_up_to_rounding():
    policy = tiny(scalar_head=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    seq, attn, gen = M.generate(policy, PROMPTS, 12, generator=g)
    action = gen[:, 1:].float()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        old_logp = ppo.forward_policy(policy, seq, attn, 1.0)[0]
        mb = torch.tensor([4, 1, 2], device="cuda")  # a minibatch in another order: other kernel shapes
        logp = ppo.forward_policy(policy, seq[mb], attn[mb], 1.0)[0]
    _, st = ppo.ppo_clip_loss(logp, old_logp[mb], torch.randn_like(logp), action[mb], 0.2)
    worst = ((logp - old_logp[mb]).abs() * action[mb]).max().item()  # the largest |log ratio| of a token
    print(f"PPO's first minibatch under bf16: mean ratio {st['ratio']:.6f}, largest |log ratio| {worst:.2e}")
    assert st["ratio"] == pytest.approx(1.0, abs=1e-2) and worst < 0.02 and st["clipfrac"] == 0.0


def test_a_checkpoint_written_from_the_gpu_loads_on_a_cpu(tmp_path, no_tf32):
    m = tiny()
    path = str(tmp_path / "sft.pt")
    runtime.save_checkpoint(path, {"model": m.state_dict(), "model_args": TINY, "kind": "sft", "step": 1})
    back = runtime.model_from_checkpoint(runtime.load_checkpoint(path, "sft"), path)
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x)[0], m(x.cuda())[0].cpu(), atol=1e-5, rtol=0)
    assert next(back.parameters()).device.type == "cpu"
