"""
Tokenizer: a byte-level BPE trained here on the world corpus, run by tiktoken.

Training is the readable part (train_bpe, below): the 256 single bytes are the first tokens, then the most
frequent adjacent pair is merged into a new token, again and again. Encoding is tiktoken's job: given the
ranks (token bytes -> id, in merge order) it re-applies the merges fast and exactly.

Plain text is always encoded with encode_text(enc, text) (enc.encode_ordinary), so a user who types "<|user|>"
gets ordinary tokens, never the special id; special ids are only ever placed by code (see data/chat.py).

    python -m data.tokenizer        # (re)train data/world.tiktoken and print its compression
"""

import base64
import hashlib
import os
import re
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import tiktoken

EOT = "<|endoftext|>"  # separates pretraining documents; also the BOS that starts every conversation
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"  # closes every turn
SPECIALS = [EOT, SYSTEM, USER, ASSISTANT, END]

# GPT-2's pre-split, restricted to what Python's `re` supports (ASCII letter classes instead of \p{L}).
# Merges never cross a chunk boundary, so " the" can become one token but "e t" never will.
PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""

WORLD_PATH = Path(__file__).with_name("world.tiktoken")
WORLD_VOCAB = 1024  # an upper bound: once every distinct word is one token there is nothing left to merge


def train_bpe(text: str, vocab_size: int) -> dict[bytes, int]:
    """Byte-level BPE: returns {token bytes: rank}, vocab_size - len(SPECIALS) entries
    (fewer if text runs out)."""
    n_merges = vocab_size - len(SPECIALS) - 256
    assert n_merges >= 0, f"vocab_size must be at least {256 + len(SPECIALS)}"
    ranks = {bytes([b]): b for b in range(256)}
    # Special-token strings are not text to learn from: cut the text at them so "<|" never becomes a merge.
    docs = re.split("|".join(map(re.escape, SPECIALS)), text)
    # Count every distinct chunk once; all merge work below scales with distinct chunks, not text length.
    chunk_counts = Counter(chunk for doc in docs for chunk in re.findall(PAT, doc))
    # each word: list of tokens
    words = [[bytes([b]) for b in chunk.encode("utf-8")] for chunk in chunk_counts]
    freqs = list(chunk_counts.values())

    pair_counts = Counter()  # (left, right) -> how often that pair occurs in the text
    where = defaultdict(set)  # (left, right) -> ids of words containing it, so a merge only revisits those
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)

    while len(ranks) < 256 + n_merges and pair_counts:
        # Most frequent pair; ties go to the smallest bytes so the result is the same on every run.
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        merged = best[0] + best[1]
        ranks.setdefault(merged, len(ranks))  # the same bytes can arise from two splits: keep one rank
        for i in sorted(where.pop(best)):
            word, f = words[i], freqs[i]
            # Take this word's old pairs out of the counts, merge, then put its new pairs back in.
            for pair in zip(word, word[1:]):
                pair_counts[pair] -= f
                if pair_counts[pair] == 0:
                    del pair_counts[pair]  # keep only live pairs, so the min() above never picks a dead one
            new, j = [], 0
            while j < len(word):
                if word[j:j + 2] == list(best):
                    new.append(merged)
                    j += 2
                else:
                    new.append(word[j])
                    j += 1
            words[i] = new
            for pair in zip(new, new[1:]):
                pair_counts[pair] += f
                where[pair].add(i)
    return ranks


def save_ranks(ranks: dict[bytes, int], path) -> None:
    """tiktoken's format, one `base64(token) rank` per line; written atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # open(), not mkstemp: the umask's mode, not 0600
    with open(tmp, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    os.replace(tmp, path)


def load_ranks(path) -> dict[bytes, int]:
    """token -> rank from a file of "base64-token rank" lines; ValueError if they are not a BPE's ranks."""
    ranks = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))) or any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError("its ranks are not 0, 1, ... over every byte and the merges")  # tiktoken would panic
    return ranks


def make_encoding(ranks: dict[bytes, int], name: str = "world") -> tiktoken.Encoding:
    """Wrap trained ranks in a tiktoken Encoding; the specials take the ids right after the last rank."""
    n = len(ranks)
    return tiktoken.Encoding(name=name, pat_str=PAT, mergeable_ranks=ranks,
                             special_tokens={s: n + i for i, s in enumerate(SPECIALS)})


def encode_text(enc: tiktoken.Encoding, text: str, piece: int = 1 << 16) -> list[int]:
    """enc.encode_ordinary(text), with each run of `piece` or more whitespace characters encoded in pieces:
    on a very long run, tiktoken's pre-split regex (its lookahead \\s+(?!\\S)) overflows its stack and panics,
    an error no `except Exception` catches. Only such runs are cut, so all other text encodes as before."""
    parts = re.split(rf"(\s{{{piece}}})", text) if len(text) > piece else [text]
    return [t for part in parts if part for t in enc.encode_ordinary(part)]


def special_id(enc: tiktoken.Encoding, s: str) -> int:
    """Id of a special token such as USER (raises KeyError if enc does not have it)."""
    return enc.encode_single_token(s)


def train_world() -> dict[bytes, int]:
    """Train the world tokenizer on the pretraining corpus and save it to WORLD_PATH."""
    from data import world  # lazy: only needed the first time, and keeps `data` free of import cycles
    ranks = train_bpe(world.corpus_text(), WORLD_VOCAB)
    save_ranks(ranks, WORLD_PATH)
    return ranks


GPT2_URLS = ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
             "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json")
GPT2_SHA256 = ("1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",  # what tiktoken expects
               "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")


def get_tokenizer(name: str = "world") -> tiktoken.Encoding:
    """"world": our BPE (trained on first use); "gpt2": tiktoken's gpt2 plus our chat specials."""
    if name == "world":
        if not WORLD_PATH.exists():
            ranks = train_world()
            print(f"trained a {len(ranks) + len(SPECIALS)}-token BPE on the world corpus -> {WORLD_PATH}")
        try:
            ranks = load_ranks(WORLD_PATH)
        except (OSError, ValueError) as e:  # (UnicodeDecodeError and base64's errors are ValueErrors)
            raise SystemExit(f"error: {WORLD_PATH} is damaged ({e}); `git checkout -- data/world.tiktoken` "
                             "restores it") from None
        return make_encoding(ranks, "world")
    if name == "gpt2":
        # tiktoken would download gpt2's two files on first use: we only let it read them from its cache,
        # where each is named by the sha1 of its URL, found as tiktoken finds it (a variable set to "" is no
        # cache at all, so tiktoken would download)
        env = next((v for v in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR") if v in os.environ), None)
        cache = os.environ[env] if env else os.path.join(tempfile.gettempdir(), "data-gym-cache")
        if not cache:
            raise SystemExit(f"error: {env} is set but empty, which makes tiktoken download the gpt2 "
                             "tokenizer; set it to a directory holding tiktoken's cached gpt2 files")
        paths = [os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()) for url in GPT2_URLS]
        if not all(os.path.isfile(p) for p in paths):
            raise SystemExit(f"error: the gpt2 tokenizer's files are not in {cache}; set TIKTOKEN_CACHE_DIR "
                             "to a directory holding tiktoken's cached gpt2 files (nothing is downloaded)")
        for p, want in zip(paths, GPT2_SHA256):  # tiktoken would delete a damaged file and download it anew
            if hashlib.sha256(open(p, "rb").read()).hexdigest() != want:
                raise SystemExit(f"error: the gpt2 tokenizer's file {p} is damaged (not the sha256 tiktoken "
                                 "expects); replace it with a good copy (nothing is downloaded)")
        try:
            base = tiktoken.get_encoding("gpt2")
        except Exception:
            raise SystemExit(f"error: the gpt2 tokenizer's files in {cache} could not be read") from None
        # gpt2 already owns <|endoftext|> = 50256; our four chat markers go right after it.
        specials = {EOT: base.eot_token, **{s: base.n_vocab + i for i, s in enumerate(SPECIALS[1:])}}
        return tiktoken.Encoding(name="gpt2-chat", pat_str=base._pat_str,
                                 mergeable_ranks=base._mergeable_ranks, special_tokens=specials)
    raise SystemExit(f"error: unknown tokenizer {name!r}; valid names: world, gpt2")


if __name__ == "__main__":
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # so `python data/tokenizer.py` works too
    from data import world
    train_world()
    enc = get_tokenizer("world")
    text = world.corpus_text()
    n_tokens = len(encode_text(enc, text.replace(EOT, "\n")))
    print(f"wrote {WORLD_PATH}: vocab {enc.n_vocab} "
          f"({enc.n_vocab - len(SPECIALS)} BPE + {len(SPECIALS)} special), "
          f"{len(text.encode('utf-8')) / n_tokens:.2f} bytes/token on {len(text):,} chars")
