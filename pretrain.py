"""
Stage 0: next-token pretraining on the world corpus -> out/base.pt

The base model learns the world's language and facts from stories, descriptions, dialogues and lists of
instructions, by language modelling as in GPT-2 (Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners", Section 2, eq. 1: p(x) = prod_i p(x_i | x_1..x_{i-1})), trained nanoGPT style on random
windows of the token stream with the mean next-token cross-entropy

    L(theta) = -1/(B T) * sum_{b, t} log p_theta(x_{b, t+1} | x_{b, 1..t})

(https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf; GPT-2
has no arXiv version.)

It is a document continuer, not an assistant: given "Describe the fox." it tends to write more instructions,
like GPT-3 in the InstructGPT paper. SFT (sft.py) is what teaches it to answer. The departure from GPT-2 is
scale: a model, context and corpus small enough for a laptop CPU.

    python pretrain.py
    python pretrain.py --max_iters=2000 --n_layer=6     # any config name below can be overridden
    torchrun --nproc_per_node=2 pretrain.py             # DDP (gloo on CPU, nccl on GPUs)
    python pretrain.py --data=my_corpus.txt             # your own text (documents separated by blank lines)
"""
import os
import re
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import model as M
import runtime
from data import world
from data.tokenizer import encode_text, get_tokenizer

# -----------------------------------------------------------------------------
# config (every name can be overridden with --name=value)
out_dir = "out"            # checkpoints and metrics go here
data = ""                  # "" = the world corpus; or a UTF-8 text file, documents separated by blank lines
tokenizer = "world"        # "world" (trained here) or "gpt2" (needs tiktoken's cached files)
seed = 1337                # same seed, same run (on CPU)
device = "auto"            # auto: cuda > mps > cpu
dtype = "auto"             # auto: bf16 on CUDA if supported, else fp16; fp32 on CPU
compile = False            # torch.compile the model (CUDA)
n_layer, n_head, n_embd = 4, 4, 128  # depth, attention heads, width: small enough to train on a laptop CPU
block_size = 256           # context length; also the length of each training sequence
dropout = 0.0              # the corpus is tiny but the model is too: no dropout needed
batch_size = 16            # sequences per micro-batch (per process)
grad_accum = 1             # micro-batches per optimizer step
max_iters = 500            # optimizer steps
lr, min_lr = 3e-3, 3e-4    # peak learning rate, cosine-decayed to min_lr
warmup_iters = 50          # linear warmup while Adam's moment estimates are still noisy
weight_decay = 0.1         # AdamW, on matrices only (runtime.configure_optimizer)
beta1, beta2 = 0.9, 0.95   # nanoGPT's Adam betas
grad_clip = 1.0            # clip the global gradient norm (0 = off)
eval_interval = 100        # held-out loss and checkpoint every this many steps
eval_iters = 10            # batches per held-out loss estimate
resume = False             # continue from out_dir/base.pt (model, optimizer, step, RNG)
stop_at = 0                # end after this step as if killed (0 = max_iters): split a run, or test resume
n_samples = 64             # eval instructions completed at the end to show the base model does not answer
# -----------------------------------------------------------------------------


def next_token_loss(logits, targets):
    """The language-modelling loss (GPT-2, Radford et al. 2019, Section 2, eq. 1, https://cdn.openai.com/
    better-language-models/language_models_are_unsupervised_multitask_learners.pdf): mean cross-entropy of
    every next token. logits (B, T, V), targets (B, T) = the inputs shifted by one -> scalar fp32."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                           reduction="sum") / targets.numel()


def read_documents(path):
    """The training documents: the world corpus, or a UTF-8 text file split at blank lines."""
    if not path:
        return world.corpus_documents()
    if not os.path.exists(path):  # (not isfile: a pipe, --data=<(...), is read like a file)
        raise SystemExit(f"error: --data file {path} not found")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not text
            docs = [d.strip() for d in re.split(r"\n[ \t\r]*\n", f.read()) if d.strip()]  # blank: spaces too
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path} is not UTF-8 ({e.reason} at byte {e.start})")
    except OSError as e:  # unreadable (permissions, I/O): one line, as data/readers.py says it
        raise SystemExit(f"error: {path}: cannot read ({e.strerror or e})") from None
    if len(docs) < 2:
        raise SystemExit(f"error: {path} needs at least 2 documents separated by a blank line")
    return docs


def token_streams(docs, enc):
    """{"train", "val"}: one long tensor of token ids per split, every document opened by <|endoftext|>; the
    last 5% of the documents are held out."""
    n_val = max(1, len(docs) // 20)
    streams = {}
    for split, part in (("train", docs[:-n_val]), ("val", docs[-n_val:])):
        ids = []
        for d in part:
            ids += [enc.eot_token] + encode_text(enc, d)
        streams[split] = torch.tensor(ids, dtype=torch.long)
    return streams


def get_batch(stream, block_size, batch_size, seed, it, micro, rank, val=False):
    """batch_size random windows of the token stream: inputs (B, T) and the next tokens (B, T). The generator
    is seeded by (seed, step, micro-step, rank, split), so a resumed run draws exactly the batches an
    uninterrupted run would have drawn."""
    g = runtime.seeded_generator(seed, it + 1, micro, rank, int(val))
    # a window starts at 0 .. len - block_size - 1: the last one's targets end at the stream's last token
    ix = torch.randint(len(stream) - block_size, (batch_size,), generator=g)
    x = torch.stack([stream[i:i + block_size] for i in ix])
    y = torch.stack([stream[i + 1:i + 1 + block_size] for i in ix])
    return x, y


@torch.no_grad()
def held_out_loss(model, stream, block_size, batch_size, eval_iters, seed, device, ctx):
    """Mean loss over eval_iters held-out batches, the same ones every time (step -1) and in every process
    (rank 0's): under torchrun every process gets the same loss, so a non-finite one stops them all
    together rather than one while the others wait for it in the next all-reduce."""
    model.eval()
    losses = []
    for k in range(eval_iters):
        x, y = get_batch(stream, block_size, batch_size, seed, -1, k, 0, val=True)
        x, y = x.to(device), y.to(device)
        with ctx:
            losses.append(next_token_loss(model(x)[0], y).item())
    model.train()
    return sum(losses) / len(losses)


def show_samples(model, enc, n_samples, generator):
    """Free text, and held-out eval instructions as plain text, graded by the world's hidden human: the base
    model continues the document rather than answering."""
    eot = enc.eot_token
    seq, _, gen = M.generate(model, [[eot]] * 32, 64, stop_ids=(eot,), pad_id=eot, generator=generator)
    texts = [enc.decode([t for t, m in zip(r, k) if m and t != eot])
             for r, k in zip(seq.tolist(), gen.tolist())]
    sents = [s for t in texts for s in world.sentences(t)]
    fluent = sum(world.sentence_type(s) is not None for s in sents) / max(1, len(sents))
    print(f"\nfree text ({fluent:.1%} of {len(sents)} generated sentences pass the fluency check):")
    for t in texts[:3]:
        print("  " + t.replace("\n", "\n  ") + "\n  ---")
    evals = [p for p in world.prompts("eval") if len(p) == 1]
    prompts = [[eot] + encode_text(enc, p[0]["content"] + "\n") for p in evals]
    fits = [i for i, ids in enumerate(prompts) if len(ids) < model.config.block_size][:n_samples]
    if not fits:  # a context too short for any instruction and its answer
        return
    evals, prompts = [evals[i] for i in fits], [prompts[i] for i in fits]
    seq, _, gen = M.generate(model, prompts, 48, stop_ids=(eot,), pad_id=eot, generator=generator)
    outs = [enc.decode([t for t, m in zip(r, k) if m and t != eot]) for r, k in zip(seq.tolist(),
                                                                                     gen.tolist())]
    answered = [world.gold_components(p, o)["helpful"] > 0 for p, o in zip(evals, outs)]
    golds = [world.gold(p, o, ended=False) for p, o in zip(evals, outs)]  # a base model knows no <|end|>
    print(f"eval instructions: the base model does not answer {1 - sum(answered) / len(evals):.0%} of "
          f"{len(evals)} (it writes more instructions or other text); "
          f"mean gold {sum(golds) / len(golds):.3f} of ideal 1.0")
    for p, o in list(zip(evals, outs))[:3]:
        print(f"  {p[0]['content']}\n  -> {o.strip()[:160]!r}")


def main():
    # ---- 1. options (all checked before anything is read or written), device, precision, tokenizer
    config = runtime.configure(globals(), ranges={
        "max_iters": (lambda v: v >= 1, ">= 1"), "n_samples": (lambda v: v >= 0, ">= 0"),
        **dict.fromkeys(("n_layer", "n_head", "n_embd"), (lambda v: v >= 1, ">= 1")),
        "block_size": (lambda v: v >= 2, ">= 2 (a token to continue and room for the next)"),
        "tokenizer": (lambda v: v in ("world", "gpt2"), "one of world, gpt2")})
    if n_embd % n_head:
        raise SystemExit(f"error: --n_embd={n_embd} must be a multiple of --n_head={n_head}")
    ck_path = os.path.join(out_dir, "base.pt")
    log_path = os.path.join(out_dir, "pretrain.jsonl")
    hint = "a lower --lr"
    rt = runtime.setup(device, dtype, seed)
    enc = get_tokenizer(tokenizer)

    # ---- 2. data: documents -> one token stream per split
    streams = token_streams(read_documents(data), enc)
    for split, what in (("train", "training text"), ("val", "held-out text (the last 5% of the documents)")):
        n_tokens = len(streams[split])
        # one window needs block_size inputs and, one token later, block_size targets
        if n_tokens < block_size + 1:
            raise SystemExit(f"error: {data or 'the world corpus'}: the {what} has {n_tokens} tokens; "
                             f"need at least block_size + 1 = {block_size + 1} (more text, or a smaller "
                             "--block_size)")

    # ---- 3. model (fresh, or the run to resume), optimizer
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, dropout=dropout,
                      vocab_size=enc.n_vocab)
    start = 0
    ckpt = runtime.load_checkpoint(ck_path, "base", need=runtime.RESUME) if resume else None
    if ckpt:
        runtime.same_network(ck_path, ckpt, {"model_args": model_args, "tokenizer": tokenizer},
                             "the options ask for", "; resume with the options it was trained with, or start "
                             "afresh without --resume")  # --resume continues the checkpoint's own network
        model_args = {**ckpt["model_args"], "dropout": dropout}  # the network resumes, the options are new
        model = runtime.model_from_checkpoint(ckpt, ck_path, dropout=dropout).to(rt.device)
    else:
        model = M.GPT(M.GPTConfig(**model_args)).to(rt.device)
    optimizer = runtime.configure_optimizer(model, weight_decay, lr, (beta1, beta2), rt.device_type)
    if ckpt:
        start = runtime.restore(ckpt, model, optimizer, rt.scaler)
        if rt.master:
            print(f"resuming from {ck_path} at step {start}")
    raw_model = model
    model = runtime.wrap(model, rt, compile)

    # ---- 4. training: minimise the next-token loss; held-out loss and checkpoint every eval_interval steps
    tokens_per_step = batch_size * block_size * grad_accum * rt.world_size
    if rt.master:  # the run has started: a fresh log, or a resumed run's rows up to its checkpoint
        runtime.start_log(log_path, start if resume else None, ckpt)
        print(f"{raw_model.get_num_params(non_embedding=False) / 1e6:.2f}M parameters, "
              f"{len(streams['train']):,} training tokens, {tokens_per_step:,} tokens per step, "
              f"device {rt.device}, dtype {rt.dtype}")
    t0, watch = time.time(), runtime.Stopwatch(rt.device_type, rt.master)  # watch: where the time goes
    end = min(max_iters, stop_at or max_iters)  # --stop_at ends the run there, as if killed
    bar = tqdm(range(start, end), initial=start, total=max_iters, disable=not rt.master, desc="pretrain")
    for it in bar:
        for group in optimizer.param_groups:
            group["lr"] = runtime.get_lr(it, warmup_iters, max_iters, lr, min_lr)
        loss = 0.0  # the step's mean over its micro-batches: the guard and the log see every one of them
        for micro in range(grad_accum):
            x, y = get_batch(streams["train"], block_size, batch_size, seed, it, micro, rt.rank)
            x, y = x.to(rt.device), y.to(rt.device)
            if rt.ddp:  # all-reduce gradients only on the last micro-step
                model.require_backward_grad_sync = micro == grad_accum - 1
            with rt.ctx:
                micro_loss = next_token_loss(model(x)[0], y)
            rt.scaler.scale(micro_loss / grad_accum).backward()
            loss = loss + micro_loss.detach() / grad_accum
        norm = runtime.optimizer_step(model, optimizer, rt.scaler, grad_clip)
        runtime.check_finite("pretrain", it + 1, hint, loss=loss, grad_norm=norm)
        watch.lap("training")
        last = it + 1 == end
        val = None
        if (it + 1) % eval_interval == 0 or last:
            val = held_out_loss(model, streams["val"], block_size, batch_size, eval_iters, seed, rt.device,
                                rt.ctx)
            runtime.check_finite("pretrain", it + 1, hint, val_loss=val)
            watch.lap("held-out loss")
        if rt.master:
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val:.3f}" if val is not None else "-")
            runtime.append_jsonl(log_path, {"iter": it + 1, "loss": loss.item(), "val_loss": val,
                                            "lr": optimizer.param_groups[0]["lr"],
                                            "tokens": (it + 1) * tokens_per_step, "time": time.time() - t0})
            if val is not None:
                state = runtime.training_state(raw_model, optimizer, rt.scaler, log_path)
                runtime.save_checkpoint(ck_path, {**state, "config": config, "model_args": model_args,
                                                  "kind": "base", "step": it + 1, "tokenizer": tokenizer})
        watch.lap("logs & checkpoints")
    if rt.master and start >= end:
        print(f"{ck_path} is already at step {start} >= {end} (--max_iters={max_iters}, "
              f"--stop_at={stop_at}): nothing to train")

    # ---- 5. samples: free text, and eval instructions as plain text (the base model continues the document)
    if rt.master and tokenizer == "world" and not data and n_samples > 0:
        raw_model.eval()
        show_samples(raw_model, enc, n_samples, torch.Generator(device=rt.device).manual_seed(seed))
    watch.report("pretrain", last="samples")


if __name__ == "__main__":
    runtime.run(main)
