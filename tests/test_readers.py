import json
import os
import re
import stat
import struct

import pytest
import torch

from data.gpt2 import read_gpt2, read_safetensors
from data.readers import (DataError, read_comparisons, read_messages, read_preferences, read_prompts,
                          read_rankings, write_jsonl)

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


def test_json_nested_too_deeply_is_one_line(tmp_path):
    p = write(tmp_path, GOOD, "[" * 100_000)  # json.loads raises RecursionError, not a JSONDecodeError
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:2: invalid JSON: nested too deeply$"):
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


def test_a_lone_surrogate_escape_is_refused_by_line_and_a_whole_pair_is_text(tmp_path):
    """JSON lets a file write half a UTF-16 pair alone (\\ud800). No UTF-8 text holds it: the tokenizer
    swapped it silently and the first print of that prompt crashed, after training had saved."""
    p = write(tmp_path, GOOD, b'{"messages": [{"role": "user", "content": "a\\ud800b"}, '
                              b'{"role": "assistant", "content": "x"}]}')
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:2: invalid text: a lone surrogate"):
        read_messages(p)
    p = write(tmp_path, b'{"prompt": "hi \\uDC00"}')  # the low half, in capitals
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:1: invalid text"):
        read_prompts(p)
    p = write(tmp_path, b'{"prompt": "a fox \\ud83e\\udd8a \\u00e9"}')  # a whole pair is one character
    assert read_prompts(p) == [[U("a fox \U0001f98a \u00e9")]]


def test_an_integer_too_long_to_read_and_a_role_that_is_not_a_string_are_refused_by_line(tmp_path):
    """Python reads at most 4,300 digits of an integer from text and raises a ValueError that is not a
    JSONDecodeError; a role given as a list or an object cannot even be looked up. Both were tracebacks."""
    p = write(tmp_path, GOOD, b'{"id": ' + b"1" * 5000 + b', "messages": []}')
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:2: invalid JSON: Exceeds the limit"):
        read_messages(p)
    for role in (["user"], {"a": 1}):
        p = write(tmp_path, GOOD, {"messages": [{"role": role, "content": "hi"}, A("yo")]})
        role_must = r"'messages': messages\[0\]\.role must be"
        with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:2: {role_must}"):
            read_messages(p)
        p = write(tmp_path, {"prompt": [{"role": role, "content": "hi"}]})
        with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:1: "):
            read_prompts(p)


def test_a_bad_byte_after_a_byte_order_mark_is_the_byte_named(tmp_path):
    """The line names the bad byte and its column as the user sees the line (the BOM is not text): not the
    byte three places before it, as when the offset into the BOM-stripped text indexed the raw line."""
    p = write(tmp_path, b'\xef\xbb\xbf{"prompt": "caf\xe9"}', b'{"prompt": "caf\xe9"}')
    bad = r"not valid UTF-8 \(byte 0xe9 at column 16\)$"
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:1: {bad}"):
        read_prompts(p)
    p = write(tmp_path, GOOD, b'{"prompt": "caf\xe9"}')  # without a BOM, the same line says the same
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:2: {bad}"):
        read_prompts(p)
    assert read_prompts(write(tmp_path, b'\xef\xbb\xbf{"prompt": "caf\xc3\xa9"}')) == [[U("caf\u00e9")]]


def test_not_found(tmp_path):
    p = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}: file not found"):
        read_prompts(p)


def test_hh_history_mismatch(tmp_path):
    p = write(tmp_path, {"chosen": "\n\nHuman: a\n\nAssistant: b",
                         "rejected": "\n\nHuman: c\n\nAssistant: d"})
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:1: .*same history"):
        read_preferences(p)
    p = write(tmp_path, {"chosen": "just text", "rejected": "more text"})  # TRL text without its 'prompt'
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:1: 'chosen' is not an HH transcript .*; make "
                                        "it one, or add a 'prompt' key"):
        read_preferences(p)


RANKED = {"prompt": [U("Describe the owl.")], "responses": ["The owl is calm.", "No."],
          "ended": [True, False], "ranking": [1, 0]}


@pytest.mark.parametrize("change, what", [
    ({"prompt": [U("hi"), A("hello")]}, "'prompt': the last message must be from the user, got 'assistant'"),
    ({"prompt": "Describe the owl."}, "'prompt' must be a messages list, got str"),
    ({"responses": "ab"}, "'responses' must be a list of strings, got str"),  # not two answers 'a' and 'b'
    ({"responses": {"0": "a", "1": "b"}}, "'responses' must be a list of strings, got dict"),
    ({"responses": ["a", 2]}, r"'responses'\[1\] must be a string, got int"),
    ({"responses": ["a"], "ended": [True], "ranking": [0]}, "'responses' must hold at least 2"),
    ({"ranking": [0.0, 1.0]}, r"'ranking' must list each index 0\.\.1 of 'responses' once"),
    ({"ranking": [False, True]}, r"'ranking' must list each index 0\.\.1"),
    ({"ranking": [0, 0]}, r"'ranking' must list each index 0\.\.1"),
    ({"ranking": "10"}, "'ranking' must be a list of indices, got str"),
    ({"ended": "ab"}, "'ended' must be a list of 2 true/false values"),
    ({"ended": [True]}, "'ended' must be a list of 2 true/false values"),
    ({"ended": [1, "no"]}, "'ended' must be a list of 2 true/false values"),
])
def test_comparisons_that_a_stage_could_not_use_are_refused_by_line(tmp_path, change, what):
    """Each of these once passed the reader and crashed reward.py or dpo.py later with a traceback, or (a
    string of responses) was silently read as one-character answers."""
    p = write(tmp_path, RANKED, {**RANKED, **change})
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:2: {what}"):
        read_comparisons(p)


def test_comparisons_not_an_object_or_missing_a_key(tmp_path):
    p = write(tmp_path, RANKED, "[1, 2]")
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:2: expected a JSON object"):
        read_comparisons(p)
    p = write(tmp_path, {k: v for k, v in RANKED.items() if k != "ranking"})
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:1: missing key 'ranking'"):
        read_comparisons(p)


# ---- good input ----


def test_comparisons_good(tmp_path):
    no_ended = {k: v for k, v in RANKED.items() if k != "ended"}  # absent: every answer ended its turn
    trl_view = {"chosen": "No.", "rejected": "The owl is calm."}  # what reward.py adds for dpo.py: ignored
    p = write(tmp_path, "\ufeff" + json.dumps({**RANKED, **trl_view}), "", no_ended)
    assert read_comparisons(p) == [RANKED, {**RANKED, "ended": [True, True]}]


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


def test_an_hh_transcript_split_into_prompt_and_answers_reads_as_its_turns(tmp_path):
    """TRL's split of an HH row keeps the transcript up to "\n\nAssistant:" as a string prompt: it was read
    as one user message holding the literal "Human: ... Assistant:" text."""
    history = "\n\nHuman: What is 2+2?\n\nAssistant: Why?\n\nHuman: Homework.\n\nAssistant:"
    p = write(tmp_path, {"prompt": history, "chosen": " It is 4.", "rejected": " No."},
              {"prompt": "\n\nHumans are kind?", "chosen": "Yes.", "rejected": "No."})
    assert read_preferences(p) == [
        {"prompt": [U("What is 2+2?"), A("Why?"), U("Homework.")], "chosen": "It is 4.", "rejected": "No."},
        {"prompt": [U("\n\nHumans are kind?")], "chosen": "Yes.", "rejected": "No."}]  # no "Human:" turn


def test_an_hh_prompt_without_the_blank_lines_is_still_an_hh_prompt(tmp_path):
    """"Human: ..." at the very start opens a transcript (as the HH parser reads it): it was one user message
    holding the literal "Human: ... Assistant:" text, and the answers kept their leading space."""
    p = write(tmp_path, {"prompt": "Human: hi\n\nAssistant:", "chosen": " Hello.", "rejected": " Go."})
    assert read_preferences(p) == [{"prompt": [U("hi")], "chosen": "Hello.", "rejected": "Go."}]


def test_an_hh_prompt_is_one_that_opens_with_a_turn_of_either_role_and_only_one_that_opens_so(tmp_path):
    """A split transcript whose first turn is the assistant's (a greeting) is HH text as much as one opening
    with "Human:"; a plain prompt that mentions "Human:" later on is a user message, not a transcript with
    text before its first turn (which would be refused)."""
    greeting = "\n\nAssistant: Hi, how can I help?\n\nHuman: 2+2?\n\nAssistant:"
    p = write(tmp_path, {"prompt": greeting, "chosen": " 4.", "rejected": " 5."},
              {"prompt": "Write a poem. Human: rights matter.", "chosen": "Yes.", "rejected": "No."})
    assert read_preferences(p) == [
        {"prompt": [A("Hi, how can I help?"), U("2+2?")], "chosen": "4.", "rejected": "5."},
        {"prompt": [U("Write a poem. Human: rights matter.")], "chosen": "Yes.", "rejected": "No."}]


def test_answers_that_already_hold_the_hh_prompt_are_not_prefixed_with_it_again(tmp_path):
    """Some exports keep the split prompt and the whole transcripts: prefixing the prompt again silently made
    the history [user a, assistant "", user a]."""
    prompt = "\n\nHuman: a\n\nAssistant:"
    p = write(tmp_path, {"prompt": prompt, "chosen": prompt + " b", "rejected": prompt + " c"},
              {"prompt": prompt, "chosen": prompt + " b", "rejected": " c"})  # one of each: both read
    assert read_preferences(p) == [{"prompt": [U("a")], "chosen": "b", "rejected": "c"}] * 2


@pytest.mark.parametrize("chosen, rejected", [([A("Hello.")], [A("No.")]), (" Hello.", [A("No.")])])
def test_an_hh_prompt_with_messages_answers_is_refused(tmp_path, chosen, rejected):
    """HH turns and messages do not join up: this was one user message holding the raw transcript."""
    p = write(tmp_path, {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": chosen, "rejected": rejected})
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:1: 'prompt' is an HH transcript, so 'chosen' "
                                        "and 'rejected' must be HH text too"):
        read_preferences(p)


def test_an_hh_prompt_that_does_not_make_a_transcript_with_its_answer_is_refused(tmp_path):
    """A string prompt opening with "Human:" is read as HH: with no assistant turn to answer, refused."""
    p = write(tmp_path, {"prompt": "Human: plain text", "chosen": "a", "rejected": "b"})
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:1: 'chosen' is not an HH transcript .* once "
                                        "'prompt' is put before it$"):
        read_preferences(p)


def test_messages_answers_to_a_trl_prompt_hold_exactly_one_assistant_message(tmp_path):
    """All but the last message of a longer answer were silently dropped."""
    p = write(tmp_path, {"prompt": "hi", "chosen": [A("x"), U("more?"), A("y")], "rejected": [A("z")]})
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:1: 'chosen' must hold exactly one assistant "
                                        r"message \(the answer to 'prompt'\), got 3 messages$"):
        read_preferences(p)
    p = write(tmp_path, {"prompt": "hi", "chosen": [A("x")], "rejected": [U("z")]})
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:1: 'rejected': the last message must be from "
                                        "the assistant"):
        read_preferences(p)


def test_read_rankings_reads_comparisons_as_they_are_and_pairs_as_rankings_of_two(tmp_path):
    pair = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    assert read_rankings(write(tmp_path, RANKED, RANKED)) == [RANKED, RANKED]
    assert read_rankings(write(tmp_path, pair)) == [
        {"prompt": [U("2+2?")], "responses": ["4", "5"], "ended": [True, True], "ranking": [0, 1]}]
    # the first row tells the format: a pair after a comparison is a comparison missing its keys, on its line
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*'prompt'"):
        read_rankings(write(tmp_path, RANKED, pair))
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*'chosen'"):
        read_rankings(write(tmp_path, pair, RANKED))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_read_rankings_reads_a_pipe_once(tmp_path):
    """--data=<(...) can be read only once: comparisons and pairs alike are read from the rows read first."""
    import threading
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    pair = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    for row, want in ((RANKED, RANKED), (pair, {"prompt": [U("2+2?")], "responses": ["4", "5"],
                                                 "ended": [True, True], "ranking": [0, 1]})):
        got = []
        threading.Thread(target=lambda: fifo.write_text(json.dumps(row) + "\n"), daemon=True).start()
        reader = threading.Thread(target=lambda: got.append(read_rankings(str(fifo))), daemon=True)
        reader.start()
        reader.join(timeout=10)
        if reader.is_alive():  # it opened the pipe again, where no writer comes: let it read an empty one
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            reader.join(timeout=10)
        assert got == [[want]]


def test_prompts_good(tmp_path):
    p = write(tmp_path, {"prompt": "hi"}, {"messages": [S("s"), U("q")]}, {"prompt": [U("x")], "chosen": "y"})
    assert read_prompts(p) == [[U("hi")], [S("s"), U("q")], [U("x")]]


def test_write_jsonl_round_trip(tmp_path):
    rows = [{"prompt": "héllo 🙂", "n": 1}, {"messages": [U("a"), A("b")]}]
    path = tmp_path / "sub" / "out.jsonl"
    write_jsonl(path, rows)
    assert [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines()] == rows
    assert sorted(x.name for x in path.parent.iterdir()) == ["out.jsonl"]  # no temp file left behind


def test_write_jsonl_gives_its_file_the_mode_open_would(tmp_path):
    """The umask decides who may read out/comparisons.jsonl, as for every other file a stage writes; a
    temp file from tempfile.mkstemp is private (0600) and kept that mode through the rename."""
    old = os.umask(0o022)
    try:
        write_jsonl(tmp_path / "a.jsonl", [{"n": 1}])
        (tmp_path / "b.jsonl").write_text("")
    finally:
        os.umask(old)
    mode = lambda name: stat.S_IMODE(os.stat(tmp_path / name).st_mode)  # noqa: E731
    assert mode("a.jsonl") == mode("b.jsonl") == 0o644


def test_write_jsonl_with_a_directory_in_the_way_is_one_line_and_leaves_no_temp_file(tmp_path):
    """reward.py writes its comparisons after minutes of sampling: a failed write was a traceback there."""
    (tmp_path / "out.jsonl").mkdir()
    with pytest.raises(SystemExit) as e:
        write_jsonl(tmp_path / "out.jsonl", [{"n": 1}])
    path = tmp_path / "out.jsonl"
    assert str(e.value) == f"error: could not write {path} (Is a directory); the old file is unchanged"
    assert os.listdir(tmp_path) == ["out.jsonl"] and (tmp_path / "out.jsonl").is_dir()


def test_write_jsonl_that_fails_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"n": 1}])

    def rows():
        yield {"n": 2}
        raise RuntimeError("killed mid-write")
    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert path.read_text() == '{"n": 1}\n' and os.listdir(tmp_path) == ["out.jsonl"]


# ---- GPT-2 weights (data/gpt2.py): a damaged file is one line naming it ----


def safetensors_bytes(tensors, header_extra=None):
    """The safetensors layout by hand: 8-byte little-endian header length, JSON header, raw bytes."""
    header, blobs, offset = dict(header_extra or {}), [], 0
    for k, v in tensors.items():
        b = v.contiguous().numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


TINY_GPT2 = {"wte.weight": torch.arange(20.0).view(5, 4), "wpe.weight": -torch.arange(12.0).view(3, 4),
             "h.0.ln_1.weight": torch.ones(4)}


def test_gpt2_safetensors_good(tmp_path):
    empty = {"none": torch.zeros(0, 4)}  # a tensor of no elements has no bytes: still a tensor
    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes({**TINY_GPT2, **empty},
                                                                   {"__metadata__": {"format": "pt"}}))
    (tmp_path / "config.json").write_text('{"n_head": 2}')
    sd = read_safetensors(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(sd[k], v) for k, v in TINY_GPT2.items()) and sd["none"].shape == (0, 4)
    ours, args = read_gpt2(str(tmp_path))
    assert args == dict(vocab_size=5, block_size=3, n_layer=1, n_head=2, n_embd=4, bias=False)


GOOD_ST = safetensors_bytes(TINY_GPT2)
HEADER_END = 8 + struct.unpack("<Q", GOOD_ST[:8])[0]


def damaged_header(**entry):
    """GOOD_ST with wte.weight's header entry changed (a key given None is removed), the header's length
    kept right."""
    h = json.loads(GOOD_ST[8:HEADER_END])
    h["wte.weight"] = {k: v for k, v in {**h["wte.weight"], **entry}.items() if v is not None}
    h = json.dumps(h).encode()
    return struct.pack("<Q", len(h)) + h + GOOD_ST[HEADER_END:]


ST, BIN = "model.safetensors", "pytorch_model.bin"


@pytest.mark.parametrize("name, content, what", [
    (ST, b"", r"not a safetensors file \(0 bytes"),  # once struct.error
    (ST, b"\x01\x02", r"not a safetensors file \(2 bytes"),
    (ST, b"this is not a safetensors file", "not a safetensors file .no JSON header"),  # an absurd length
    (ST, struct.pack("<Q", 4) + b"{{{{" + bytes(64), "not a safetensors file .no JSON header"),
    (ST, struct.pack("<Q", 2) + b"[]", "not a safetensors file .no JSON header"),
    (ST, GOOD_ST[:-7], "truncated: tensor h.0.ln_1.weight ends at data byte"),  # once RuntimeError in reshape
    (ST, damaged_header(shape=[6, 4]), r"tensor wte.weight has 80 bytes .* needs 96"),
    (ST, damaged_header(data_offsets=None), "tensor wte.weight's header entry is damaged"),
    (ST, damaged_header(shape="ab"), "tensor wte.weight's header entry is damaged"),
    (ST, damaged_header(dtype="I64"), "tensor wte.weight has unsupported dtype I64"),
    (BIN, b"", "empty file, not PyTorch weights"),
    (BIN, b"\x80\x02garbage", "not PyTorch weights, or a pickle of more"),  # once UnpicklingError
    (BIN, b"not a pickle at all", "not (readable )?PyTorch weights"),  # how torch fails varies with the bytes
])
def test_gpt2_damaged_weights_are_one_line_naming_the_file(tmp_path, name, content, what):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        read_gpt2(str(tmp_path))
    msg = str(e.value)
    assert re.match(rf"error: {re.escape(str(path))}: {what}", msg) and "\n" not in msg, msg


def deep_header():
    h = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    return struct.pack("<Q", len(h)) + h


@pytest.mark.parametrize("name, content, what", [
    (ST, deep_header(), "not a safetensors file .no JSON header"),  # a RecursionError traceback
    (ST, damaged_header(shape=[0, 10 ** 30], data_offsets=[0, 0]), "tensor wte.weight's header entry is"),
    (ST, safetensors_bytes({**TINY_GPT2, "h.3000000.ln_1.weight": torch.ones(4)}),
     r"its layers are not h.0 to h.1, one each"),  # it built three million blocks first: a hang
    (ST, safetensors_bytes({**TINY_GPT2, "h.2.ln_1.weight": torch.ones(4)}), "its layers are not h.0 to h.1"),
    (ST, safetensors_bytes({**TINY_GPT2, "wte.weight": torch.zeros(5, 0), "wpe.weight": torch.zeros(3, 0)}),
     r"wte.weight \(5, 0\) and wpe.weight \(3, 0\) leave no model"),  # trained, then a traceback
])
def test_gpt2_weights_a_model_cannot_be_built_from_are_one_line_and_quick(tmp_path, name, content, what):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SystemExit) as e:
        read_gpt2(str(tmp_path))
    msg = str(e.value)
    assert re.match(rf"error: {re.escape(str(tmp_path / name))}: {what}", msg) and "\n" not in msg, msg


def test_a_conv1d_weight_of_another_rank_is_one_line_when_the_network_is_built(tmp_path):
    """Transposed as a Conv1D matrix before any shape check: a 3-D one was a traceback in read_gpt2."""
    import sft
    three_d = {**TINY_GPT2, "h.0.attn.c_attn.weight": torch.zeros(4, 12, 1)}
    (tmp_path / ST).write_bytes(safetensors_bytes(three_d))
    with pytest.raises(SystemExit) as e:
        sft.load_gpt2(str(tmp_path), dropout=0.0)
    assert str(e.value).startswith(f"error: {tmp_path}: the weights do not fit its model_args"), str(e.value)


def test_gpt2_config_nested_too_deeply_is_one_line(tmp_path):
    (tmp_path / ST).write_bytes(GOOD_ST)
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(tmp_path / 'config.json'))}: not a GPT-2"):
        read_gpt2(str(tmp_path))


def test_gpt2_bin_truncated_or_not_a_state_dict(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(TINY_GPT2, path)
    path.write_bytes(path.read_bytes()[:-100])  # a download cut short: the zip's directory is missing
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(path))}: not readable PyTorch weights"):
        read_gpt2(str(path))
    torch.save([torch.ones(2)], path)
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(path))}: not a state dict \(a list"):
        read_gpt2(str(path))
    torch.save({"wte.weight": torch.ones(2)}, path)
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(path))}: not GPT-2 weights"):
        read_gpt2(str(path))
    torch.save(TINY_GPT2, path)
    (tmp_path / "config.json").write_text('{"n_layer": 1}')
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(tmp_path / 'config.json'))}: not a GPT-2"):
        read_gpt2(str(path))


@pytest.mark.parametrize("config, why", [
    ('{"n_head": 2}', "state dict does not fit the model: .'transformer.h.0.attn.c_attn.weight'"),
    ('{"n_head": 3}', ""),  # 4 channels do not split into 3 heads: GPT's own assertion, once a traceback
])
def test_gpt2_weights_that_do_not_make_a_gpt_are_one_line_naming_them(tmp_path, config, why):
    """read_gpt2 accepts TINY_GPT2 (it has wte, wpe and h.0), but it lacks most of a layer's tensors:
    building the network from it (sft.py --init=...) must be one line naming the path, not a traceback."""
    import sft
    (tmp_path / "model.safetensors").write_bytes(GOOD_ST)
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(SystemExit) as e:
        sft.load_gpt2(str(tmp_path), dropout=0.0)
    msg = str(e.value)
    assert re.match(rf"error: {re.escape(str(tmp_path))}: .*{why}", msg) and "\n" not in msg, msg


def test_hh_text_before_the_first_turn_is_refused(tmp_path):
    p = tmp_path / "hh.jsonl"
    p.write_text(json.dumps({"chosen": "Preamble\n\nHuman: a\n\nAssistant: b",
                             "rejected": "Preamble\n\nHuman: a\n\nAssistant: c"}) + "\n")
    with pytest.raises(DataError, match="is not an HH transcript"):
        read_preferences(str(p))


def test_hh_transcript_may_start_without_the_blank_lines(tmp_path):
    """"Human: ..." at the very start of the text is the first turn, as "\\n\\nHuman: ..." is."""
    p = write(tmp_path, {"chosen": "Human: Hi.\n\nAssistant: Hello.",
                         "rejected": "Human: Hi.\n\nAssistant: Go."})
    assert read_preferences(p) == [{"prompt": [U("Hi.")], "chosen": "Hello.", "rejected": "Go."}]


def test_a_shared_history_that_ends_with_the_assistant_is_refused(tmp_path):
    """Two answers after an assistant turn answer no user: render_prompt could not even place them."""
    history = [U("hi"), A("hello")]
    p = write(tmp_path, {"chosen": history + [A("4")], "rejected": history + [A("5")]})
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:1: the shared history must end with a user"):
        read_preferences(p)
    hh = "\n\nHuman: a\n\nAssistant: b"
    p = write(tmp_path, {"chosen": hh + "\n\nAssistant: c", "rejected": hh + "\n\nAssistant: d"})
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:1: the shared history must end with a user"):
        read_preferences(p)


def test_a_conversation_ending_with_the_user_still_has_its_assistant_turns_to_learn(tmp_path):
    """SFT learns every assistant turn (data.chat.render's mask): a trailing user turn takes none away."""
    p = write(tmp_path, {"messages": [U("hi"), A("hello"), U("bye")]})
    assert read_messages(p) == [[U("hi"), A("hello"), U("bye")]]


def test_gpt2_conv1d_matrices_come_back_transposed_and_the_mask_buffers_are_dropped(tmp_path):
    """The Hugging Face layout by hand: every Conv1D matrix of a block (attention's c_attn and c_proj, the
    MLP's c_fc and c_proj) stored (in, out), plus the attn.bias / attn.masked_bias buffers and no config.json.
    The reader gives back exactly our state dict (less the tied lm_head) and guesses n_embd // 64 heads."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    sd = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=2, n_head=2, n_embd=128)).state_dict()
    hf = {}
    for k, v in sd.items():
        if k != "lm_head.weight":
            name = k.removeprefix("transformer.")
            conv1d = name.endswith(".weight") and name.split(".")[-2] in ("c_attn", "c_proj", "c_fc")
            hf[name] = v.t().contiguous() if conv1d else v
    for i in range(2):
        hf[f"h.{i}.attn.bias"] = torch.tril(torch.ones(8, 8)).view(1, 1, 8, 8)
        hf[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(hf, tmp_path / "pytorch_model.bin")
    ours, args = read_gpt2(str(tmp_path))
    assert set(ours) == set(sd) - {"lm_head.weight"}
    assert all(torch.equal(ours[k], sd[k]) for k in ours)
    assert args == dict(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=128, bias=True)


def test_a_gpt2_directory_with_both_files_reads_the_safetensors(tmp_path):
    """model.safetensors is read before pytorch_model.bin (a pickle): here the .bin is not even readable."""
    (tmp_path / "model.safetensors").write_bytes(GOOD_ST)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    ours, _ = read_gpt2(str(tmp_path))
    assert torch.equal(ours["transformer.wte.weight"], TINY_GPT2["wte.weight"])
