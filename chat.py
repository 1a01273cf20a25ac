"""
Talk to any checkpoint, multi-turn.

    python chat.py                              # the latest stage in out/: ppo.pt, dpo.pt, sft.pt, else base.pt
    python chat.py --ckpt=out/sft.pt --temperature=0.7 --top_p=0.9
    python chat.py --prompt="Describe the owl."  # answer once and exit (for scripts)

Every reply is generated from the whole conversation so far, rendered with the chat template: that is what
lets "Now write a sad sentence about it." know what "it" is. /reset forgets the conversation, /quit (or
Ctrl-D) exits. When the conversation no longer fits the context window, the oldest exchanges are dropped.
"""
import os

import torch

import runtime
from data.chat import render_prompt
from rollout import respond

# -----------------------------------------------------------------------------
# config (every name can be overridden with --name=value)
out_dir = "out"            # where to look for a checkpoint when --ckpt is not given
ckpt = ""                  # a base, sft, ppo or dpo checkpoint ("" = the latest stage found in out_dir)
prompt = ""                # answer this one message and exit instead of starting the REPL
system = ""                # optional system message that opens every conversation
temperature = 0.8          # 0 = greedy
top_k = None               # sample only from the k most likely tokens (None = off)
top_p = None               # nucleus sampling: the smallest set of tokens with this much mass (None = off)
max_new_tokens = 96        # longest reply
seed = 1337                # same seed, same replies
device = "auto"            # auto: cuda > mps > cpu
dtype = "auto"             # auto: bf16 on CUDA if supported, else fp16; fp32 on CPU
show_tokens = False        # print the exact prompt the model sees before each reply (to debug the template)
# -----------------------------------------------------------------------------
runtime.configure(globals())
rt = runtime.setup(device, dtype, seed)
if not ckpt:
    found = [p for p in (os.path.join(out_dir, f) for f in ("ppo.pt", "dpo.pt", "sft.pt", "base.pt")) if os.path.isfile(p)]
    if not found:
        raise SystemExit(f"error: no checkpoint in {out_dir}/; make one with `python sft.py` (or pass --ckpt=...)")
    ckpt = found[0]
# a PPO checkpoint may carry a value head: chat needs only the language model
model, enc, ck = runtime.load_model(ckpt, ("base", "sft", "ppo", "dpo"), dropout=0.0, scalar_head=False)
model.to(rt.device).eval()
block_size = model.config.block_size
g = torch.Generator(device=rt.device).manual_seed(seed)
opening = [{"role": "system", "content": system}] if system else []


def reply(history):
    """Fit history into the context (dropping whole old exchanges), then sample the assistant's reply.
    Returns the reply text, or None if the last message alone is too long. history is updated in place."""
    dropped = 0
    # keep the system message and the new user message; drop the oldest user+assistant pair until it fits
    while len(render_prompt(enc, history)) + max_new_tokens > block_size and len(history) > len(opening) + 1:
        del history[len(opening):len(opening) + 2]
        dropped += 1
    if dropped:
        print(f"(context full: dropped the oldest {dropped} exchange{'s' * (dropped > 1)} to fit {block_size} tokens)")
    ids = render_prompt(enc, history)
    if len(ids) >= block_size:
        print(f"(that message is {len(ids)} tokens with the template; the context holds {block_size}: not sent)")
        history.pop()
        return None
    if show_tokens:
        print(f"[prompt {len(ids)} tokens] {enc.decode(ids)!r}")
    with rt.ctx:
        r = respond(model, enc, [history], max_new_tokens, temperature, top_k, top_p, generator=g)[0]
    history.append({"role": "assistant", "content": r["text"].strip()})
    return r["text"].strip() + ("" if r["ended"] else " [cut off]")


if prompt:
    out = reply(opening + [{"role": "user", "content": prompt}])
    print(out if out is not None else "")
    raise SystemExit(0 if out is not None else 1)

print(f"chatting with {ckpt} ({ck['kind']}, step {ck.get('step', '?')}); /reset clears the conversation, /quit exits")
history = list(opening)
while True:
    try:
        line = input("> ").strip()
    except (EOFError, KeyboardInterrupt):
        print()
        break
    if line == "/quit":
        break
    if line == "/reset":
        history = list(opening)
        print("(conversation cleared)")
        continue
    if not line:
        continue
    history.append({"role": "user", "content": line})
    out = reply(history)
    if out is not None:
        print(out)
