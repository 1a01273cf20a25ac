"""
GPT-2 weights in the Hugging Face layout (a directory with model.safetensors or pytorch_model.bin, and
optionally config.json), read into this project's GPT layout: model.load_gpt2() builds the network from them.

Nothing is downloaded: point --init at files you already have. The safetensors format is simple enough to
read without its library: an 8-byte little-endian header length, a JSON header, then the raw tensor bytes.
"""
import json
import os
import struct

import torch

# GPT-2 stores these matrices as Conv1D weights, (in, out); nn.Linear wants (out, in)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def read_safetensors(path):
    """{name: tensor} from a .safetensors file (F32, F16 or BF16 tensors)."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header, data = json.loads(f.read(n)), f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise SystemExit(f"error: {path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out[name] = torch.frombuffer(bytearray(data[start:end]),
                                     dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return out


def read_gpt2(path):
    """(state dict with our keys and (out, in) matrices, GPTConfig arguments) from a GPT-2 directory or file.
    A missing path or a directory without weights is one clear error line."""
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found "
                         "(expected a GPT-2 directory, model.safetensors or pytorch_model.bin)")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in ("model.safetensors", "pytorch_model.bin")]
        path = next((f for f in files if os.path.isfile(f)), None)
        if path is None:
            raise SystemExit(f"error: {folder} has neither model.safetensors nor pytorch_model.bin")
    sd = (read_safetensors(path) if path.endswith(".safetensors")
          else torch.load(path, map_location="cpu", weights_only=True))
    ours = {}
    for k, v in sd.items():
        k = k.removeprefix("transformer.")
        if k.split(".")[-2:] in (["attn", "bias"], ["attn", "masked_bias"]) or k.startswith("lm_head."):
            continue  # causal-mask buffers; lm_head is tied to wte
        ours["transformer." + k] = v.t() if k.endswith(CONV1D) else v  # Conv1D (in, out) -> Linear (out, in)
    cfg_file = os.path.join(folder, "config.json")
    n_embd = ours["transformer.wte.weight"].size(1)
    n_head = json.load(open(cfg_file))["n_head"] if os.path.isfile(cfg_file) else n_embd // 64
    args = dict(vocab_size=ours["transformer.wte.weight"].size(0),
                block_size=ours["transformer.wpe.weight"].size(0),
                n_layer=1 + max(int(k.split(".")[2]) for k in ours if k.startswith("transformer.h.")),
                n_head=n_head, n_embd=n_embd, bias="transformer.h.0.attn.c_attn.bias" in ours)
    return ours, args
