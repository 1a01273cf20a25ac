"""
Stage 1: supervised fine-tuning on demonstrations -> out/sft.pt

InstructGPT step 1 (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155, Figure 2): "a labeler
demonstrates the desired output behavior", and the pretrained model is fine-tuned on those demonstrations by
supervised learning (Section 3.5). The base model continues documents; after SFT it answers in the chat
template and closes its turn with <|end|>. The loss is cross-entropy on the assistant's tokens only
(data/chat.py's mask):

    L_SFT(theta) = -1/|A| * sum_{t in A} log pi_theta(x_{t+1} | x_1..x_t)

where A holds the positions whose next token belongs to an assistant turn (its words and its closing <|end|>).
The model learns what to say and when to stop, never to imitate the user. The demonstrations are imperfect
(rude, verbose, sometimes wrong or harmful), so SFT copies their habits too: it lands near the demonstrators'
own gold utility, which is what stages 2-3 improve on.

Departures from the paper: InstructGPT does not spell out its loss; here the prompt tokens are masked out, as
most SFT code does. It trains for 16 epochs with residual dropout 0.2 and picks the final model by
reward-model score on a validation set; here fewer passes with less dropout suit the tiny model and data, and
the last checkpoint is kept (there is no reward model yet at this stage).

    python sft.py                                  # builds out/base.pt first if missing
    python sft.py --data=my_chats.jsonl            # your own {"messages": [...]} conversations
    python sft.py --init=path/to/gpt2              # start from GPT-2 weights (Hugging Face layout) instead
    torchrun --nproc_per_node=2 sft.py             # DDP (gloo on CPU, nccl on GPUs)
"""
import dataclasses
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import model as M
import runtime
from data import world
from data.chat import render, render_prompt, sft_example
from data.gpt2 import read_gpt2
from data.readers import or_exit, read_messages
from data.tokenizer import get_tokenizer
from rollout import sample_and_grade

# -----------------------------------------------------------------------------
# config (every name can be overridden with --name=value)
out_dir = "out"            # reads out_dir/base.pt, writes out_dir/sft.pt and out_dir/sft.jsonl
init = ""                  # "" = out_dir/base.pt (pretrain.py makes it if missing); or GPT-2 weights
data = ""                  # "" = the world's demonstrations; or a JSONL file of {"messages": [...]} per line
seed = 1337                # same seed, same run (on CPU)
device = "auto"            # auto: cuda > mps > cpu
dtype = "auto"             # auto: bf16 on CUDA if supported, else fp16; fp32 on CPU
compile = False            # torch.compile the model (CUDA)
dropout = 0.1              # InstructGPT trains SFT with residual dropout; this one knob also drops the
                           # embedding sum and the attention probabilities (nanoGPT's). Without it the
                           # held-out loss is lower but the hidden human likes the answers less
                           # (docs/experiments.md)
batch_size = 32            # conversations per micro-batch (per process)
grad_accum = 1             # micro-batches per optimizer step
length_groups = 4          # each micro-batch runs as this many pieces of conversations of about one length,
                           # each padded only to its own longest: the same loss and gradient (up to rounding
                           # and dropout's draws), less padding computed (1: one piece; a GPU may prefer it)
max_iters = 450            # optimizer steps: 450 x 32 draws with replacement from the world's 12,276
                           # training demonstrations, about 1.17 epochs' worth; (1 - 1/12,276)^14,400
                           # ~ e^-1.17, so about 31% of them are expected never to be drawn
lr, min_lr = 3e-3, 3e-4    # peak learning rate, cosine-decayed to min_lr (a lower peak is still unfluent
                           # after max_iters)
warmup_iters = 20          # linear warmup while Adam's moment estimates are still noisy
weight_decay = 0.1         # AdamW, on matrices only (runtime.configure_optimizer)
beta1, beta2 = 0.9, 0.95   # nanoGPT's Adam betas
grad_clip = 1.0            # clip the global gradient norm (0 = off)
eval_interval = 50         # held-out loss and checkpoint every this many steps
eval_iters = 20            # at most this many batches of held-out conversations per loss estimate
resume = False             # continue from out_dir/sft.pt (model, optimizer, step, RNG)
stop_at = 0                # end after this step as if killed (0 = max_iters): split a run, or test resume
compare = True             # at the end, sample held-out prompts from base and SFT and grade them
max_new_tokens = 48        # reply length when sampling at the end
temperature = 1.0          # sampling temperature at the end (1.0: the policy as it is, what RL starts from)
# -----------------------------------------------------------------------------


def sft_loss(logits, targets, n_targets=None):
    """L_SFT, InstructGPT step 1 (https://arxiv.org/abs/2203.02155, Section 3.5; the module docstring): mean
    cross-entropy over the positions whose target is an assistant token; targets are -1 everywhere else
    (user and system turns, role markers, padding). logits (B, T, V), targets (B, T) -> scalar fp32. A batch
    with no assistant token left gives 0.0 (still in the graph), not NaN. The sum is divided by n_targets,
    by default this batch's count: a step split into micro-batches passes the whole step's count, so that the
    losses add up to the step's mean and every token weighs the same (a mean of the micro-batches' means
    would weigh a token of a micro-batch with few assistant tokens more)."""
    n = (targets != -1).sum().clamp(min=1) if n_targets is None else torch.tensor(max(n_targets, 1))
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                           reduction="sum") / n


def sft_batch(examples, pad_id):
    """[(ids, targets)] -> (ids (B, T), targets (B, T), attention_mask (B, T)), padded on the right; padding
    positions get target -1, so they add nothing to the loss."""
    ids, attn = M.pad_rows([x for x, _ in examples], pad_id)
    targets, _ = M.pad_rows([y for _, y in examples], -1)
    return ids, targets, attn


def cut_by_length(batch, groups):
    """A right-padded sft_batch (ids, targets, attention_mask) as up to `groups` pieces: its rows sorted by
    length, cut into groups of about equal count, each trimmed to its own longest row. The columns cut off are
    padding in every row of the piece (target -1, masked), so the pieces' summed losses are the batch's; only
    less padding goes through the network. One group is the batch as drawn."""
    if groups == 1:
        return [batch]
    ids, targets, attn = batch
    lengths = attn.sum(1)
    pieces = []
    for idx in lengths.argsort(stable=True).tensor_split(min(groups, len(lengths))):
        n = int(lengths[idx].max())
        pieces.append((ids[idx, :n], targets[idx, :n], attn[idx, :n]))
    return pieces


def train_batch(rows, batch_size, seed, it, micro, rank, pad_id):
    """batch_size random training conversations, as sft_batch tensors. The generator is seeded by (seed, step,
    micro-step, rank), so a resumed run draws exactly the batches an uninterrupted run would have drawn."""
    g = runtime.seeded_generator(seed, it + 1, micro, rank)
    ix = torch.randint(len(rows), (batch_size,), generator=g).tolist()
    return sft_batch([rows[i] for i in ix], pad_id)


@torch.no_grad()
def held_out_loss(model, rows, batch_size, eval_iters, pad_id, device, ctx, groups=1):
    """Mean loss per assistant token over the held-out conversations (the same ones every time); None when
    none of their assistant tokens fits block_size (logged as null: there is nothing to measure). Each batch
    runs as `groups` pieces by length (cut_by_length)."""
    model.eval()
    total, count = 0.0, 0
    pieces = [p for i in range(0, min(len(rows), eval_iters * batch_size), batch_size)
              for p in cut_by_length(sft_batch(rows[i:i + batch_size], pad_id), groups)]
    for piece in pieces:
        x, y, attn = [t.to(device) for t in piece]
        with ctx:
            loss = sft_loss(model(x, attention_mask=attn)[0], y)
        n = (y != -1).sum().item()
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / count if count else None


def read_conversations(path):
    """The training conversations: the world's demonstrations (train prompts only: world.prompts("eval")
    stays unseen), or a JSONL file of {"messages": [...]}, whose errors are one line naming file and line."""
    if not path:
        return world.demonstrations()
    convs = or_exit(read_messages, path)
    if len(convs) < 2:
        raise SystemExit(f"error: {path} needs at least 2 conversations (one is held out)")
    return convs


def load_gpt2(path, **overrides):
    """GPT from GPT-2 weights on disk (data/gpt2.py reads them), overrides changing GPTConfig; or one line."""
    sd, args = read_gpt2(path)
    return runtime.model_from_checkpoint({"model": sd, "model_args": args}, path, **overrides)


def load_base(init, base_path, dropout):
    """The model SFT starts from and is compared with: (model, model_args, tokenizer name), from base_path or,
    with init, from GPT-2 weights."""
    if not init:
        ckpt = runtime.load_checkpoint(base_path, "base")
        model = runtime.model_from_checkpoint(ckpt, base_path, dropout=dropout)
        return model, ckpt["model_args"], ckpt.get("tokenizer", "world")
    gpt2 = load_gpt2(init, dropout=dropout)
    # GPT-2 knows 50257 tokens, <|endoftext|> the last; our chat markers (<|user|> ...) take the rows after
    # it, started at the mean embedding so their first logits are ordinary rather than random. The table
    # (wte, and lm_head tied to it) ends at the tokenizer's last id: rows of a table padded further
    # (nanoGPT's has 50304) are never a target, yet sampling could draw them, and no text decodes from them
    enc = get_tokenizer("gpt2")
    known, sd = enc.eot_token + 1, gpt2.state_dict()
    sd.pop("lm_head.weight")  # the same tensor as wte (tied)
    wte = sd.pop("transformer.wte.weight")
    if wte.size(0) < known:
        raise SystemExit(f"error: {init}: an embedding of {wte.size(0)} tokens, fewer than GPT-2's {known}")
    table = torch.cat([wte[:known], wte[:known].mean(0).expand(enc.n_vocab - known, -1)])  # (n_vocab, C)
    sd["transformer.wte.weight"] = table
    args = {**dataclasses.asdict(gpt2.config), "vocab_size": table.size(0)}
    return runtime.load_weights(M.GPT(M.GPTConfig(**args)), sd), args, "gpt2"


def held_out_prompts(convs, n_val, own_data):
    """Prompts for the before/after comparison: the world's eval prompts, or the held-out conversations
    without their last reply (those that end with a user turn and an assistant reply)."""
    if not own_data:
        return world.prompts("eval")
    return [c[:-1] for c in convs[-n_val:] if len(c) > 1 and c[-2]["role"] == "user"
            and c[-1]["role"] == "assistant"]


def main():
    # ---- 1. options (all checked before anything is read or written), device, precision
    config = runtime.configure(globals(), ranges=dict.fromkeys(("max_iters", "length_groups"),
                                                                (lambda v: v >= 1, ">= 1")))
    base_path = os.path.join(out_dir, "base.pt")
    ck_path = os.path.join(out_dir, "sft.pt")
    log_path = os.path.join(out_dir, "sft.jsonl")
    hint = "a lower --lr"
    rt = runtime.setup(device, dtype, seed)

    # ---- 2. demonstrations and the run to resume: read first, so a bad file or a missing checkpoint is
    # reported before any model is built
    convs = read_conversations(data)
    if resume:
        model, enc, ckpt = runtime.load_model(ck_path, "sft", runtime.RESUME, dropout=dropout)
    start_from = init or (ckpt.get("config", {}).get("init", "") if resume else "")  # a resumed run's own
    if not start_from and (not resume or compare):  # base.pt is needed to start from, or to compare with
        runtime.ensure_checkpoint(base_path, "pretrain.py", out_dir)  # rank 0 builds it, the others wait

    # ---- 3. model (the base model, or the run to resume), optimizer
    if resume:
        model_args, tokenizer = {**ckpt["model_args"], "dropout": dropout}, ckpt.get("tokenizer", "world")
        if rt.master and compare:  # read before training: a bad --init, or a base.pt made anew, is one line
            base, base_args, base_tok = load_base(start_from, base_path, dropout)
            runtime.same_network(start_from or base_path, {"model_args": base_args, "tokenizer": base_tok},
                                 ckpt, "the SFT model it resumes", "; --compare=False skips the comparison")
    else:
        model, model_args, tokenizer = load_base(init, base_path, dropout)
        model_args = {**model_args, "dropout": dropout}
        enc = get_tokenizer(tokenizer)
    model.to(rt.device)
    eot = enc.eot_token  # <|endoftext|>: pads batches
    block_size = model.config.block_size
    optimizer = runtime.configure_optimizer(model, weight_decay, lr, (beta1, beta2), rt.device_type)
    start = 0
    if resume:
        start = runtime.restore(ckpt, model, optimizer, rt.scaler)
        if rt.master:
            print(f"resuming from {ck_path} at step {start}")
    raw_model = model
    model = runtime.wrap(model, rt, compile)

    # ---- 4. tokenize: (ids, targets) rows; the last 5% of conversations are held out
    n_long = sum(len(render(enc, c)[0]) - 1 > block_size for c in convs)
    if n_long and rt.master:
        print(f"warning: {n_long} of {len(convs)} conversations are longer than block_size={block_size} "
              "tokens and were cut (their later turns are not learned)")
    n_val = max(1, len(convs) // 20)
    train_rows = [sft_example(enc, c, block_size) for c in convs[:-n_val]]
    val_rows = [sft_example(enc, c, block_size) for c in convs[-n_val:]]
    n_tok = sum(sum(t != -1 for t in y) for _, y in train_rows)
    if n_tok == 0:  # every reply cut off: the run would learn nothing, yet replace sft.pt
        raise SystemExit(f"error: {data or 'the demonstrations'}: no assistant token of the training "
                         f"conversations fits in block_size={block_size}; shorter ones, or a longer context")

    # ---- 5. training: minimise L_SFT, a held-out loss and a checkpoint every eval_interval steps
    if rt.master:  # the run has started: a fresh log, or a resumed run's rows up to its checkpoint
        runtime.start_log(log_path, start if resume else None, ckpt if resume else None)
        print(f"{raw_model.get_num_params(non_embedding=False) / 1e6:.2f}M parameters, {len(train_rows)} "
              f"training conversations ({n_tok:,} assistant tokens), {len(val_rows)} held out, "
              f"{batch_size * grad_accum * rt.world_size} conversations per step, device {rt.device}, "
              f"dtype {rt.dtype}")
    t0, watch = time.time(), runtime.Stopwatch(rt.device_type, rt.master)  # watch: where the time goes
    model.train()
    end = min(max_iters, stop_at or max_iters)  # --stop_at ends the run there, as if killed
    bar = tqdm(range(start, end), initial=start, total=max_iters, disable=not rt.master, desc="sft")
    for it in bar:
        for group in optimizer.param_groups:
            group["lr"] = runtime.get_lr(it, warmup_iters, max_iters, lr, min_lr)
        pieces = [piece for m in range(grad_accum)  # the micro-batches, each cut into pieces by length
                  for piece in cut_by_length(train_batch(train_rows, batch_size, seed, it, m, rt.rank, eot),
                                             length_groups)]
        n_targets = sum((y != -1).sum().item() for _, y, _ in pieces)  # the step's assistant tokens
        if rt.ddp:  # every process's: DDP averages the gradients, so each loss is scaled by world_size below
            n_targets = torch.tensor(n_targets, device=rt.device)
            torch.distributed.all_reduce(n_targets)
            n_targets = n_targets.item()
        loss = 0.0
        for i, piece in enumerate(pieces):
            x, y, attn = [t.to(rt.device) for t in piece]
            if rt.ddp:  # all-reduce gradients only on the last piece
                model.require_backward_grad_sync = i == len(pieces) - 1
            # the pieces' losses add up to the step's mean over all its assistant tokens (under
            # torchrun, the log and the guard see this process's estimate of it, as in every stage).
            # Dividing by the count over all processes and then scaling by world_size, rather than dividing
            # by count / world_size, keeps sft_loss's guard (a count of at least 1) on the true count
            with rt.ctx:
                micro_loss = sft_loss(model(x, attention_mask=attn)[0], y, n_targets) * rt.world_size
            rt.scaler.scale(micro_loss).backward()
            loss = loss + micro_loss.detach()
        norm = runtime.optimizer_step(model, optimizer, rt.scaler, grad_clip)
        runtime.check_finite("sft", it + 1, hint, loss=loss, grad_norm=norm)
        watch.lap("training")
        last = it + 1 == end
        due, val = (it + 1) % eval_interval == 0 or last, None
        if due:
            val = held_out_loss(model, val_rows, batch_size, eval_iters, eot, rt.device, rt.ctx,
                                length_groups)
            if val is not None:
                runtime.check_finite("sft", it + 1, hint, val_loss=val)
            watch.lap("held-out loss")
        if rt.master:
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val:.3f}" if val is not None else "-")
            runtime.append_jsonl(log_path, {"iter": it + 1, "loss": loss.item(), "val_loss": val,
                                            "lr": optimizer.param_groups[0]["lr"], "targets": n_targets,
                                            "time": time.time() - t0})
            if due:
                state = runtime.training_state(raw_model, optimizer, rt.scaler, log_path)
                runtime.save_checkpoint(ck_path, {**state, "config": config, "model_args": model_args,
                                                  "kind": "sft", "step": it + 1, "tokenizer": tokenizer})
        watch.lap("logs & checkpoints")
    if rt.master and start >= end:
        print(f"{ck_path} is already at step {start} >= {end} (--max_iters={max_iters}, "
              f"--stop_at={stop_at}): nothing to train")

    # ---- 6. before and after: the base model and the SFT model answer the same held-out prompts
    if rt.master and compare:
        raw_model.eval()
        base = (base if resume else load_base(start_from, base_path, dropout)[0]).to(rt.device).eval()
        g = torch.Generator(device=rt.device).manual_seed(seed)
        prompts = held_out_prompts(convs, n_val, bool(data))
        # generate() needs the prompt and its <|assistant|> marker to leave room for one token at least
        prompts = [p for p in prompts if len(render_prompt(enc, p)) < block_size]
        with rt.ctx:
            res = {name: sample_and_grade(m, enc, prompts, max_new_tokens, temperature, generator=g,
                                          lap=watch.lap) for name, m in (("base", base), ("sft", raw_model))}
        print(f"\nheld-out prompts, one sample each (temperature {temperature}):")
        for i, p in enumerate(prompts[:3]):
            print("  " + " / ".join(m["content"] for m in p))  # earlier turns too, for follow-ups
            for name in ("base", "sft"):
                print(f"    {name:>4}: {res[name]['samples'][i]['text'].strip()[:160]!r}")
        if not data:  # gold() grades the world's language only
            for name in ("base", "sft"):
                r = res[name]
                print(f"{name:>4}: mean gold {r['gold']:.3f} of ideal 1.0, ends its turn {r['ended']:.0%}, "
                      f"fluency {r['fluency']:.0%} ({r['n']} prompts)")
            demo = sum(world.gold(c[:-1], c[-1]["content"]) for c in convs) / len(convs)
            print(f"demonstrations: mean gold {demo:.3f} "
                  "(SFT imitates them; reward.py + ppo.py/dpo.py aim higher)")
    watch.report("sft")


if __name__ == "__main__":
    runtime.run(main)
