"""
Chat template and SFT loss mask.

  <|endoftext|> <|system|> ...text... <|end|> <|user|> ...text... <|end|> <|assistant|> ...text... <|end|> ...
  mask:    0        0          0          0       0         0         0          0           1 ... 1      1

The model is trained only where the mask is 1: the assistant's words and the <|end|> that closes them, so it
learns what to say and when to stop, but never to imitate the user or to predict where a user turn begins.
"""

from data.tokenizer import ASSISTANT, END, EOT, SYSTEM, USER, encode_text, special_id

ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


def check_messages(messages) -> None:
    """Raise ValueError naming the first thing wrong with a messages list."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list, got {type(messages).__name__}"
                         + (" (empty)" if isinstance(messages, list) else ""))
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with role and content, got {type(m).__name__}")
        if not isinstance(m.get("role"), str) or m["role"] not in ROLES:  # (a list or object: not hashable)
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(m.get('content')).__name__}")


def render(enc, messages) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation, and the 0/1 loss mask (1 on assistant content and its <|end|>)."""
    check_messages(messages)
    ids, mask = [special_id(enc, EOT)], [0]  # BOS: every conversation starts fresh, like a new document
    for m in messages:
        # ordinary: typed "<|end|>" stays text
        body = encode_text(enc, m["content"]) + [special_id(enc, END)]
        train = int(m["role"] == "assistant")
        ids += [special_id(enc, ROLES[m["role"]])] + body
        mask += [0] + [train] * len(body)  # the role marker is given, never predicted
    return ids, mask


def render_prompt(enc, messages) -> list[int]:
    """Ids of a conversation so far (ending with a user turn) plus <|assistant|>, ready for generate()."""
    check_messages(messages)
    if messages[-1]["role"] != "user":
        raise ValueError(f"the last message must be from the user, got {messages[-1]['role']!r}")
    return render(enc, messages)[0] + [special_id(enc, ASSISTANT)]


def render_response(enc, messages, response, ended=True, block_size=None) -> tuple[list[int], list[int]]:
    """(prompt + response + <|end|>) ids and a mask that is 1 on the response and its <|end|> only: what
    reward models score and what DPO takes log-probs of. A response that never ended its turn gets no <|end|>:
    scoring one would credit it with stopping (a reward model then reads it at its last token, and must learn
    that running on is bad). Rows longer than block_size keep their last block_size tokens: the prompt's start
    is cut first, and the response's end, where a reward model reads its score, always stays."""
    prompt = render_prompt(enc, messages)
    reply = encode_text(enc, response) + ([special_id(enc, END)] if ended else [])
    ids, mask = prompt + reply, [0] * len(prompt) + [1] * len(reply)
    return (ids[-block_size:], mask[-block_size:]) if block_size else (ids, mask)


def sft_example(enc, messages, block_size=None) -> tuple[list[int], list[int]]:
    """One SFT training row: (input ids, targets), where targets[t] is the token after ids[t] if that token is
    learned (mask 1) and -1 (ignored by the loss) otherwise. Both are cut to block_size tokens."""
    ids, mask = render(enc, messages)
    # predict token t+1, only where it is learned
    targets = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
    return ids[:-1][:block_size], targets[:block_size]
