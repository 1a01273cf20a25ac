"""
Readers for the JSONL files people already have (the formats: README, "Your own data", and each reader).

Every problem raises DataError("path:line: what is wrong"), so a script can stop with one clear line:
or_exit(read_prompts, path) returns the rows, or exits with "error: path:line: what is wrong".
"""

import json
import os
import re

from data.chat import check_messages


class DataError(Exception):
    pass


def or_exit(read, *args):
    """read(*args), with a DataError turned into the scripts' one-line exit."""
    try:
        return read(*args)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None


def _rows(path):
    """[(line number, JSON object)] for each non-blank line of a JSONL file, all read and checked first."""
    try:
        with open(path, "rb") as f:  # bytes, so a bad byte can be pinned to its line
            lines = f.read().split(b"\n")  # only \n: U+2028 and friends are legal inside JSON strings
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    rows = []
    for n, raw in enumerate(lines, 1):
        # tolerate a byte-order mark, cut off here so that a bad byte's offset below indexes this very line
        raw = raw[3:] if n == 1 and raw.startswith(b"\xef\xbb\xbf") else raw
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{n}: not valid UTF-8 "
                            f"(byte {raw[e.start]:#04x} at column {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON: {e.msg} at column {e.colno}") from None
        except ValueError as e:  # an integer longer than Python reads from text (4,300 digits by default)
            raise DataError(f"{path}:{n}: invalid JSON: {str(e).split(';')[0]}") from None
        except RecursionError:  # a line of thousands of nested brackets
            raise DataError(f"{path}:{n}: invalid JSON: nested too deeply") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        if "\\u" in line:  # JSON allows an escape of half a UTF-16 pair alone (\ud800): text no file can hold
            try:
                json.dumps(obj, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"{path}:{n}: invalid text: a lone surrogate escape (\\ud800-\\udfff) is "
                                "not a character") from None
        rows.append((n, obj))
    if not rows:
        raise DataError(f"{path}: file is empty (no JSON lines)")
    return rows


def _get(path, n, row, key, types, want=None):
    if key not in row:
        raise DataError(f"{path}:{n}: missing key {key!r} "
                        f"(keys present: {', '.join(map(repr, row)) or 'none'})")
    if not isinstance(row[key], types):
        want = want or " or ".join("string" if t is str else "messages list" for t in types)
        raise DataError(f"{path}:{n}: {key!r} must be a {want}, got {type(row[key]).__name__}")
    return row[key]


def _messages(path, n, key, value, last=None):
    """Validate a messages list (optionally its last role); return it with only role and content kept."""
    try:
        check_messages(value)
    except ValueError as e:
        raise DataError(f"{path}:{n}: {key!r}: {e}") from None
    if last and value[-1]["role"] != last:
        raise DataError(f"{path}:{n}: {key!r}: the last message must be from the {last}, "
                        f"got {value[-1]['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


HH_OPENING = re.compile(r"\s*(Human|Assistant):")  # how an HH transcript (or TRL's split of one) starts


def _hh(path, n, key, text, fix=""):
    """Anthropic HH transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." -> messages list
    ending with the assistant. fix: added to the error, to say what the text was or could be."""
    parts = re.split(r"(?:^|\n\n)(Human|Assistant):", text)
    # want: nothing before the first turn, then at least Human + Assistant
    if parts[0].strip() or len(parts) < 5:
        raise DataError(f"{path}:{n}: {key!r} is not an HH transcript "
                        f"(\"\\n\\nHuman: ...\\n\\nAssistant: ...\"){fix}")
    roles = {"Human": "user", "Assistant": "assistant"}
    msgs = [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
    return _messages(path, n, key, msgs, last="assistant")


def _answer(path, n, key, value):
    """A TRL answer given as messages: exactly one assistant message, its content. More turns would be a
    conversation that goes on after the reply, which a pair of answers to one prompt cannot hold."""
    msgs = _messages(path, n, key, value, last="assistant")
    if len(msgs) != 1:
        raise DataError(f"{path}:{n}: {key!r} must hold exactly one assistant message (the answer to "
                        f"'prompt'), got {len(msgs)} messages")
    return msgs[0]["content"]


def read_messages(path) -> list[list[dict]]:
    """SFT conversations: {"messages": [{"role", "content"}, ...]} per line."""
    out = []
    for n, row in _rows(path):
        msgs = _messages(path, n, "messages", _get(path, n, row, "messages", (list,)))
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{path}:{n}: 'messages' has no assistant message, so there is nothing to learn")
        out.append(msgs)
    return out


def read_comparisons(path, rows=None):
    """reward.py's comparisons.jsonl (K ranked answers per prompt) ->
    [{"prompt", "responses", "ended", "ranking"}], ranking = indices of the responses, best first."""
    out = []
    for n, row in rows or _rows(path):
        # a prompt is answered next, so it must end with the user (as render_prompt requires)
        prompt = _messages(path, n, "prompt", _get(path, n, row, "prompt", (list,)), last="user")
        # a list, not any sized thing: a string would read as one-character answers, a dict as its keys
        responses = _get(path, n, row, "responses", (list,), "list of strings")
        if len(responses) < 2:
            raise DataError(f"{path}:{n}: 'responses' must hold at least 2 answers to rank, "
                            f"got {len(responses)}")
        bad = next((i for i, r in enumerate(responses) if not isinstance(r, str)), None)
        if bad is not None:
            raise DataError(f"{path}:{n}: 'responses'[{bad}] must be a string, "
                            f"got {type(responses[bad]).__name__}")
        k = len(responses)
        ended = row.get("ended")
        ended = [True] * k if ended is None else ended  # a file without it: every answer closed its turn
        if not (isinstance(ended, list) and len(ended) == k and all(isinstance(e, bool) for e in ended)):
            raise DataError(f"{path}:{n}: 'ended' must be a list of {k} true/false values, one per response")
        ranking = _get(path, n, row, "ranking", (list,), "list of indices")
        # type(r) is int: 1.0 and True pass the sorted() check (they equal 1) but are not indices
        if not (all(type(r) is int for r in ranking) and sorted(ranking) == list(range(k))):
            raise DataError(f"{path}:{n}: 'ranking' must list each index 0..{k - 1} of 'responses' once, "
                            "best first")
        out.append({"prompt": prompt, "responses": responses, "ended": ended, "ranking": ranking})
    return out


def read_preferences(path, rows=None) -> list[dict]:
    """Comparisons as {"prompt": messages, "chosen": str, "rejected": str}, from TRL or Anthropic HH files."""
    out = []
    for n, row in rows or _rows(path):
        chosen = _get(path, n, row, "chosen", (str, list))
        rejected = _get(path, n, row, "rejected", (str, list))
        # TRL's split of an HH row: the transcript up to "\n\nAssistant:" as the prompt, each answer after it
        hh = isinstance(row.get("prompt"), str) and HH_OPENING.match(row["prompt"]) is not None
        if hh and not (isinstance(chosen, str) and isinstance(rejected, str)):  # turns and a message: no join
            raise DataError(f"{path}:{n}: 'prompt' is an HH transcript, so 'chosen' and 'rejected' must be "
                            "HH text too (or give the prompt as a messages list)")
        if hh:  # an answer that already holds the whole transcript is not prefixed twice
            chosen, rejected = (r if r.startswith(row["prompt"]) else row["prompt"] + r
                                for r in (chosen, rejected))
        if "prompt" in row and not hh:  # TRL explicit prompt: the answers are strings or [assistant message]
            prompt = _get(path, n, row, "prompt", (str, list))
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
                _messages(path, n, "prompt", prompt, last="user")
            pair = [r if isinstance(r, str) else _answer(path, n, k, r)
                    for k, r in (("chosen", chosen), ("rejected", rejected))]
        elif type(chosen) is not type(rejected):
            raise DataError(f"{path}:{n}: 'chosen' and 'rejected' must both be strings "
                            "or both be messages lists")
        else:  # implicit prompt (TRL messages) or HH transcripts: the shared history is the prompt
            if isinstance(chosen, str):
                fix = (" once 'prompt' is put before it" if hh else
                       "; make it one, or add a 'prompt' key (TRL: the answers are then the replies alone)")
                chosen = _hh(path, n, "chosen", chosen, fix)
                rejected = _hh(path, n, "rejected", rejected, fix)
            else:
                chosen = _messages(path, n, "chosen", chosen, last="assistant")
                rejected = _messages(path, n, "rejected", rejected, last="assistant")
            prompt = chosen[:-1]
            if prompt != rejected[:-1]:
                raise DataError(f"{path}:{n}: 'chosen' and 'rejected' must share the same history "
                                "and differ only in the final assistant message")
            if not prompt or prompt[-1]["role"] != "user":
                raise DataError(f"{path}:{n}: the shared history must end with a user message")
            pair = [chosen[-1]["content"], rejected[-1]["content"]]
        out.append({"prompt": prompt, "chosen": pair[0], "rejected": pair[1]})
    return out


def read_rankings(path) -> list[dict]:
    """Any preference file as read_comparisons' rankings: comparisons like reward.py's (told by the first
    row's 'ranking' key) as they are, TRL / HH pairs as rankings of two answers that both ended their turn."""
    rows = _rows(path)  # read once: a pipe cannot be read twice
    if "ranking" in rows[0][1]:
        return read_comparisons(path, rows)
    return [{"prompt": p["prompt"], "responses": [p["chosen"], p["rejected"]], "ended": [True, True],
             "ranking": [0, 1]} for p in read_preferences(path, rows)]


def row_lines(path) -> list[int]:
    """The line number of each JSON row of path, in order (blank lines hold none): to name a row's line."""
    return [n for n, _ in _rows(path)]


def read_prompts(path) -> list[list[dict]]:
    """Prompts for RL/eval as messages lists ending with a user turn: {"prompt": str} or
    {"messages": [...]}."""
    out = []
    for n, row in _rows(path):
        if "prompt" not in row and "messages" not in row:
            raise DataError(f"{path}:{n}: missing key 'prompt' (or 'messages')")
        key = "prompt" if "prompt" in row else "messages"
        value = _get(path, n, row, key, (str, list) if key == "prompt" else (list,))
        out.append([{"role": "user", "content": value}] if isinstance(value, str) else
                   _messages(path, n, key, value, last="user"))
    return out


def write_jsonl(path, rows) -> None:
    """One JSON object per line, written to a temp file then renamed, so a crash never leaves half a file. A
    failed write (disk full, a directory in the way) keeps the old file and stops with one line."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"  # open(), not mkstemp: the umask's mode, not 0600
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.isfile(tmp):
            os.remove(tmp)
        if not isinstance(e, OSError):
            raise
        why = e.strerror or e
        raise SystemExit(f"error: could not write {path} ({why}); the old file is unchanged") from None
