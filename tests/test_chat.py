import pytest
import torch

from data.chat import render, render_prompt, render_response
from data.tokenizer import ASSISTANT, END, SPECIALS, USER, make_encoding, special_id, train_bpe

# A vocabulary with no merges at all: every byte is its own token (id = byte value), so the expected ids
# below can be worked out by hand. The specials follow: 256 EOT, 257 SYSTEM, 258 USER, 259 ASSISTANT, 260 END.
BYTES = make_encoding(train_bpe("", 256 + len(SPECIALS)))

CONVO = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ok."},
]


def test_two_turns_by_hand():
    ids, mask = render(BYTES, CONVO)
    assert ids == [
        256,                                          # EOT (BOS)
        257, 66, 101, 32, 107, 105, 110, 100, 46, 260,  # SYSTEM "Be kind." END
        258, 72, 105, 260,                            # USER "Hi" END
        259, 72, 101, 108, 108, 111, 33, 260,         # ASSISTANT "Hello!" END
        258, 66, 121, 101, 260,                       # USER "Bye" END
        259, 79, 107, 46, 260,                        # ASSISTANT "Ok." END
    ]
    assert mask == [
        0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0,
        0, 1, 1, 1, 1, 1, 1, 1,   # the assistant's words and its END are learned; its marker is not
        0, 0, 0, 0, 0,
        0, 1, 1, 1, 1,
    ]


def test_render_with_merges():
    enc = make_encoding(train_bpe("hello there, hello world. " * 50, 300))
    msgs = [{"role": "user", "content": "hello <|end|>"}, {"role": "assistant", "content": "hello world"}]
    ids, mask = render(enc, msgs)
    answer = enc.encode_ordinary("hello world")
    assert len(answer) < len("hello world")  # merges were used
    assert ids[-len(answer) - 2:] == [special_id(enc, ASSISTANT)] + answer + [special_id(enc, END)]
    assert mask == [0] * (len(ids) - len(answer) - 1) + [1] * (len(answer) + 1)
    assert ids.count(special_id(enc, END)) == 2  # the typed "<|end|>" stayed plain text


def test_render_prompt():
    ids = render_prompt(BYTES, CONVO[:4])
    assert ids[-1] == special_id(BYTES, ASSISTANT)
    assert ids == render(BYTES, CONVO[:4])[0] + [259]
    assert render_prompt(BYTES, [{"role": "user", "content": "Hi"}]) == [256, 258, 72, 105, 260, 259]
    assert special_id(BYTES, USER) == 258


@pytest.mark.parametrize("bad", [
    "hello",
    [],
    ["hello"],
    [{"content": "hi"}],
    [{"role": "bot", "content": "hi"}],
    [{"role": "user", "content": 3}],
    [{"role": "user"}],
])
def test_invalid_messages(bad):
    with pytest.raises(ValueError):
        render(BYTES, bad)
    with pytest.raises(ValueError):
        render_prompt(BYTES, bad)


def test_render_prompt_needs_user_last():
    with pytest.raises(ValueError, match="user"):
        render_prompt(BYTES, CONVO)


def test_a_role_marker_sampled_mid_reply_ends_it_not_ended_and_stays_out_of_its_text(monkeypatch):
    """Decoded, <|user|> would become the 8 characters "<|user|>": the reward model and the hidden human
    would score other tokens than the policy wrote. So every special token stops a reply; only <|end|> ends
    it."""
    import rollout
    from data.tokenizer import get_tokenizer
    enc = get_tokenizer("world")
    words, marker = enc.encode_ordinary("The fox is calm."), special_id(enc, USER)

    def generate(model, prompts, max_new_tokens, temperature, top_k, top_p, stops, **kw):
        assert {special_id(enc, s) for s in SPECIALS} <= set(stops)  # generate stops at any of them
        row = prompts[0] + words + [marker]
        gen = torch.tensor([[0] * len(prompts[0]) + [1] * (len(words) + 1)])
        return torch.tensor([row]), torch.ones_like(gen), gen, -0.5 * gen.float()
    monkeypatch.setattr(rollout, "generate", generate)
    (reply,) = rollout.respond(None, enc, [[{"role": "user", "content": "Describe the fox."}]])
    assert reply["text"] == "The fox is calm." and not reply["ended"] and reply["ids"][-1] == marker
    assert reply["logprob"] == -0.5 * len(words)  # the text's tokens: a stop other than <|end|> is not


def test_render_response_drops_the_end_of_an_unfinished_answer_and_keeps_the_end_of_a_long_row():
    """What reward models score and DPO takes log-probs of: an answer cut off never said <|end|> (scoring one
    would credit it with stopping); a row longer than block_size keeps its end, the whole answer."""
    prompt = [{"role": "user", "content": "Hi"}]
    ids, mask = render_response(BYTES, prompt, "Yo!")
    assert ids == render_prompt(BYTES, prompt) + [ord("Y"), ord("o"), ord("!"), 260]  # 260: <|end|>
    assert mask == [0] * (len(ids) - 4) + [1] * 4
    cut, cut_mask = render_response(BYTES, prompt, "Yo!", ended=False)
    assert cut == ids[:-1] and cut_mask == mask[:-1]  # the user turn's <|end|> stays, the answer's goes
    short, short_mask = render_response(BYTES, prompt, "Yo!", True, block_size=5)
    assert short == [259] + ids[-4:] and short_mask == [0, 1, 1, 1, 1]  # <|assistant|>, then the whole answer
    assert render_response(BYTES, prompt, "Yo!", True, block_size=len(ids)) == (ids, mask)


def test_response_rows_cut_as_render_response_does_and_say_how_many(capsys):
    """The rows a stage trains on: each exactly render_response's at block_size; a file's rows that do not
    fit are counted in one line (when say), never cut unannounced."""
    import rollout
    prompt = [{"role": "user", "content": "Hi"}]
    answers = [(prompt, "Yo!", True), (prompt, "Hello there, how are you?", False), (prompt, "Ok", True)]
    block = len(render_response(BYTES, prompt, "Yo!")[0])  # the first fits exactly, the second does not
    rows, masks = rollout.response_rows(BYTES, answers, block, "mine.jsonl")
    assert list(zip(rows, masks)) == [render_response(BYTES, *a, block_size=block) for a in answers]
    assert len(rows[1]) == block and rows[1] != render_response(BYTES, *answers[1])[0]
    assert capsys.readouterr().out == (f"warning: mine.jsonl: 1 of 3 answers with their prompts are longer "
                                       f"than block_size={block} tokens; each keeps its last {block} (the "
                                       "prompt's start is cut)\n")
    assert rollout.response_rows(BYTES, answers, block, "mine.jsonl", say=False) == (rows, masks)
    rollout.response_rows(BYTES, answers, block + 100, "mine.jsonl")
    assert capsys.readouterr().out == ""  # (and nothing said by say=False above)


def test_a_reply_of_a_million_spaces_renders_for_the_reward_model():
    """A sampled or file answer of a very long whitespace run: tiktoken's pre-split panics on it (a
    BaseException) unless it is encoded in pieces, as every message's content is."""
    from data.tokenizer import get_tokenizer
    enc = get_tokenizer("world")
    prompt = [{"role": "user", "content": "Describe the owl."}]
    response = "The owl" + " " * 1_100_000 + "is calm."
    ids, mask = render_response(enc, prompt, response)
    assert enc.decode(ids).endswith(response + END) and len(ids) == len(mask)
