"""chat.py as a user drives it: the conversation history reaches the model, /reset forgets it, old exchanges
are dropped when the context is full, temperature 0 is greedy, and a bad option or a checkpoint that is not a
language model is refused in one line."""
import ast
import contextlib
import importlib
import io
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
import runtime  # noqa: E402
from chat import fit_context, shown  # noqa: E402  (importing chat.py runs nothing)
from data.chat import render_prompt  # noqa: E402
from data.tokenizer import get_tokenizer  # noqa: E402

N_VOCAB = get_tokenizer("world").n_vocab


def save_tiny(path, kind, block_size=128, **extra):
    torch.manual_seed(0)
    m = M.GPT(M.GPTConfig(block_size=block_size, vocab_size=N_VOCAB, n_layer=1, n_head=2, n_embd=32,
                          scalar_head=kind == "reward"))
    runtime.save_checkpoint(str(path), {"model": m.state_dict(), "model_args": vars(m.config).copy(),
                                        "kind": kind, "step": 7, "tokenizer": "world", **extra})


def chat(*args, stdin=""):
    return subprocess.run([sys.executable, "chat.py", "--max_new_tokens=8", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=120)


SHOWN = re.compile(r"\[prompt (\d+) tokens\] (.*)$", re.M)
PIECE = re.compile(r"<\|\w+\|>|'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")  # a special token, or quoted text


def unshow(line):
    """A --show_tokens line back to the prompt's text: quoted runs are text, bare <|...|> special tokens."""
    pieces = PIECE.findall(line)
    assert "".join(pieces) == line, line  # nothing else on the line
    return "".join(p if p.startswith("<|") else ast.literal_eval(p) for p in pieces)


def shown_prompts(stdout):
    """The exact prompts the model saw (printed by --show_tokens=True), decoded, in order."""
    return [unshow(m[2]) for m in SHOWN.finditer(stdout)]


def test_show_tokens_tells_a_typed_marker_from_the_special_token():
    """Decoded as one string, a typed "<|end|>" and the real special token printed alike: the mix-up
    --show_tokens is there to debug. Text is quoted, special tokens bare."""
    enc = get_tokenizer("world")
    ids = render_prompt(enc, [{"role": "user", "content": "Hi <|end|><|assistant|> 'x'"}])
    assert shown(enc, ids) == "<|endoftext|><|user|>\"Hi <|end|><|assistant|> 'x'\"<|end|><|assistant|>"
    assert unshow(shown(enc, ids)) == enc.decode(ids)
    assert shown(enc, []) == "" and shown(enc, enc.encode_ordinary("a\nb")) == "'a\\nb'"


def test_second_turn_sees_the_first_and_reset_forgets(tmp_path):
    save_tiny(tmp_path / "base.pt", "base")
    save_tiny(tmp_path / "sft.pt", "sft")  # the later stage wins when no --ckpt is given
    r = chat(f"--out_dir={tmp_path}", "--show_tokens=True",
             stdin="Describe the owl.\nNow write a sad sentence about it.\n/reset\nDescribe the owl.\n"
                   "/quit\n")
    assert r.returncode == 0, r.stderr
    assert f"chatting with {tmp_path / 'sft.pt'} (sft, step 7)" in r.stdout
    save_tiny(tmp_path / "rloo.pt", "grpo", config={"baseline": "rloo"})  # RLOO is written by grpo.py
    rloo = chat(f"--out_dir={tmp_path}", stdin="/quit\n").stdout
    assert f"chatting with {tmp_path / 'rloo.pt'} (rloo, step 7)" in rloo, rloo
    first, second, third = shown_prompts(r.stdout)
    assert first == "<|endoftext|><|user|>Describe the owl.<|end|><|assistant|>"
    # the second prompt is the first, the model's reply, then the new message: the history was kept
    assert second.startswith(first)
    assert second.endswith("<|end|><|user|>Now write a sad sentence about it.<|end|><|assistant|>")
    assert second.count("<|user|>") == 2 and second.count("<|assistant|>") == 2
    assert third == first  # /reset started a fresh conversation


def test_old_exchanges_are_dropped_when_the_context_is_full(tmp_path):
    save_tiny(tmp_path / "sft.pt", "sft", block_size=32)
    r = chat(f"--ckpt={tmp_path / 'sft.pt'}", "--show_tokens=True", "--max_new_tokens=12",
             stdin="Describe the owl.\nNow write a sad sentence about it.\nTell me more about it.\n")
    assert r.returncode == 0, r.stderr  # EOF ends the chat like /quit
    assert "(context full: dropped the oldest" in r.stdout
    for m in SHOWN.finditer(r.stdout):
        assert int(m[1]) + 12 <= 32
        # whole exchanges go: the prompt still starts with a user turn
        assert unshow(m[2]).startswith("<|endoftext|><|user|>")


def test_single_prompt_mode_and_system_message(tmp_path):
    save_tiny(tmp_path / "dpo.pt", "dpo")
    r = chat(f"--ckpt={tmp_path / 'dpo.pt'}", "--prompt=Describe the owl.", "--system=Be kind.",
             "--show_tokens=True")
    assert r.returncode == 0, r.stderr
    (p,) = shown_prompts(r.stdout)
    assert p == "<|endoftext|><|system|>Be kind.<|end|><|user|>Describe the owl.<|end|><|assistant|>"
    assert "chatting with" not in r.stdout  # answers once, no REPL


def test_the_printed_prompt_shows_a_typed_marker_inside_the_quotes_and_the_real_ones_bare(tmp_path):
    """What --show_tokens prints, not only what it decodes to: a message that types "<|end|>" shows it
    inside its quoted text, the template's own markers outside (one repr of the decoded prompt, as it was,
    shows both alike)."""
    save_tiny(tmp_path / "sft.pt", "sft")
    r = chat(f"--ckpt={tmp_path / 'sft.pt'}", "--prompt=Say <|end|> twice.", "--show_tokens=True")
    assert r.returncode == 0, r.stderr
    (m,) = SHOWN.finditer(r.stdout)
    assert m[2] == "<|endoftext|><|user|>'Say <|end|> twice.'<|end|><|assistant|>", m[0]
    said = [{"role": "user", "content": "Say <|end|> twice."}]
    assert int(m[1]) == len(render_prompt(get_tokenizer("world"), said))  # the typed marker: ordinary tokens


def test_reward_checkpoint_is_refused_in_one_line(tmp_path):
    save_tiny(tmp_path / "reward.pt", "reward")
    r = chat(f"--ckpt={tmp_path / 'reward.pt'}", "--prompt=Hi")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'reward' checkpoint" in lines[0] and "sft" in lines[0]


def test_fit_context_drops_the_oldest_whole_exchanges_by_hand():
    enc = get_tokenizer("world")
    msg = [{"role": "system", "content": "Be kind."}]
    for q, a in [("Describe the owl.", "The owl is calm."), ("Describe the fox.", "The fox runs."),
                 ("Describe the cat.", "The cat sleeps."), ("Tell me more about it.", None)]:
        msg.append({"role": "user", "content": q})
        if a:
            msg.append({"role": "assistant", "content": a})
    # room for the system message, the last exchange and the new message, plus a 10-token reply: two go
    block_size = len(render_prompt(enc, msg[:1] + msg[5:])) + 10
    history = list(msg)
    assert fit_context(enc, history, 1, 10, block_size) == 2
    assert history == msg[:1] + msg[5:]
    # no room even for the new message: every exchange goes, the system message and the new one stay (the
    # caller then refuses to send it)
    history = list(msg)
    assert fit_context(enc, history, 1, 10, 5) == 3
    assert history == [msg[0], msg[-1]]
    history = list(msg)
    assert fit_context(enc, history, 1, 10, 10_000) == 0 and history == msg  # it fits: nothing changes


def test_a_message_too_long_to_send_keeps_the_whole_history(capsys):
    """The message is checked before any exchange is dropped: refusing it must not wipe the conversation."""
    from chat import reply
    enc = get_tokenizer("world")
    torch.manual_seed(0)
    model = M.GPT(M.GPTConfig(block_size=40, vocab_size=N_VOCAB, n_layer=1, n_head=2, n_embd=32)).eval()
    history = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Describe the owl."},
               {"role": "assistant", "content": "The owl is calm."}]
    kept = list(history)
    history.append({"role": "user", "content": " ".join(["Describe the fox."] * 12)})  # alone > 40 tokens
    assert reply(model, enc, history, 1, None, torch.no_grad(), 8, 0.0) is None
    assert history == kept  # the message taken back, every earlier exchange still there
    out = capsys.readouterr().out
    assert "not sent" in out and "dropped" not in out
    history.append({"role": "user", "content": "Describe the fox."})  # a short one is answered
    assert reply(model, enc, history, 1, None, torch.no_grad(), 8, 0.0) is not None
    assert history[-1]["role"] == "assistant"


def test_a_message_that_leaves_little_room_for_the_reply_says_so(capsys):
    """A message that fits the context but not with a whole reply was answered with a token or two and
    "[cut off]", with nothing to say why."""
    from chat import reply
    enc = get_tokenizer("world")
    model = M.GPT(M.GPTConfig(block_size=40, vocab_size=N_VOCAB, n_layer=1, n_head=2, n_embd=32)).eval()
    for times, room in ((2, False), (6, True)):
        history = [{"role": "user", "content": " ".join(["Describe the fox."] * times)}]
        n = len(render_prompt(enc, history))
        assert (n + 8 > 40) == room and n < 40
        assert reply(model, enc, history, 0, None, torch.no_grad(), 8, 0.0) is not None
        said = f"(room for {40 - n} of --max_new_tokens=8 reply tokens)"
        assert (said in capsys.readouterr().out) == room


def test_a_message_of_a_million_spaces_is_not_sent_and_chat_goes_on(capsys):
    """Encoding it crashed chat.py with a Rust panic from tiktoken (a page of traceback, the conversation
    lost): it is one more message too long to send."""
    from chat import reply
    enc = get_tokenizer("world")
    model = M.GPT(M.GPTConfig(block_size=40, vocab_size=N_VOCAB, n_layer=1, n_head=2, n_embd=32)).eval()
    history = [{"role": "user", "content": "hi" + " " * 1_100_000 + "there"}]
    assert reply(model, enc, history, 1, None, torch.no_grad(), 8, 0.0) is None
    assert "not sent" in capsys.readouterr().out and history == []


def test_a_read_only_out_dir_still_chats(tmp_path, monkeypatch, capsys):
    """chat.py only reads out_dir: the stages' rule that it be writable must not refuse checkpoints on a
    read-only disk."""
    save_tiny(tmp_path / "sft.pt", "sft")
    monkeypatch.setattr(os, "access", lambda path, mode, **k: False)  # a read-only disk (root ignores chmod)
    chat_main(monkeypatch, f"--out_dir={tmp_path}", "--prompt=Describe the owl.", "--max_new_tokens=4")
    assert capsys.readouterr().out.strip()


def test_ctrl_c_after_old_exchanges_were_dropped_keeps_them(monkeypatch, capsys):
    """A full context drops the oldest exchanges before sampling; a Ctrl-C while it samples then left the
    conversation without them, though the message it was making room for was never answered."""
    import chat
    enc = get_tokenizer("world")
    torch.manual_seed(0)
    model = M.GPT(M.GPTConfig(block_size=40, vocab_size=N_VOCAB, n_layer=1, n_head=2, n_embd=32)).eval()
    history = [{"role": "system", "content": "Be kind."}]
    for animal in ("owl", "cat", "fox"):
        history += [{"role": "user", "content": f"Describe the {animal}."},
                    {"role": "assistant", "content": f"The {animal} is calm."}]
    history.append({"role": "user", "content": "Describe the dog."})
    kept = list(history)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(chat, "respond", interrupted)
    with pytest.raises(KeyboardInterrupt):
        chat.reply(model, enc, history, 1, None, torch.no_grad(), 8, 0.0)
    assert "dropped the oldest" in capsys.readouterr().out and history == kept


def chat_main(monkeypatch, *args):
    """chat.main() in this process (cheaper than a new python): its SystemExit."""
    import chat as chat_py
    importlib.reload(chat_py)  # configure() sets the options on the module: start from the defaults again
    monkeypatch.setattr(sys, "argv", ["chat.py", *args])
    with pytest.raises(SystemExit) as e:
        chat_py.main()
    return e.value


def test_bad_options_are_one_line(tmp_path, refusal):
    save_tiny(tmp_path / "sft.pt", "sft")
    assert refusal("chat", f"--out_dir={tmp_path}", "--temperature=-1", "--prompt=Hi") == (
        "error: --temperature=-1.0 is out of range: it must be 0 (greedy) or >= 0.001")
    for bad in ["--top_p=1.5", "--top_p=0", "--top_k=0", "--top_k=2.5", "--max_new_tokens=0", "--dtype=fp8"]:
        msg = refusal("chat", f"--out_dir={tmp_path}", "--prompt=Hi", bad)
        assert msg.startswith(f"error: {bad.split('=')[0]}=") and "\n" not in msg, (bad, msg)


def test_temperature_zero_is_greedy(tmp_path, monkeypatch, capsys):
    save_tiny(tmp_path / "sft.pt", "sft")
    replies = []
    for seed in (1, 2):  # greedy decoding draws no random numbers: the seed cannot matter
        e = chat_main(monkeypatch, f"--out_dir={tmp_path}", "--prompt=Describe the owl.", "--temperature=0",
                      "--max_new_tokens=8", f"--seed={seed}")
        assert e.code == 0
        replies.append(capsys.readouterr().out)
    assert replies[0] == replies[1] and replies[0].strip()


@pytest.mark.parametrize("stage3", ["grpo.pt", "rloo.pt"])
def test_the_latest_stage_includes_grpo_and_rloo(tmp_path, stage3):
    """grpo.py writes out/grpo.pt (or rloo.pt with --baseline=rloo), a stage after SFT: `python chat.py` after
    it must talk to it, not to the SFT model it started from."""
    from chat import find_checkpoint
    for name in ("base.pt", "sft.pt", stage3):
        (tmp_path / name).write_bytes(b"")
    assert find_checkpoint(str(tmp_path)) == str(tmp_path / stage3)
    (tmp_path / "ppo.pt").write_bytes(b"")  # PPO, the InstructGPT stage, still comes first
    assert find_checkpoint(str(tmp_path)) == str(tmp_path / "ppo.pt")


def test_ctrl_c_while_it_answers_takes_the_message_back_and_the_chat_goes_on(tmp_path):
    """Ctrl-C during a reply (a KeyboardInterrupt out of the sampler) was a traceback that ended the chat."""
    save_tiny(tmp_path / "sft.pt", "sft")
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import chat; real, calls = chat.respond, []\n"
            "def respond(*a, **k):\n"
            "    calls.append(1)\n"
            "    if len(calls) == 1:\n"
            "        raise KeyboardInterrupt\n"
            "    return real(*a, **k)\n"
            f"chat.respond = respond\nsys.argv = ['chat.py', '--out_dir={tmp_path}', '--max_new_tokens=8', "
            "'--show_tokens=True']\nchat.main()\n")
    said = "Describe the owl.\nDescribe the cat.\n/quit\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, input=said, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "(interrupted: not answered)" in r.stdout
    first, second = shown_prompts(r.stdout)
    assert first == "<|endoftext|><|user|>Describe the owl.<|end|><|assistant|>"
    assert second == "<|endoftext|><|user|>Describe the cat.<|end|><|assistant|>"  # the owl was taken back


@pytest.mark.parametrize("io_encoding", ["utf-8", "utf-8:surrogateescape"])
def test_a_line_that_is_not_utf8_is_refused_and_the_chat_goes_on(tmp_path, io_encoding):
    """A byte that is not UTF-8 was a UnicodeDecodeError out of input() (strict stdin) that ended the chat and
    lost the lines read with it, or (surrogateescape stdin) was sent to the model as U+FFFD."""
    save_tiny(tmp_path / "sft.pt", "sft")
    said = b"Describe the owl.\n\xff\xfe it\nTell me more.\n"
    r = subprocess.run([sys.executable, "chat.py", f"--out_dir={tmp_path}", "--max_new_tokens=8",
                        "--show_tokens=True"], cwd=ROOT, input=said, capture_output=True, timeout=120,
                       env={**os.environ, "PYTHONIOENCODING": io_encoding})
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert "(not valid utf-8 text: not sent)" in out
    first, second = shown_prompts(out)  # the bad line never reached the model; the next one did, with history
    assert first == "<|endoftext|><|user|>Describe the owl.<|end|><|assistant|>"
    assert second.startswith(first) and second.endswith("<|user|>Tell me more.<|end|><|assistant|>")
    assert second.count("<|user|>") == 2


def test_max_new_tokens_with_no_room_for_a_message_is_refused_at_startup(tmp_path, refusal, monkeypatch):
    """--max_new_tokens close to block_size was accepted, then every turn dropped the whole history."""
    save_tiny(tmp_path / "sft.pt", "sft", block_size=128)
    bare = len(render_prompt(get_tokenizer("world"), [{"role": "user", "content": "?"}]))  # shortest prompt
    for n in (128 - bare + 1, 127, 128, 300):
        for mode in ([], ["--prompt=?"]):  # REPL or one message: refused before either starts
            assert refusal("chat", f"--out_dir={tmp_path}", f"--max_new_tokens={n}", *mode) == (
                f"error: --max_new_tokens={n} leaves no room for a message in the model's 128-token context: "
                f"it must be at most {128 - bare}")
    assert chat_main(monkeypatch, f"--out_dir={tmp_path}", "--prompt=?", f"--max_new_tokens={128 - bare}",
                     "--temperature=0").code == 0  # the limit itself fits


def test_a_system_message_with_no_room_for_a_message_is_refused_at_startup(tmp_path, refusal):
    """A long --system started the REPL, which then refused every message as too long."""
    save_tiny(tmp_path / "sft.pt", "sft", block_size=128)
    msg = refusal("chat", f"--out_dir={tmp_path}", "--system=" + " ".join(["Be kind."] * 100))
    assert msg.startswith("error: --system is ") and "--max_new_tokens=96" in msg and "128-token" in msg, msg
    # short enough alone, but not with room for the reply as well
    msg = refusal("chat", f"--out_dir={tmp_path}", "--system=" + " ".join(["Be kind."] * 12),
                  "--max_new_tokens=100")
    assert msg.startswith("error: --system is ") and "--max_new_tokens=100" in msg, msg


@pytest.mark.parametrize("config", [None, "baseline=rloo"])
def test_a_checkpoint_whose_config_is_not_a_dict_still_chats(tmp_path, monkeypatch, capsys, config):
    """A hand-made grpo checkpoint with config None or a string was an AttributeError: it counts as empty."""
    import chat as chat_py
    importlib.reload(chat_py)
    save_tiny(tmp_path / "grpo.pt", "grpo", config=config)
    monkeypatch.setattr(sys, "argv", ["chat.py", f"--out_dir={tmp_path}"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("/quit\n"))
    chat_py.main()
    assert f"chatting with {tmp_path / 'grpo.pt'} (grpo, step 7)" in capsys.readouterr().out


def test_reset_keeps_the_system_message(tmp_path):
    """/reset starts the conversation over from --system, not from nothing."""
    save_tiny(tmp_path / "sft.pt", "sft")
    r = chat(f"--out_dir={tmp_path}", "--show_tokens=True", "--system=Be kind.",
             stdin="Describe the owl.\n/reset\nDescribe the owl.\n/quit\n")
    first, second = shown_prompts(r.stdout)
    assert first.startswith("<|endoftext|><|system|>Be kind.<|end|><|user|>") and second == first


def test_reply_hands_temperature_top_k_and_top_p_to_the_sampler(monkeypatch):
    import chat as repl  # (chat() above runs the script)
    seen = {}

    def fake_respond(model, enc, convs, max_new_tokens, temperature, top_k=None, top_p=None, generator=None):
        seen.update(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        return [{"text": "Hi.", "ended": True}]

    monkeypatch.setattr(repl, "respond", fake_respond)
    enc = get_tokenizer("world")
    history = [{"role": "user", "content": "Hello"}]
    model = SimpleNamespace(config=SimpleNamespace(block_size=128))
    out = repl.reply(model, enc, history, 0, None, contextlib.nullcontext(), 7, 0.7, top_k=5, top_p=0.9)
    assert out == "Hi." and seen == {"max_new_tokens": 7, "temperature": 0.7, "top_k": 5, "top_p": 0.9}


def test_the_find_checkpoint_goes_ppo_dpo_grpo_rloo_sft_base():
    """With every stage's checkpoint in out_dir the furthest stage wins, in the documented order; each one
    taken away hands the choice to the next."""
    import tempfile
    from chat import find_checkpoint
    order = ["ppo.pt", "dpo.pt", "grpo.pt", "rloo.pt", "sft.pt", "base.pt"]
    with tempfile.TemporaryDirectory() as d:
        for name in order:
            open(os.path.join(d, name), "wb").close()
        for name in order:
            assert find_checkpoint(d) == os.path.join(d, name)
            os.remove(os.path.join(d, name))
        with pytest.raises(SystemExit, match="no checkpoint in") as e:
            find_checkpoint(d)
        assert f"make one with `python sft.py --out_dir={d}` (or pass --ckpt=...)" in str(e.value)


def test_a_stages_name_is_its_checkpoint_in_out_dir_and_a_path_is_itself(tmp_path):
    """--ckpt=dpo is out_dir/dpo.pt, whether or not a later stage's checkpoint is there too; a path (even one
    without a directory or .pt) is taken as it is, and a missing one is one line naming it."""
    from chat import find_checkpoint
    for name in ("ppo", "dpo", "grpo", "rloo", "sft", "base"):
        assert find_checkpoint("runs/a", name) == os.path.join("runs/a", f"{name}.pt")
    assert find_checkpoint("runs/a", "runs/b/dpo.pt") == "runs/b/dpo.pt"
    assert find_checkpoint("runs/a", "my_model") == "my_model"  # not a stage: a file of that name
    save_tiny(tmp_path / "ppo.pt", "ppo")
    save_tiny(tmp_path / "dpo.pt", "dpo")
    r = chat(f"--out_dir={tmp_path}", "--ckpt=dpo", stdin="/quit\n")
    assert r.returncode == 0 and f"chatting with {tmp_path / 'dpo.pt'} (dpo, step 7)" in r.stdout, r.stderr
    r = chat(f"--out_dir={tmp_path}", "--ckpt=sft", "--prompt=Hi")
    assert r.returncode != 0 and r.stderr.strip() == f"error: checkpoint {tmp_path / 'sft.pt'} not found"


def test_a_suggested_command_runs_as_printed_naming_out_dir_unless_it_is_the_default():
    """A message that says which command makes a missing file must make it where this run looks: with
    --out_dir=runs/a, `python reward.py` alone would write to out/ and the same error would come back."""
    assert runtime.command("reward.py", "out") == runtime.command("reward.py", "./out/")
    assert runtime.command("reward.py", "out") == "`python reward.py`"
    suggested = runtime.command("reward.py", "runs/a", "--resume=True")
    assert suggested == "`python reward.py --resume=True --out_dir=runs/a`"
    assert runtime.command("sft.py", "") == "`python sft.py --out_dir=.`"  # a file given without a directory


def test_a_temperature_between_0_and_a_thousandth_is_refused(tmp_path, refusal):
    save_tiny(tmp_path / "sft.pt", "sft")
    assert refusal("chat", f"--out_dir={tmp_path}", "--temperature=0.0005", "--prompt=Hi") == (
        "error: --temperature=0.0005 is out of range: it must be 0 (greedy) or >= 0.001")


def test_a_message_that_exactly_fills_the_context_is_not_sent(capsys):
    """The system message and the new one taking all block_size tokens leave no room for a reply token:
    refused like a longer one, the history kept (generate would refuse a prompt of block_size tokens)."""
    from chat import reply
    enc = get_tokenizer("world")
    history = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Describe the owl."},
               {"role": "assistant", "content": "The owl is calm."}]
    kept = list(history)
    history.append({"role": "user", "content": "Describe the fox and the cat."})
    n = len(render_prompt(enc, [history[0], history[-1]]))
    torch.manual_seed(0)
    model = M.GPT(M.GPTConfig(block_size=n, vocab_size=N_VOCAB, n_layer=1, n_head=2, n_embd=32)).eval()
    assert reply(model, enc, history, 1, None, torch.no_grad(), 1, 0.0) is None
    assert history == kept and "not sent" in capsys.readouterr().out
    model.config.block_size = n + 1  # one token of room: sent, the older exchange dropped to make it
    history.append({"role": "user", "content": "Describe the fox and the cat."})
    assert reply(model, enc, history, 1, None, torch.no_grad(), 1, 0.0) is not None


def test_a_blank_line_is_not_sent(tmp_path, monkeypatch, capsys):
    """Empty or all-space lines are skipped: only the real message reaches the model."""
    import chat as chat_py
    save_tiny(tmp_path / "sft.pt", "sft")
    importlib.reload(chat_py)
    monkeypatch.setattr(sys, "argv", ["chat.py", f"--out_dir={tmp_path}", "--max_new_tokens=4",
                                      "--show_tokens=True"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n   \nDescribe the owl.\n\n/quit\n"))
    chat_py.main()
    owl = "<|endoftext|><|user|>Describe the owl.<|end|><|assistant|>"
    assert shown_prompts(capsys.readouterr().out) == [owl]


def test_a_prompt_too_long_for_the_context_is_one_error_line(tmp_path, refusal):
    """--prompt answers once, for scripts: a message that cannot be sent is an error line and a failing exit
    (the REPL's soft "(... not sent)" said nothing on stderr and printed an empty reply)."""
    save_tiny(tmp_path / "sft.pt", "sft", block_size=32)
    n = len(render_prompt(get_tokenizer("world"), [{"role": "user", "content": "word " * 40}]))
    assert refusal("chat", f"--out_dir={tmp_path}", "--prompt=" + "word " * 40, "--max_new_tokens=4") == (
        f"error: --prompt is {n} tokens with the template; the context holds 32")


def test_undecodable_bytes_in_prompt_or_system_are_one_line(tmp_path, refusal):
    """Bytes the terminal's encoding cannot decode reach argv as lone surrogates (as on stdin, which the REPL
    refuses line by line): the tokenizer would have sent them as U+FFFD, silently."""
    save_tiny(tmp_path / "sft.pt", "sft")
    for name in ("prompt", "system"):
        msg = refusal("chat", f"--out_dir={tmp_path}", f"--{name}=caf\udce9")
        assert msg.startswith(f"error: --{name}='caf\\udce9' is out of range: it must be text"), msg
    r = subprocess.run([sys.executable.encode(), b"chat.py", f"--out_dir={tmp_path}".encode(),
                        b"--prompt=caf\xe9"], cwd=ROOT, capture_output=True, timeout=120)  # Latin-1 bytes
    assert r.returncode == 1 and r.stderr.decode().startswith("error: --prompt="), r.stderr[-1500:]


def test_a_closed_stdin_is_one_line_not_a_traceback(tmp_path):
    save_tiny(tmp_path / "sft.pt", "sft")
    r = subprocess.run([sys.executable, "chat.py", f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL, preexec_fn=lambda: os.close(0))
    assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr[-1500:])
    assert r.stderr.strip() == ("error: standard input is closed, so there is nothing to chat over; "
                                "--prompt=... answers one message")


def test_a_prompt_of_exactly_block_size_tokens_is_one_error_line_and_one_less_leaves_a_note(tmp_path, refusal,
                                                                                            capsys):
    """--prompt filling the whole context is refused like a longer one; in the REPL, a message leaving just
    --max_new_tokens says nothing, one token less says how much room is left."""
    from chat import reply
    enc = get_tokenizer("world")
    n = len(render_prompt(enc, [{"role": "user", "content": "word " * 10}]))
    save_tiny(tmp_path / "sft.pt", "sft", block_size=n)
    assert refusal("chat", f"--out_dir={tmp_path}", "--prompt=" + "word " * 10, "--max_new_tokens=4") == (
        f"error: --prompt is {n} tokens with the template; the context holds {n}")
    for block, said in ((n + 8, False), (n + 7, True)):
        config = M.GPTConfig(block_size=block, vocab_size=N_VOCAB, n_layer=1, n_head=2, n_embd=32)
        model = M.GPT(config).eval()
        history = [{"role": "user", "content": "word " * 10}]
        assert reply(model, enc, history, 0, None, torch.no_grad(), 8, 0.0) is not None
        out = capsys.readouterr().out
        assert ("(room for" in out) == said
        assert ("(room for 7 of --max_new_tokens=8 reply tokens)" in out) == said
