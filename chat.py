"""
Talk to any checkpoint, multi-turn.

    python chat.py                               # the first found in out/: ppo, dpo, grpo, rloo, sft, base
    python chat.py --ckpt=dpo                    # a stage's name: its checkpoint in out/ (here out/dpo.pt)
    python chat.py --ckpt=out/sft.pt --temperature=0.7 --top_p=0.9
    python chat.py --prompt="Describe the owl."  # answer once and exit (for scripts)

Every reply is generated from the whole conversation so far, rendered with the chat template: that is what
lets "Now write a sad sentence about it." know what "it" is. /reset forgets the conversation, /quit (or
Ctrl-D) exits. When the conversation no longer fits the context window, the oldest exchanges are dropped.
"""
import os
import sys

import torch

import runtime
from data.chat import render_prompt
from data.tokenizer import special_id
from rollout import respond

# -----------------------------------------------------------------------------
# config (every name can be overridden with --name=value)
out_dir = "out"            # where to look for a checkpoint when --ckpt is not given
ckpt = ""                  # a checkpoint's path, or a stage's name (base, sft, ppo, grpo, rloo, dpo: its .pt
                           # in out_dir); "": the furthest stage found
prompt = ""                # answer this one message and exit instead of starting the REPL
system = ""                # optional system message that opens every conversation
temperature = 0.8          # 0 = greedy. Below the stages' 1.0 (they need the policy's own distribution for
                           # KL): a reader gets fewer stray tokens, and asking again still gives another reply
top_k = None               # sample only from the k most likely tokens (None = off): cuts the unlikely tail
                           # outright, whatever the context; off by default so you see the model as trained
top_p = None               # nucleus sampling: the smallest set of tokens with this much mass (None = off);
                           # unlike top_k it adapts: few tokens where the model is sure, more where it is not
max_new_tokens = 96        # longest reply: twice the stages' longest (48), so a reply rarely stops short;
                           # that much of the context is kept free for it, the rest holds the conversation
seed = 1337                # same seed, same replies
device = "auto"            # auto: cuda > mps > cpu
dtype = "auto"             # auto: bf16 on CUDA if supported, else fp16; fp32 on CPU
show_tokens = False        # print the exact prompt the model sees before each reply (to debug the template):
                           # text quoted, special tokens bare, so a typed "<|end|>" shows inside the quotes
# -----------------------------------------------------------------------------


def find_checkpoint(out_dir, ckpt=""):
    """The checkpoint --ckpt names: a path as it is; a stage's name, its checkpoint in out_dir (dpo:
    out_dir/dpo.pt); "", the furthest stage's found there: a stage-3 one (ppo.pt, dpo.pt, grpo.pt, rloo.pt,
    in that order), else sft.pt, else base.pt."""
    stages = ("ppo", "dpo", "grpo", "rloo", "sft", "base")  # furthest first; grpo.py writes <baseline>.pt
    if ckpt:
        return os.path.join(out_dir, f"{ckpt}.pt") if ckpt in stages else ckpt
    found = [p for p in (os.path.join(out_dir, f"{s}.pt") for s in stages) if os.path.isfile(p)]
    if not found:
        raise SystemExit(f"error: no checkpoint in {out_dir}/; make one with "
                         f"{runtime.command('sft.py', out_dir)} (or pass --ckpt=...)")
    return found[0]


def fit_context(enc, history, n_keep, max_new_tokens, block_size):
    """Drop the oldest whole exchanges (a user message and its reply) after the first n_keep messages (the
    system message) until the prompt plus a reply of max_new_tokens fits block_size; the new user message is
    always kept. history is changed in place; returns how many exchanges were dropped."""
    dropped = 0
    while len(render_prompt(enc, history)) + max_new_tokens > block_size and len(history) > n_keep + 1:
        del history[n_keep:n_keep + 2]
        dropped += 1
    return dropped


def shown(enc, ids):
    """ids as one line: each run of ordinary tokens as a quoted string, each special token bare, e.g.
    <|endoftext|><|user|>'Hi <|end|>'<|end|><|assistant|>. Decoded as one string, a typed "<|end|>" (ordinary
    tokens) and the real special token would look the same, which is the mix-up this is for."""
    specials = {special_id(enc, s): s for s in enc.special_tokens_set}
    out, run = [], []
    for i in ids + [None]:  # None: flush the last run of text
        if i in specials or i is None:
            out += [repr(enc.decode(run))] if run else []
            out += [specials[i]] if i is not None else []
            run = []
        else:
            run.append(i)
    return "".join(out)


def reply(model, enc, history, n_keep, generator, ctx, max_new_tokens, temperature, top_k=None, top_p=None,
          show_tokens=False):
    """Fit history into the context, then sample the assistant's reply (temperature 0 = greedy). history is
    updated in place once the reply is there (old exchanges dropped, the reply appended; a Ctrl-C while it
    samples changes nothing). Returns the reply text, or None if the last message alone is too long (it is
    then taken back, and the earlier exchanges are all kept). A reply cut off at max_new_tokens is shown
    with " [cut off]" but kept as it is: the next prompt renders it closed with <|end|>, like any turn, so
    the model then sees it as a reply that ended there."""
    block_size = model.config.block_size
    # the least that could be sent (the system message and the new one) is checked before anything is dropped:
    # a message that cannot be sent must not cost the conversation its history
    least = render_prompt(enc, history[:n_keep] + history[-1:])
    if len(least) >= block_size:
        print(f"(that message is {len(least)} tokens with the template; "
              f"the context holds {block_size}: not sent)")
        history.pop()
        return None
    sent = list(history)  # trimmed and answered first; history changes only once there is a reply
    dropped = fit_context(enc, sent, n_keep, max_new_tokens, block_size)
    if dropped:
        print(f"(context full: dropped the oldest {dropped} exchange{'s' * (dropped > 1)} "
              f"to fit {block_size} tokens)")
    ids = render_prompt(enc, sent)
    if len(ids) + max_new_tokens > block_size:  # the message alone leaves less: the reply will stop there
        print(f"(room for {block_size - len(ids)} of --max_new_tokens={max_new_tokens} reply tokens)")
    if show_tokens:
        print(f"[prompt {len(ids)} tokens] {shown(enc, ids)}")
    with ctx:
        r = respond(model, enc, [sent], max_new_tokens, temperature, top_k, top_p, generator=generator)[0]
    history[:] = sent + [{"role": "assistant", "content": r["text"].strip()}]
    return r["text"].strip() + ("" if r["ended"] else " [cut off]")


def is_text(s):
    """Can s be written as UTF-8? Not if it holds a lone surrogate (undecodable input kept by Python)."""
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def main():
    # ---- 1. options (all checked before anything is read), device, precision
    runtime.configure(globals(), ranges={
        "temperature": (lambda v: v == 0 or v >= 1e-3, "0 (greedy) or >= 0.001"),
        "out_dir": (lambda v: not os.path.isfile(v), "a directory, not a file"),  # read: may be read-only
        "top_k": (lambda v: type(v) is int and v >= 1, "an int >= 1 (None = off)"),
        "top_p": (lambda v: type(v) in (int, float) and 0 < v <= 1, "in (0, 1] (None = off)"),
        # bytes the terminal's encoding cannot decode reach argv as lone surrogates; the tokenizer would
        # silently send them as U+FFFD
        **dict.fromkeys(("prompt", "system"), (is_text, "text (valid UTF-8)"))})
    rt = runtime.setup(device, dtype, seed)

    # ---- 2. the model: any language-model checkpoint (a PPO one may carry a value head; chat needs the LM)
    path = find_checkpoint(out_dir, ckpt)
    model, enc, ck = runtime.load_model(path, ("base", "sft", "ppo", "grpo", "dpo"), dropout=0.0,
                                        scalar_head=False)
    model.to(rt.device).eval()
    g = torch.Generator(device=rt.device).manual_seed(seed)
    opening = [{"role": "system", "content": system}] if system else []
    sampling = (max_new_tokens, temperature, top_k, top_p)
    # the shortest prompt (the system message and a one-token message) must leave room for a whole reply, else
    # every message would be refused, or would cost the conversation all its history
    block_size, one = model.config.block_size, [{"role": "user", "content": "?"}]
    bare, least = len(render_prompt(enc, one)), len(render_prompt(enc, opening + one))
    if bare + max_new_tokens > block_size:
        raise SystemExit(f"error: --max_new_tokens={max_new_tokens} leaves no room for a message in the "
                         f"model's {block_size}-token context: it must be at most {block_size - bare}")
    if least + max_new_tokens > block_size:
        raise SystemExit(f"error: --system is {least - bare} tokens with the template: with --max_new_tokens="
                         f"{max_new_tokens} that leaves no room for a message in the {block_size}-token "
                         "context; shorten it or lower --max_new_tokens")

    # ---- 3. one message (--prompt), or the REPL: every reply sees the whole conversation so far
    if prompt:
        history = opening + [{"role": "user", "content": prompt}]
        if (n := len(render_prompt(enc, history))) >= block_size:  # a script gets one line and a failure
            raise SystemExit(f"error: --prompt is {n} tokens with the template; the context holds "
                             f"{block_size}")
        print(reply(model, enc, history, len(opening), g, rt.ctx, *sampling, show_tokens))
        raise SystemExit(0)
    if sys.stdin is None:  # closed (`<&-`): input() would raise, not end
        raise SystemExit("error: standard input is closed, so there is nothing to chat over; --prompt=... "
                         "answers one message")
    config = ck.get("config") if isinstance(ck.get("config"), dict) else {}  # hand-made: maybe None or a str
    kind = config.get("baseline", "grpo") if ck["kind"] == "grpo" else ck["kind"]  # or rloo
    print(f"chatting with {path} ({kind}, step {ck.get('step', '?')}); /reset clears the conversation, "
          "/quit exits")
    history = list(opening)
    # a byte stdin's encoding (UTF-8) cannot decode would make input() raise and lose the lines read with it:
    # keep it as a lone surrogate instead, and refuse that line below
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
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
        if not is_text(line):  # a lone surrogate: the tokenizer would silently send it as U+FFFD
            print(f"(not valid {sys.stdin.encoding} text: not sent)")
            continue
        history.append({"role": "user", "content": line})
        try:
            out = reply(model, enc, history, len(opening), g, rt.ctx, *sampling, show_tokens)
        except KeyboardInterrupt:  # Ctrl-C while it answers: the message is taken back, the chat goes on
            history.pop()
            print("\n(interrupted: not answered)")
            continue
        if out is not None:
            print(out)


if __name__ == "__main__":
    runtime.run(main)
