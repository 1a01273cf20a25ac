import json
import re

import pytest

from data.readers import DataError, read_messages, read_preferences, read_prompts, write_jsonl

U = lambda s: {"role": "user", "content": s}  # noqa: E731
A = lambda s: {"role": "assistant", "content": s}  # noqa: E731
S = lambda s: {"role": "system", "content": s}  # noqa: E731


def write(tmp_path, *lines, name="d.jsonl"):
    """Write raw lines (str or bytes, dicts become JSON) and return the path."""
    path = tmp_path / name
    path.write_bytes(b"\n".join(l if isinstance(l, bytes)
                                else (json.dumps(l) if isinstance(l, dict) else l).encode()
                                for l in lines))
    return path


GOOD = {"messages": [U("hi"), A("hello")]}


# ---- bad input: one clear error naming file:line ----

def test_invalid_json(tmp_path):
    p = write(tmp_path, GOOD, "", '{"messages": [', GOOD)
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:3: invalid JSON"):
        read_messages(p)


def test_not_an_object(tmp_path):
    p = write(tmp_path, GOOD, "[1, 2]")
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:2: expected a JSON object"):
        read_messages(p)


def test_missing_key(tmp_path):
    p = write(tmp_path, GOOD, {"msgs": []})
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:2: missing key 'messages'"):
        read_messages(p)
    p = write(tmp_path, {"prompt": "q", "chosen": "a"})
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:1: missing key 'rejected'"):
        read_preferences(p)
    p = write(tmp_path, {"text": "q"})
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:1: missing key 'prompt'"):
        read_prompts(p)


@pytest.mark.parametrize("row, what", [
    ({"messages": "hi"}, "must be a messages list"),
    ({"messages": [{"role": "user", "content": 5}]}, r"messages\[0\].content must be a string"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\].role must be one of"),
    ({"messages": [U("hi"), "hello"]}, r"messages\[1\] must be an object"),
    ({"messages": [U("hi")]}, "no assistant message"),
])
def test_wrong_type(tmp_path, row, what):
    p = write(tmp_path, GOOD, GOOD, row)
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:3: .*{what}"):
        read_messages(p)


def test_wrong_type_preferences_and_prompts(tmp_path):
    p = write(tmp_path, {"prompt": 3, "chosen": "a", "rejected": "b"})
    with pytest.raises(DataError,
                       match=rf"^{re.escape(str(p))}:1: 'prompt' must be a string or messages list"):
        read_preferences(p)
    p = write(tmp_path, {"chosen": "a", "rejected": [A("b")]})
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:1: .*both"):
        read_preferences(p)
    p = write(tmp_path, {"messages": [U("hi"), A("hello")]})
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:1: .*last message must be from the user"):
        read_prompts(p)


def test_empty_file(tmp_path):
    p = write(tmp_path, "", "   ", "")
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}: file is empty"):
        read_messages(p)


def test_not_utf8(tmp_path):
    p = write(tmp_path, GOOD, GOOD, b'{"messages": [{"role": "user", "content": "caf\xe9"}]}')
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:3: not valid UTF-8"):
        read_messages(p)


def test_not_found(tmp_path):
    p = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}: file not found"):
        read_prompts(p)


def test_hh_history_mismatch(tmp_path):
    p = write(tmp_path, {"chosen": "\n\nHuman: a\n\nAssistant: b",
                         "rejected": "\n\nHuman: c\n\nAssistant: d"})
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:1: .*same history"):
        read_preferences(p)
    p = write(tmp_path, {"chosen": "just text", "rejected": "more text"})
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:1: 'chosen' is not an HH transcript"):
        read_preferences(p)


# ---- good input ----

def test_messages_good(tmp_path):
    convo = {"messages": [S("be brief"), U("hi"),
                          {"role": "assistant", "content": "héllo 🙂", "extra": 1}]}
    p = write(tmp_path, "\ufeff" + json.dumps(GOOD), "", convo, "")  # BOM, blank lines: fine
    assert read_messages(p) == [GOOD["messages"], [S("be brief"), U("hi"), A("héllo 🙂")]]


def test_trl_string_prompt(tmp_path):
    p = write(tmp_path, {"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    assert read_preferences(p) == [{"prompt": [U("2+2?")], "chosen": "4", "rejected": "5"}]


def test_trl_messages_prompt(tmp_path):
    p = write(tmp_path, {"prompt": [S("math"), U("2+2?")], "chosen": [A("4")], "rejected": [A("5")]})
    assert read_preferences(p) == [{"prompt": [S("math"), U("2+2?")], "chosen": "4", "rejected": "5"}]


def test_trl_implicit_prompt(tmp_path):
    history = [U("hi"), A("hello"), U("2+2?")]
    p = write(tmp_path, {"chosen": history + [A("4")], "rejected": history + [A("5")]})
    assert read_preferences(p) == [{"prompt": history, "chosen": "4", "rejected": "5"}]


def test_anthropic_hh(tmp_path):
    history = "\n\nHuman: What is 2+2?\n\nAssistant: Why?\n\nHuman: Homework."
    p = write(tmp_path, {"chosen": history + "\n\nAssistant: It is 4.",
                         "rejected": history + "\n\nAssistant: No."})
    assert read_preferences(p) == [{
        "prompt": [U("What is 2+2?"), A("Why?"), U("Homework.")],
        "chosen": "It is 4.",
        "rejected": "No.",
    }]


def test_prompts_good(tmp_path):
    p = write(tmp_path, {"prompt": "hi"}, {"messages": [S("s"), U("q")]}, {"prompt": [U("x")], "chosen": "y"})
    assert read_prompts(p) == [[U("hi")], [S("s"), U("q")], [U("x")]]


def test_write_jsonl_round_trip(tmp_path):
    rows = [{"prompt": "héllo 🙂", "n": 1}, {"messages": [U("a"), A("b")]}]
    path = tmp_path / "sub" / "out.jsonl"
    write_jsonl(path, rows)
    assert [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines()] == rows
    assert sorted(x.name for x in path.parent.iterdir()) == ["out.jsonl"]  # no temp file left behind
