"""
GPT-2 in one file, in the style of nanoGPT, able to load the real GPT-2 weights.

The network is GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners", Section 2.3): pre-LayerNorm transformer blocks (the block itself is Vaswani et
al. 2017; Eq. 1 for attention), learned position embeddings, the tanh approximation of
GELU, and an output head tied to the token embedding (Press & Wolf 2017).

In reading order:
1. The network: attention, MLP, block, config, GPT.
2. Writing files atomically: one helper that every write below goes through.
3. The .safetensors format, read and written by hand, so loading needs only torch and
   the standard library and never unpickles anything.
4. GPT-2 checkpoints in the Hugging Face layout: key names, the Conv1D weights that
   nn.Linear wants transposed, the causal-mask buffers to skip, config.json.
5. The Hugging Face hub: reuse the copy in the standard cache, else download one,
   checking size and sha256 before anything is kept.
6. from_pretrained, put together.
Each chapter states the facts about the real files and the real hub that it relies on.

References: nanoGPT (Karpathy), picoGPT (Mody), the safetensors format spec, the
huggingface_hub client's cache layout.
Read next: dpo.py, which turns this model's logits into DPO's log-probabilities.
"""

import hashlib
import http.client
import json
import math
import os
import re
import secrets
import shutil
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# 1. The network


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        # query, key and value for all heads in one matrix, as GPT-2 stores them
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        # softmax(q k^T / sqrt(hs)) v with a causal mask (Vaswani et al. 2017, Eq. 1);
        # the fused kernel never materialises the (T, T) mask that GPT-2 checkpoints carry
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2's "gelu_new" is the tanh approximation; the exact erf GELU differs
        # by up to 4.7e-4 and would break parity with the published weights
        x = F.gelu(self.c_fc(x), approximate="tanh")  # (B, T, 4C)
        return self.dropout(self.c_proj(x))  # (B, T, C)


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        # pre-LayerNorm residual blocks (GPT-2 paper, Section 2.3)
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass
class GPTConfig:
    block_size: int = 1024  # the context length, n_positions in Hugging Face's config
    vocab_size: int = 50257  # GPT-2's BPE vocabulary
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # off by default: DPO needs deterministic log-probs
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm


# The four published sizes (GPT-2 paper, Table 2), all with vocab 50257, a 1024-token
# context, layer-norm eps 1e-5, the tanh GELU and an MLP of 4 x n_embd (no n_inner).
GPT2_MODELS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd {config.n_embd} is not divisible by n_head {config.n_head}: "
                             "every head must get the same width")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (Press & Wolf 2017): GPT-2 scores tokens with its own embedding
        # matrix, so its checkpoints hold no separate head. One Parameter, two uses:
        # autograd adds the lookup's gradient and the head's.
        self.transformer.wte.weight = self.lm_head.weight
        # GPT-2's initialisation, with residual projections scaled by 1/sqrt(2 n_layer)
        # (GPT-2 paper, Section 2.3); only used when not loading weights
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, logits_at=None):
        """Logits (B, T, vocab_size) for token ids idx (B, T).

        logits_at: optional (B, T) bool mask; then only those positions are scored and the
        result is (N, vocab_size), N = logits_at.sum(), in row-major order. DPO needs logits
        only where they score a completion's tokens, and the output head is about a third of
        GPT-2 small's compute, so skipping the prompt positions is a real saving."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(
                f"sequence of length {T} is longer than the model's context "
                f"(block_size {self.config.block_size}); shorten the prompt or completion"
            )
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C)
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if logits_at is not None:
            x = x[logits_at]  # (N, C)
        logits = self.lm_head(x)  # (B, T, vocab_size), or (N, vocab_size)
        return logits

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Continue idx (B, T) by max_new_tokens tokens; temperature 0 is greedy."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]  # the context window slides
            last = torch.zeros(idx_cond.shape, dtype=torch.bool, device=idx.device)
            last[:, -1] = True  # only the last position predicts the next token: the head runs there alone
            logits = self(idx_cond, logits_at=last)  # (B, vocab_size)
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    @classmethod
    def from_pretrained(cls, name_or_path, device=None, dtype=None):
        """A GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, optionally with the hub's
        "openai-community/" in front), a .safetensors file, or a directory holding
        model.safetensors (and config.json). Chapters 4 to 6 below do the work."""
        return load_gpt2_checkpoint(name_or_path, device=device, dtype=dtype)

    def save_pretrained(self, directory):
        """Write config.json and model.safetensors in the Hugging Face GPT-2 layout."""
        write_gpt2_checkpoint(self, directory)


# -----------------------------------------------------------------------------
# 2. Writing files atomically
#
# A run killed half-way through a save must not leave a half-written checkpoint under the
# real name, or a cache entry that looks complete. So everything is written under a
# temporary name beside the target and renamed into place: a rename within one folder is
# atomic, so the name holds either the old contents or the new ones, never a mix.


def unused_sibling(path, suffix):
    """A name beside path (same folder, so renames stay atomic) that nothing has yet."""
    while True:
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.{suffix}")
        if not os.path.lexists(candidate):
            return candidate


def remove(path):
    """Delete a file, a symlink or a whole folder, whichever path is; nothing if absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def write_atomically(path, write):
    """Make `path` by calling write(tmp), then renaming tmp into path's place.

    write(tmp) gets a fresh path that does not exist yet, in path's folder, and writes there
    either a file (open(tmp, "wb")) or a folder (tmp.mkdir(), then its contents). Since
    write itself creates them, files get the usual permissions, as open() makes them under
    the umask.
    On success tmp takes path's place: a file in one atomic rename; a folder by moving the
    one already at path aside, renaming tmp into place, then deleting the old one (so for a
    moment path may be missing, but it never holds half of either).
    On any exception (KeyboardInterrupt too) tmp is removed, file or whole tree, path is
    left exactly as it was, and the exception propagates."""
    path = Path(path)
    tmp = unused_sibling(path, "tmp")
    try:
        write(tmp)
        folder = (tmp.is_dir() and not tmp.is_symlink()) or (path.is_dir() and not path.is_symlink())
        if folder and os.path.lexists(path):
            old = unused_sibling(path, "old")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            remove(old)  # the new one is in place: only now is the old one let go
        else:
            os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


# -----------------------------------------------------------------------------
# 3. The .safetensors format, by hand
#
# [8 bytes: N, little-endian u64][N bytes: JSON header][data bytes]
# The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]},
# offsets relative to the start of the data, plus an optional "__metadata__" of strings
# ({"format": "pt"} in GPT-2's files). Tensors are stored row-major, little-endian.
#
# Never assume the data is aligned: the hub's gpt2 model.safetensors has a header of
# N = 14,283 bytes, so its data starts at byte 14,291, which is not a multiple of 8 (it
# was written by an old writer that did not pad). Each tensor's bytes are copied out into
# a fresh tensor instead of being viewed in place.

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the reference implementation's bound: refuse absurd headers


def read_safetensors_header(f, path, file_size):
    """Parse and validate the header; returns (tensor entries sorted by offset, metadata, data start)."""
    def bad(problem):
        return ValueError(f"{path}: not a valid .safetensors file: {problem}")

    if file_size < 8:
        raise bad(f"only {file_size} bytes, too short to hold the 8-byte header length (truncated?)")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES:
        raise bad(f"header length {n} is above the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > file_size:
        raise bad(f"header length {n} runs past the end of the {file_size}-byte file (truncated?)")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in SAFETENSORS_DTYPES:
            dtype = info.get("dtype") if isinstance(info, dict) else info
            raise bad(f"tensor '{name}' has unknown dtype {dtype!r} (known: {', '.join(SAFETENSORS_DTYPES)})")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise bad(f"tensor '{name}' has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise bad(f"tensor '{name}' has invalid data_offsets {offsets!r}")
        itemsize = torch.empty((), dtype=SAFETENSORS_DTYPES[info["dtype"]]).element_size()
        nbytes = math.prod(shape) * itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"tensor '{name}' spans {offsets[1] - offsets[0]} bytes but its "
                      f"{info['dtype']} shape {shape} needs {nbytes}")
        entries.append((offsets[0], offsets[1], name, info["dtype"], shape))
    # like the reference implementation: the tensors tile the data exactly, in order,
    # with no gaps and no overlaps, and the data ends where the last tensor does
    entries.sort()
    data_size = file_size - 8 - n
    expected_begin = 0
    for begin, end, name, _, _ in entries:
        if end > data_size:
            raise bad(f"tensor '{name}' ends at data byte {end} but the file holds only {data_size} "
                      "bytes of data (truncated?)")
        if begin != expected_begin:
            kind = "overlaps the tensor before it" if begin < expected_begin else "leaves a gap before it"
            raise bad(f"tensor '{name}' starts at data byte {begin}, which {kind} (expected {expected_begin})")
        expected_begin = end
    if expected_begin != data_size:
        raise bad(f"{data_size - expected_begin} trailing bytes after the last tensor (the tensors cover "
                  f"{expected_begin} of the file's {data_size} data bytes); the file should end there")
    return entries, metadata, 8 + n


def load_safetensors(path):
    """Read a .safetensors file into a dict of CPU tensors. Never unpickles anything."""
    path = Path(path)
    tensors = {}
    with open(path, "rb") as f:
        entries, _, data_start = read_safetensors_header(f, path, os.fstat(f.fileno()).st_size)
        for begin, end, name, dtype, shape in entries:
            t = torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype])  # fresh, so aligned
            f.seek(data_start + begin)
            if f.readinto(t.view(-1).view(torch.uint8).numpy()) != end - begin:
                raise ValueError(f"{path}: tensor '{name}' is cut short (truncated file?)")
            tensors[name] = t
    return tensors


def save_safetensors(tensors, path, metadata=None):
    """Write a dict of tensors as a .safetensors file, atomically (write_atomically)."""
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise ValueError(f"save_safetensors needs a dict of str -> torch.Tensor; got {name!r} -> {type(t).__name__}")
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor '{name}' has dtype {t.dtype}, which .safetensors cannot store here")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map strings to strings")
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # pad with spaces so the data starts 8-byte aligned

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            for t in tensors.values():
                f.write(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy())  # no extra copy

    write_atomically(path, write)


# -----------------------------------------------------------------------------
# 4. GPT-2 checkpoints in the Hugging Face layout
#
# The hub's openai-community/gpt2/model.safetensors (548,105,171 bytes, all F32) holds 160
# tensors with no "transformer." prefix: wte.weight, wpe.weight, h.{i}.ln_1.*,
# h.{i}.attn.c_attn.*, h.{i}.attn.c_proj.*, h.{i}.ln_2.*, h.{i}.mlp.c_fc.*, h.{i}.mlp.c_proj.*,
# ln_f.* (148 parameters, 124,439,808 numbers), plus 12 causal-mask buffers h.{i}.attn.bias
# of shape [1, 1, 1024, 1024], which our attention does not need. Careful: h.{i}.attn.bias
# is a buffer but h.{i}.attn.c_attn.bias a parameter, so match the whole name. There is no
# lm_head.weight: the head is tied to wte.
# OpenAI's Conv1D modules store their four weights (attn.c_attn, attn.c_proj, mlp.c_fc,
# mlp.c_proj) as (in, out), e.g. c_attn.weight is [768, 2304]: the transpose of nn.Linear's
# (out, in). Nothing else is transposed.
# What transformers' save_pretrained writes is the second real layout: the same tensors with
# a "transformer." prefix, no mask buffers, the header padded to a multiple of 8. Both
# load; save_pretrained writes the hub's layout, which transformers loads too.

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


def is_conv1d_weight(name):
    return name.endswith(CONV1D_WEIGHTS)


def hf_to_our_state_dict(hf_tensors, path):
    """Rename and transpose Hugging Face GPT-2 tensors into this file's names."""
    ours = {}
    for hf_name, t in hf_tensors.items():
        name = hf_name.removeprefix("transformer.")
        if MASK_BUFFER.fullmatch(name):
            continue
        if name == "lm_head.weight":
            continue  # tied to wte; checked below
        ours["transformer." + name] = t.t() if is_conv1d_weight(name) else t
    head = hf_tensors.get("lm_head.weight")
    wte = ours.get("transformer.wte.weight")
    if head is not None and wte is not None and not torch.equal(head, wte):
        raise ValueError(f"{path}: lm_head.weight differs from wte.weight, but this GPT ties them "
                         "(as GPT-2 does); an untied checkpoint cannot be loaded here")
    return ours


def our_to_hf_state_dict(state_dict):
    """The inverse: hub layout, no prefix, no lm_head (tied), Conv1D weights (in, out)."""
    hf = {}
    for name, t in state_dict.items():
        if name == "lm_head.weight":
            continue
        hf_name = name.removeprefix("transformer.")
        hf[hf_name] = (t.t() if is_conv1d_weight(hf_name) else t).contiguous()
    return hf


def config_from_hf_json(config_path):
    """GPTConfig from a Hugging Face GPT-2 config.json (n_positions, n_embd, ...), refusing
    what this model cannot compute: another activation, eps or MLP width."""
    try:
        hf = json.loads(Path(config_path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e}); delete it to infer the config from the weights") from None
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{config_path}: activation_function {activation!r} is not GPT-2's tanh GELU "
                         "('gelu_new'), which is the only one this model implements")
    if hf.get("layer_norm_epsilon", 1e-5) != 1e-5 or hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 0)):
        raise ValueError(f"{config_path}: layer_norm_epsilon {hf.get('layer_norm_epsilon')} / n_inner "
                         f"{hf.get('n_inner')} differ from GPT-2's 1e-5 / 4 x n_embd, which this model hard-codes")
    try:
        return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                         n_head=hf["n_head"], n_embd=hf["n_embd"], bias=hf.get("bias", True))
    except KeyError as e:
        raise ValueError(f"{config_path}: GPT-2 config.json has no {e.args[0]!r}") from None


def config_from_shapes(ours, path):
    """Without config.json: read the sizes off the tensors (already in our names). The number
    of heads is the one thing shapes cannot say, so only the four GPT-2 widths are accepted."""
    if "transformer.wte.weight" not in ours or "transformer.wpe.weight" not in ours:
        raise ValueError(f"{path}: no wte.weight / wpe.weight, so this is not a GPT-2 checkpoint")
    vocab_size, n_embd = ours["transformer.wte.weight"].shape
    n_head = {c["n_embd"]: c["n_head"] for c in GPT2_MODELS.values()}.get(n_embd)
    if n_head is None:
        raise ValueError(f"{path}: width {n_embd} is none of GPT-2's, so its number of heads is unknown; "
                         "put the model's config.json beside the file")
    n_layer = len({name.split(".")[2] for name in ours if name.startswith("transformer.h.")})
    return GPTConfig(block_size=ours["transformer.wpe.weight"].shape[0], vocab_size=vocab_size,
                     n_layer=n_layer, n_head=n_head, n_embd=n_embd, bias="transformer.ln_f.bias" in ours)


def check_tensors_match(expected_shapes, tensors, path):
    """Every tensor the model needs is there with its shape, and there is nothing else."""
    def listing(names):
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    missing = [n for n in expected_shapes if n not in tensors]
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {listing(missing)} (names as in this model; "
                         "is this a GPT-2 checkpoint of the configured size?)")
    unexpected = [n for n in tensors if n not in expected_shapes]
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor(s) {listing(unexpected)} that this GPT-2 does not have")
    for name, shape in expected_shapes.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(f"{path}: tensor '{name}' has shape {tuple(tensors[name].shape)} in the file "
                             f"but the model expects {tuple(shape)} (does config.json match the weights?)")


def model_from_checkpoint(weights_path, config, device=None, dtype=None):
    """A GPT holding the weights of a .safetensors file in either layout; config None: from the shapes."""
    ours = hf_to_our_state_dict(load_safetensors(weights_path), weights_path)
    if config is None:
        config = config_from_shapes(ours, weights_path)
    with torch.device("meta"):
        model = GPT(config)  # shapes only: no time spent on a random init we would overwrite
    expected = {n: t.shape for n, t in model.state_dict().items() if n != "lm_head.weight"}
    check_tensors_match(expected, ours, weights_path)
    ours["lm_head.weight"] = ours["transformer.wte.weight"]
    model.load_state_dict({n: t.contiguous() for n, t in ours.items()}, assign=True)
    model.transformer.wte.weight = model.lm_head.weight  # assign=True made two Parameters; tie them again
    return model.to(device=device or "cpu", dtype=dtype).eval()


def write_gpt2_checkpoint(model, directory):
    """config.json and model.safetensors in the hub's layout (chapter 4's first paragraph)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    c = model.config
    hf_config = {  # Hugging Face's GPT2Config names, so transformers opens the result too
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
        "n_positions": c.block_size, "n_ctx": c.block_size, "vocab_size": c.vocab_size,
        "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "bias": c.bias,
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
        "bos_token_id": 50256, "eos_token_id": 50256,
        "torch_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    save_safetensors(our_to_hf_state_dict(model.state_dict()), directory / "model.safetensors",
                     metadata={"format": "pt"})
    write_atomically(directory / "config.json", lambda tmp: tmp.write_text(json.dumps(hf_config, indent=2)))


# -----------------------------------------------------------------------------
# 5. The Hugging Face hub: reuse the standard cache, else download
#
# transformers and huggingface_hub keep downloads in $HF_HUB_CACHE, else $HF_HOME/hub, else
# $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub, laid out as
#   models--openai-community--gpt2/blobs/<etag>       the bytes, named by the hub's ETag
#   models--openai-community--gpt2/refs/main          a text file holding the commit sha
#   models--openai-community--gpt2/snapshots/<commit>/model.safetensors -> ../../blobs/<etag>
# (a relative symlink; a copy of the file where symlinks are not possible). People who
# used transformers' "gpt2" before the repo moved to openai-community/gpt2 have it under
# models--gpt2. HF_HUB_OFFLINE (or the legacy TRANSFORMERS_OFFLINE) is on when its value,
# upper-cased, is 1, ON, YES or TRUE.
#
# The hub serves {HF_ENDPOINT or https://huggingface.co}/{repo}/resolve/main/{filename}:
# - small files kept in git (config.json) answer 200 with the bytes; their ETag is the
#   git blob sha1 (40 hex) of the content, not a sha256;
# - large files (model.safetensors) answer 302 to a signed URL on a CDN host. The hub's
#   facts are only on that 302: X-Linked-Etag (the quoted sha256 of the content, 64 hex),
#   X-Linked-Size (bytes) and X-Repo-Commit. The CDN's answer has none of them, and its
#   own ETag is a different 64-hex value that must never be checked against the content;
# - a renamed repo answers with a relative redirect to its new path on the hub.
# urllib would follow redirects silently and lose the 302's headers, so they are followed
# by hand. A mirror (HF_ENDPOINT) may serve large files directly: 200 and a sha256 ETag.


def hub_cache_dir():
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "huggingface" / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def hub_offline():
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def repo_cache_dir(repo):
    return hub_cache_dir() / ("models--" + repo.replace("/", "--"))


def cached_snapshot(repo):
    """The snapshot folder holding model.safetensors, preferring the one refs/main names."""
    repo_dir = repo_cache_dir(repo)
    candidates = []
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        candidates.append(repo_dir / "snapshots" / ref.read_text().strip())
    if (repo_dir / "snapshots").is_dir():
        candidates += sorted((repo_dir / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for snapshot in candidates:
        if (snapshot / "model.safetensors").is_file():  # is_file follows the symlink: a dangling one fails
            return snapshot
    return None


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """Hand redirects back instead of following them, so their headers can be read."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def open_url(url, follow_redirects):
    opener = urllib.request.build_opener() if follow_redirects else urllib.request.build_opener(NoRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "dpo-reference/1.0"})
    try:
        return opener.open(request, timeout=30)
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400 and not follow_redirects:
            return e  # a redirect: its headers and Location are what we asked for
        raise


def ask_hub(url):
    """Follow the hub's own redirects (a renamed repo) by hand and collect what the hub
    states about the file; returns (the answer carrying the bytes, {sha256, etag, size, commit})."""
    stated = {}
    for _ in range(10):
        response = open_url(url, follow_redirects=False)
        h, is_redirect = response.headers, 300 <= response.code < 400
        # on a redirect, ETag and Content-Length describe the redirect, not the file
        for key, value in {"sha256": h.get("X-Linked-Etag"),
                           "etag": None if is_redirect else h.get("ETag"),
                           "size": h.get("X-Linked-Size") or (None if is_redirect else h.get("Content-Length")),
                           "commit": h.get("X-Repo-Commit")}.items():
            if value and key not in stated:
                stated[key] = value
        if not is_redirect:
            return response, stated
        location = urllib.parse.urljoin(url, h["Location"])
        response.close()
        if urllib.parse.urlsplit(location).netloc == urllib.parse.urlsplit(url).netloc:
            url = location  # still the hub: ask again, without following
            continue
        # the CDN: its Content-Length is still the size, but its ETag is its own hash, never the hub's
        cdn = open_url(location, follow_redirects=True)
        if "size" not in stated and cdn.headers.get("Content-Length"):
            stated["size"] = cdn.headers["Content-Length"]
        return cdn, stated
    raise RuntimeError(f"{url}: more than 10 redirects")


def stated_hash(stated, key, length):
    """A hex digest the hub stated, unquoted, or None when it stated none of that length."""
    value = (stated.get(key) or "").removeprefix("W/").strip('"').lower()
    return value if re.fullmatch(f"[0-9a-f]{{{length}}}", value) else None


def git_blob_sha1(path):
    """The hub names small files by their git blob id: sha1("blob <size>\\0" + bytes)."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def download_failed(url, filename, e):
    reason = getattr(e, "reason", None) or repr(e)
    return RuntimeError(f"could not download {url}: {reason}; nothing was kept. Check the network (or "
                        f"HF_ENDPOINT) and run again, or download {filename} yourself and pass "
                        "--weights path/to/model.safetensors")


def cache_unwritable(where, e):
    return RuntimeError(f"cannot write to the Hugging Face cache at {where} ({e.strerror or e}); point "
                        "HF_HUB_CACHE or HF_HOME at a folder you can write to (and with space to spare)")


def stream_to_file(response, f, url, filename, expected_size):
    """Copy the body to f with a progress line; returns (bytes written, sha256 hex)."""
    sha256, done, start, last_print = hashlib.sha256(), 0, time.time(), 0.0
    while True:
        try:
            chunk = response.read(1 << 20)
        except (OSError, http.client.HTTPException) as e:  # e.g. a timeout, or a connection cut mid-answer
            raise download_failed(url, filename, e) from None
        if not chunk:
            break
        f.write(chunk)
        sha256.update(chunk)
        done += len(chunk)
        now = time.time()
        if now - last_print > 0.5 or done == expected_size:
            total = f" / {expected_size / 1e6:.1f}" if expected_size else ""
            rate = done / 1e6 / max(now - start, 1e-9)
            print(f"\r  {filename}: {done / 1e6:.1f}{total} MB ({rate:.1f} MB/s)", end="", file=sys.stderr, flush=True)
            last_print = now
    print(file=sys.stderr)
    return done, sha256.hexdigest()


def link_or_move(blob, link):
    """link -> ../../blobs/<blob>, relative, as huggingface_hub makes them."""
    try:
        link.symlink_to(Path("..") / ".." / "blobs" / blob.name)
    except OSError:  # no symlinks here (some Windows setups): keep the bytes in the snapshot instead
        os.replace(blob, link)


def download_to_cache(repo, filename):
    """Download one file of `repo` into the hub cache, verified; returns the commit sha.

    The blob is named, as huggingface_hub names it, by the hash the hub states (the sha256
    of a large file, the git blob sha1 of a small one), and write_atomically puts it there
    only once its size and that hash check out. A hub that states no hash gets the file
    straight into the snapshot, checked by its size alone."""
    url = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/{repo}/resolve/main/{filename}"
    repo_dir = repo_cache_dir(repo)
    try:
        (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cache_unwritable(repo_dir, e) from None
    print(f"downloading {url}", file=sys.stderr)
    try:
        response, stated = ask_hub(url)
    except (OSError, http.client.HTTPException) as e:  # URLError, refused connections and timeouts are OSErrors
        raise download_failed(url, filename, e) from None
    commit = stated.get("commit") or "main"
    size = int(stated["size"]) if "size" in stated else None
    # a plain ETag is git's blob id for small files, or a sha256 where a mirror serves large
    # files directly (never the CDN's ETag: ask_hub does not record it)
    sha256 = stated_hash(stated, "sha256", 64) or stated_hash(stated, "etag", 64)
    sha1 = None if sha256 else stated_hash(stated, "etag", 40)

    def download_and_check(tmp):
        with open(tmp, "wb") as f:
            done, got_sha256 = stream_to_file(response, f, url, filename, size)
        if size is not None and done != size:
            raise RuntimeError(f"download of {url} stopped after {done} of {size} bytes (connection dropped?); "
                               "nothing was kept, run again to retry")
        if sha256 and got_sha256 != sha256:
            raise RuntimeError(f"download of {url} is corrupt: its sha256 is {got_sha256} but the hub says "
                               f"{sha256}; nothing was kept, run again to retry")
        if sha1 and git_blob_sha1(tmp) != sha1:
            raise RuntimeError(f"download of {url} is corrupt: its git blob sha1 is not the hub's "
                               f"{sha1}; nothing was kept, run again to retry")

    snapshot_file = repo_dir / "snapshots" / commit / filename
    target = repo_dir / "blobs" / (sha256 or sha1) if (sha256 or sha1) else snapshot_file
    try:
        with response:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(target, download_and_check)
        if target != snapshot_file:  # a blob: the snapshot links to it
            snapshot_file.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(snapshot_file, lambda tmp: link_or_move(target, tmp))
        (repo_dir / "refs").mkdir(exist_ok=True)
        write_atomically(repo_dir / "refs" / "main", lambda tmp: tmp.write_text(commit))
    except OSError as e:  # network errors were turned into RuntimeErrors: this is the disk
        raise cache_unwritable(repo_dir, e) from None
    return commit


def gpt2_snapshot(name):
    """A local snapshot folder for GPT-2 `name`: from the cache, else downloaded into it."""
    repo = "openai-community/" + name
    for cached_repo in (repo, name):  # name alone: the cache of the repo's old name, e.g. models--gpt2
        snapshot = cached_snapshot(cached_repo)
        if snapshot is not None:
            return snapshot
    where = repo_cache_dir(repo) / "snapshots" / "<commit>" / "model.safetensors"
    if hub_offline():
        raise FileNotFoundError(
            f"{name} is not in the Hugging Face cache and HF_HUB_OFFLINE is set, so it will not be downloaded. "
            f"Put the file at {where} (with refs/main naming <commit>), or pass --weights path/to/model.safetensors")
    # the weights first: if they fail, nothing is left in the cache
    commit = download_to_cache(repo, "model.safetensors")
    try:
        download_to_cache(repo, "config.json")
    except RuntimeError as e:  # the weights are safe; GPT2_MODELS knows the config
        print(f"warning: {e}; using the known {name} config instead", file=sys.stderr)
    return repo_cache_dir(repo) / "snapshots" / commit


# -----------------------------------------------------------------------------
# 6. from_pretrained, put together: a name is found in the cache or downloaded (chapter 5),
# a path is used as it is; then config.json if there is one, and the tensors (chapter 4).


def local_weights_path(name_or_path):
    """The model.safetensors that a local file or directory argument names."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{name_or_path!r} is neither one of {', '.join(GPT2_MODELS)} nor an existing "
                                ".safetensors file or directory")
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path} holds no model.safetensors (a Hugging Face GPT-2 snapshot "
                                "directory has one); pass the .safetensors file itself instead")
    return path / "model.safetensors"


def load_gpt2_checkpoint(name_or_path, device=None, dtype=None):
    name = str(name_or_path).removeprefix("openai-community/")
    if name in GPT2_MODELS and not Path(name_or_path).exists():
        # a hub snapshot without config.json can only be the named size
        weights, config = gpt2_snapshot(name) / "model.safetensors", GPTConfig(**GPT2_MODELS[name])
    else:
        weights, config = local_weights_path(name_or_path), None  # None: read the sizes off the tensors
    config_path = weights.parent / "config.json"
    if config_path.exists():
        config = config_from_hf_json(config_path)
    return model_from_checkpoint(weights, config, device, dtype)
