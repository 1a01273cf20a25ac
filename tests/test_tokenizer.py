import hashlib
import os
import random
import re
import sys
import types

import pytest
import tiktoken

import data
from data import tokenizer as tok
from data.tokenizer import SPECIALS, load_ranks, make_encoding, save_ranks, special_id, train_bpe


def make_text(n_docs=300, seed=0):
    """A small made-up corpus: a few hundred distinct words, some numbers and punctuation."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "tu", "sha", "vo", "dri", "el", "an"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(200)]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))).capitalize()
            + f", it's {rng.randint(0, 99)}!\n" for _ in range(n_docs)]
    return tok.EOT.join(docs)


TEXT = make_text()
RANKS = train_bpe(TEXT, 400)
ENC = make_encoding(RANKS)

UNICODE = [
    "", " ", "\n\n\t  \r\n", "héllo wörld, ça va? ñandú", "日本語のテキストと中文",
    "emoji 🙂👍🏽 👨‍👩‍👧 done", "control \x00\x01\x1b[31m\x7f chars",
    "mixed: abc123 ... !!! ???   trailing   ", "Ελληνικά и русский",
    "zero\u200bwidth and \u2028 line sep", "'s 've 'll don't", "a" * 1000,
]


def test_hand_worked_merges():
    # chunks: "ab" once, " ab" twice -> pairs (a,b): 3, (" ",a): 2; first "ab" is merged, then " "+"ab".
    ranks = train_bpe("ab ab ab", 256 + len(SPECIALS) + 2)
    assert ranks[b"ab"] == 256 and ranks[b" ab"] == 257 and len(ranks) == 258


def test_ties_go_to_the_smallest_pair():
    # chunks "ab" and " cd": (a,b), (" ",c), (c,d) each once. The smallest bytes win the tie: " c" (a space,
    # 32, sorts before "a" and "c"); then " c"+"d" and a+b tie once each, and b" c" < b"a": " cd", then "ab".
    ranks = train_bpe("ab cd", 256 + len(SPECIALS) + 3)
    assert [t for t, r in sorted(ranks.items(), key=lambda kv: kv[1])][256:] == [b" c", b" cd", b"ab"]


def test_vocab_size_and_ranks_are_dense():
    assert len(RANKS) == 400 - len(SPECIALS)
    assert sorted(RANKS.values()) == list(range(len(RANKS)))
    assert all(RANKS[bytes([b])] == b for b in range(256))
    assert ENC.n_vocab == 400
    assert [special_id(ENC, s) for s in SPECIALS] == list(range(395, 400))


def test_deterministic():
    again = train_bpe(TEXT, 400)
    assert list(again.items()) == list(RANKS.items())


def test_specials_not_learned_from_text():
    assert not any(b"<|" in t or b"|>" in t for t in RANKS)


def test_round_trip_training_text():
    ids = ENC.encode_ordinary(TEXT)
    assert ENC.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode()) / 2  # merges actually compress the text they were learned on


@pytest.mark.parametrize("s", UNICODE)
def test_round_trip_unicode(s):
    assert ENC.decode(ENC.encode_ordinary(s)) == s


def test_round_trip_random_bytes():
    rng = random.Random(1)
    for _ in range(50):
        s = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))).decode("utf-8", errors="replace")
        assert ENC.decode(ENC.encode_ordinary(s)) == s


def test_typed_specials_stay_plain_text():
    s = "hi <|user|> x<|endoftext|>y <|assistant|><|end|><|system|>"
    ids = ENC.encode_ordinary(s)
    assert max(ids) < len(RANKS)  # no special id ever comes out of plain text
    assert ENC.decode(ids) == s
    with pytest.raises(ValueError):  # and plain encode() refuses rather than silently making specials
        ENC.encode(s)


def test_a_very_long_run_of_whitespace_is_encoded_in_pieces_and_other_text_as_before():
    """tiktoken's pre-split regex overflowed its stack on a run of about a million spaces or newlines (typed
    into chat.py, or a field of a data file): a Rust panic, a traceback that no `except Exception` stops."""
    enc = tok.get_tokenizer("world")
    for text in ("hi" + " " * 1_100_000 + "there", "\n" * 1_100_000, "x\u3000" + "\u3000" * 1_100_000):
        assert enc.decode(tok.encode_text(enc, text)) == text
    ordinary = "The owl is  kind.\n\n  Tell me more.   "
    assert tok.encode_text(enc, ordinary) == enc.encode_ordinary(ordinary)  # no long run: the same tokens
    assert tok.encode_text(enc, ordinary, piece=4) == enc.encode_ordinary(ordinary)  # no run of 4 here
    pieces = tok.encode_text(enc, "a" + " " * 10 + "b", piece=4)  # cut into 4 + 4 + 2 spaces, each alone
    assert enc.decode(pieces) == "a" + " " * 10 + "b" and pieces[0] == enc.encode_ordinary("a")[0]


def test_encode_text_cuts_each_run_of_piece_spaces_into_its_own_piece():
    """Every run of `piece` whitespace characters is encoded alone, the rest as encode_ordinary would, also
    when the text is only one character longer than a piece (where encode_ordinary splits differently)."""
    enc = tok.get_tokenizer("world")
    e = enc.encode_ordinary
    assert tok.encode_text(enc, "a" + " " * 10 + "b", piece=4) == e("a") + e("    ") + e("    ") + e("  b")
    assert e("    b") != e("    ") + e("b")  # (so the next line tells a cut from none)
    assert tok.encode_text(enc, "    b", piece=4) == e("    ") + e("b")
    assert tok.encode_text(enc, "   b", piece=4) == e("   b")  # no run of 4: as before


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "t.tiktoken"
    save_ranks(RANKS, path)
    loaded = load_ranks(path)
    assert loaded == RANKS
    enc2 = make_encoding(loaded)
    for s in [TEXT[:5000]] + UNICODE:
        assert enc2.encode_ordinary(s) == ENC.encode_ordinary(s)
    assert [p.name for p in tmp_path.iterdir()] == ["t.tiktoken"]  # no temp file left behind


def test_saved_ranks_get_the_mode_open_would(tmp_path):
    """A retrained data/world.tiktoken must stay readable by whoever shares the checkout (the umask decides),
    not become private (0600) as tempfile.mkstemp's file would."""
    old = os.umask(0o022)
    try:
        save_ranks(RANKS, tmp_path / "t.tiktoken")
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(old)
    assert (tmp_path / "t.tiktoken").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    assert (tmp_path / "plain").stat().st_mode & 0o777 == 0o644


def test_world_trained_when_missing(tmp_path, monkeypatch, capsys):
    fake = types.ModuleType("data.world")
    fake.corpus_text = lambda: TEXT
    monkeypatch.setitem(sys.modules, "data.world", fake)
    monkeypatch.setattr(data, "world", fake, raising=False)
    monkeypatch.setattr(tok, "WORLD_PATH", tmp_path / "world.tiktoken")
    enc = tok.get_tokenizer("world")
    assert (tmp_path / "world.tiktoken").exists()
    assert "trained" in capsys.readouterr().out
    assert enc.decode(enc.encode_ordinary(TEXT[:2000])) == TEXT[:2000]
    assert special_id(enc, tok.EOT) == len(load_ranks(tmp_path / "world.tiktoken"))


def test_world_tokenizer():
    if not tok.WORLD_PATH.exists():
        pytest.skip("data/world.tiktoken not trained yet")
    enc = tok.get_tokenizer("world")
    # the small world may run out of merges early
    assert 256 + len(SPECIALS) < enc.n_vocab <= tok.WORLD_VOCAB
    for s in UNICODE + ["The quick brown fox. <|user|> 42!"]:
        assert enc.decode(enc.encode_ordinary(s)) == s
    assert [special_id(enc, s) for s in SPECIALS] == list(range(enc.n_vocab - len(SPECIALS), enc.n_vocab))


def gpt2_cache(monkeypatch, d):
    """A stand-in for tiktoken's cache of gpt2's two files in d (named by the sha1 of their URLs)."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(d))
    for url in tok.GPT2_URLS:
        (d / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"")
    monkeypatch.setattr(tok, "GPT2_SHA256", (hashlib.sha256(b"").hexdigest(),) * 2)  # as if they were good


def test_gpt2_specials(monkeypatch, tmp_path):
    # Offline here, so stand in a tiny base whose <|endoftext|> is its last id, as in gpt2 (50256 of 50257).
    gpt2_cache(monkeypatch, tmp_path)
    base = tiktoken.Encoding(name="gpt2", pat_str=tok.PAT,
                             mergeable_ranks={bytes([b]): b for b in range(256)},
                             special_tokens={tok.EOT: 256})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: base)
    enc = tok.get_tokenizer("gpt2")
    assert [special_id(enc, s) for s in SPECIALS] == [256, 257, 258, 259, 260]


def test_gpt2_files_missing_from_the_cache_are_one_line_and_nothing_is_downloaded(monkeypatch, tmp_path):
    def download(name):  # tiktoken fetches gpt2's files over the network when its cache lacks them
        raise AssertionError("tiktoken was asked for gpt2 with its files missing: it would download them")
    monkeypatch.setattr(tiktoken, "get_encoding", download)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    where = re.escape(str(tmp_path))
    with pytest.raises(SystemExit, match=f"^error: the gpt2 tokenizer's files are not in {where}; set "):
        tok.get_tokenizer("gpt2")
    gpt2_cache(monkeypatch, tmp_path)  # present but unreadable: one line too

    def broken(name):
        raise ValueError("bad merges")
    monkeypatch.setattr(tiktoken, "get_encoding", broken)
    with pytest.raises(SystemExit, match="could not be read"):
        tok.get_tokenizer("gpt2")


def test_a_cache_variable_set_but_empty_is_one_line_and_nothing_is_downloaded(monkeypatch, tmp_path):
    """tiktoken reads TIKTOKEN_CACHE_DIR="" as "no cache": it downloads. The check used to skip an empty
    variable for the next one, find good files there, and let tiktoken fetch them anyway."""
    def download(name):
        raise AssertionError("tiktoken was asked for gpt2 with no cache to read: it would download")
    monkeypatch.setattr(tiktoken, "get_encoding", download)
    for url in tok.GPT2_URLS:  # good-looking files where the next variable points: not to be used
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"x")
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path))
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
        monkeypatch.setenv(var, "")
        with pytest.raises(SystemExit, match=f"^error: {var} is set but empty, which makes tiktoken"):
            tok.get_tokenizer("gpt2")


def test_a_damaged_gpt2_file_in_the_cache_is_one_line_and_nothing_is_downloaded(monkeypatch, tmp_path):
    """tiktoken deletes a cached file whose sha256 is wrong and downloads it again: refused before that."""
    def download(name):
        raise AssertionError("tiktoken was asked for gpt2 with a damaged file: it would download it")
    monkeypatch.setattr(tiktoken, "get_encoding", download)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    for url in tok.GPT2_URLS:
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"half a file")
    with pytest.raises(SystemExit, match="is damaged"):
        tok.get_tokenizer("gpt2")
    assert len(os.listdir(tmp_path)) == 2  # both still there


@pytest.mark.parametrize("damage", ["empty", "extra", "binary", "bad rank", "directory"])
def test_a_damaged_world_tokenizer_file_is_one_line(monkeypatch, tmp_path, damage):
    """An empty file was max() of nothing, a binary one a UnicodeDecodeError, a repeated rank a panic in
    tiktoken's Rust: each now one line naming the file."""
    good = tok.WORLD_PATH.read_text()
    path = tmp_path / "world.tiktoken"
    if damage == "directory":
        path.mkdir()
    else:
        path.write_bytes({"empty": b"", "extra": (good + "abc\n").encode(), "binary": b"\xff\xfe\x00" * 9,
                          "bad rank": (good + "AAEC 5\n").encode()}[damage])  # bytes 0 1 2, rank 5 again
    monkeypatch.setattr(tok, "WORLD_PATH", path)
    with pytest.raises(SystemExit, match=f"^error: {re.escape(str(path))} is damaged "):
        tok.get_tokenizer("world")


def test_unknown_name():
    with pytest.raises(SystemExit, match="world, gpt2"):
        tok.get_tokenizer("bert")
