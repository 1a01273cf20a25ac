"""
GPT-2 weights in the Hugging Face layout (a directory with model.safetensors or pytorch_model.bin, and
optionally config.json), read into this project's GPT layout: sft.load_gpt2() builds the network from
them.

Nothing is downloaded: point --init at files you already have. The safetensors format is simple enough to
read without its library: an 8-byte little-endian header length, a JSON header, then the raw tensor bytes.
"""
import json
import math
import os
import pickle
import struct
import warnings

import torch

# GPT-2 stores these matrices as Conv1D weights, (in, out); nn.Linear wants (out, in)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def read_safetensors(path):
    """{name: tensor} from a .safetensors file (F32, F16 or BF16 tensors). Every length and offset comes from
    the file, so each is checked before use: a damaged or cut-off file is one line naming it."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SystemExit(f"error: {path}: not a safetensors file ({len(head)} bytes; one starts with "
                             "an 8-byte header length)")
        n = struct.unpack("<Q", head)[0]
        # garbage announces an absurd length: compare it with the file before reading that many bytes
        raw = f.read(n) if n <= os.fstat(f.fileno()).st_size - 8 else b""
        try:
            header = json.loads(raw) if len(raw) == n else None
        except (ValueError, RecursionError):  # not UTF-8 or not JSON (ValueErrors both), or nested too deep
            header = None
        if not isinstance(header, dict):
            raise SystemExit(f"error: {path}: not a safetensors file (no JSON header of the {n} bytes "
                             "its first 8 bytes announce)")
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            numbers = [*shape, start, end]  # (an empty tensor's other dimensions could be any size: bounded)
            if not isinstance(dtype, str) or not all(type(x) is int and 0 <= x < 2 ** 40 for x in numbers):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise SystemExit(f"error: {path}: tensor {name}'s header entry is damaged "
                             "(it needs dtype, shape and data_offsets)") from None
        if dtype not in dtypes:
            raise SystemExit(f"error: {path}: tensor {name} has unsupported dtype {dtype}")
        size = math.prod(shape) * dtypes[dtype].itemsize
        if end > len(data):
            raise SystemExit(f"error: {path}: truncated: tensor {name} ends at data byte {end}, "
                             f"the file holds {len(data)}")
        if end - start != size:
            raise SystemExit(f"error: {path}: tensor {name} has {end - start} bytes at data_offsets "
                             f"[{start}, {end}], its shape {shape} in {dtype} needs {size}")
        out[name] = (torch.frombuffer(bytearray(data[start:end]), dtype=dtypes[dtype]).reshape(shape) if size
                     else torch.empty(shape, dtype=dtypes[dtype]))  # frombuffer refuses an empty buffer
    return out


def read_pytorch_bin(path):
    """{name: tensor} from a pytorch_model.bin, loaded with weights_only=True (a pickle cannot run code); a
    damaged file is one line naming it."""
    if os.path.getsize(path) == 0:
        raise SystemExit(f"error: {path}: empty file, not PyTorch weights (a download that never finished?)")
    try:
        with warnings.catch_warnings():  # the refusal is our one line, not torch's advice to unpickle anyway
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SystemExit(f"error: {path}: not PyTorch weights, or a pickle of more than tensors "
                         "(which weights_only=True refuses to load)") from None
    except Exception as e:  # torch.load fails on damage in many ways: EOFError, RuntimeError, IndexError, ...
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise SystemExit(f"error: {path}: not readable PyTorch weights ({type(e).__name__}: {why})") from None


def read_gpt2(path):
    """(state dict with our keys and (out, in) matrices, GPTConfig arguments) from a GPT-2 directory or file.
    A missing path, a directory without weights or a damaged file is one clear error line."""
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found "
                         "(expected a GPT-2 directory, model.safetensors or pytorch_model.bin)")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in ("model.safetensors", "pytorch_model.bin")]
        path = next((f for f in files if os.path.isfile(f)), None)
        if path is None:
            raise SystemExit(f"error: {folder} has neither model.safetensors nor pytorch_model.bin")
    sd = read_safetensors(path) if path.endswith(".safetensors") else read_pytorch_bin(path)
    if not (isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                         for k, v in sd.items())):
        raise SystemExit(f"error: {path}: not a state dict (a {type(sd).__name__}, not names -> tensors)")
    ours = {}
    for k, v in sd.items():
        k = k.removeprefix("transformer.")
        if k.split(".")[-2:] in (["attn", "bias"], ["attn", "masked_bias"]) or k.startswith("lm_head."):
            continue  # causal-mask buffers; lm_head is tied to wte
        # Conv1D (in, out) -> Linear (out, in); a tensor of another rank is left for the shape check to refuse
        ours["transformer." + k] = v.t() if k.endswith(CONV1D) and v.dim() == 2 else v
    layers = {k.split(".")[2] for k in ours if k.startswith("transformer.h.")}
    matrices = all(ours.get(f"transformer.{k}.weight", torch.empty(0)).dim() == 2 for k in ("wte", "wpe"))
    if not matrices or not layers or not all(i.isdecimal() for i in layers):
        raise SystemExit(f"error: {path}: not GPT-2 weights (it needs wte.weight, wpe.weight and h.0, ...)")
    # the largest index sets n_layer: a stray h.3000000 would build three million blocks before any check
    if sorted(map(int, layers)) != list(range(len(layers))):
        raise SystemExit(f"error: {path}: its layers are not h.0 to h.{len(layers) - 1}, one each")
    if min(ours["transformer.wte.weight"].shape) < 1 or ours["transformer.wpe.weight"].shape[0] < 2:
        raise SystemExit(f"error: {path}: wte.weight {tuple(ours['transformer.wte.weight'].shape)} and "
                         f"wpe.weight {tuple(ours['transformer.wpe.weight'].shape)} leave no model to build")
    cfg_file = os.path.join(folder, "config.json")
    n_embd = ours["transformer.wte.weight"].size(1)
    n_head = n_embd // 64
    if os.path.isfile(cfg_file):
        try:
            n_head = json.load(open(cfg_file, encoding="utf-8"))["n_head"]
            if type(n_head) is not int or n_head < 1:
                raise ValueError
        except (ValueError, KeyError, TypeError, RecursionError):  # not UTF-8 or JSON, no good n_head
            raise SystemExit(f"error: {cfg_file}: not a GPT-2 config "
                             "(a JSON object with n_head >= 1)") from None
    args = dict(vocab_size=ours["transformer.wte.weight"].size(0),
                block_size=ours["transformer.wpe.weight"].size(0),
                n_layer=len(layers),
                n_head=n_head, n_embd=n_embd, bias="transformer.h.0.attn.c_attn.bias" in ours)
    return ours, args
