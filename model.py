"""
GPT-2 in one file, in the style of nanoGPT, able to load the real GPT-2 weights.

What is here, in reading order:
1. The network: causal self-attention, MLP, block, the tied embedding (one matrix
   for the token lookup and the output head, and one gradient buffer for it), config,
   model. Pre-LayerNorm transformer blocks, learned position embeddings, the tanh
   approximation of GELU, and an output head tied to the token embedding, exactly as
   GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners",
   Section 2.3; the block itself is Vaswani et al. 2017, Eq. 1 for attention).
2. The .safetensors file format, read and written by hand (8-byte little-endian
   header length, a JSON header, then raw little-endian tensor bytes), so that
   loading needs nothing but torch and the standard library and never unpickles.
3. The Hugging Face GPT-2 checkpoint layout: the key names, the Conv1D weights
   stored (in, out) that nn.Linear wants transposed, the causal-mask buffers
   to ignore.
4. The Hugging Face hub: find a copy already in the standard cache, or download
   one with urllib, checking its size and sha256 before anything is kept.

References: nanoGPT (Karpathy), picoGPT (Mody), the safetensors format spec,
and ../shared/GPT2_CHECKPOINT.md for the facts about the real files.
Read next: dpo.py, which turns this model's logits into DPO's log-probabilities.
"""

import errno
import hashlib
import http.client
import json
import math
import os
import re
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

# Same inputs, same numbers, in every process. On Intel CPUs PyTorch's matrix products go
# through MKL, which now and then takes a different code path in a new process: 2 of about
# 30 separate runs of `python train_toy.py --model tiny` here ended 0.01 nats away from the
# others. MKL's conditional numerical reproducibility mode, strict, always takes the same
# path (23 of 23 runs agreed, at no cost in speed that bench.py could see). MKL reads the
# setting at its first matrix product, so it is set here, on import; a value the user set
# is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

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


class TiedEmbedding(torch.autograd.Function):
    """GPT-2's token lookup and output head share one matrix W (vocab_size, n_embd).

    apply(W, idx) returns the lookup W[idx] (B, T, C) and W (a view of it) for the head.
    Left to itself, autograd gives each use its own vocab x n_embd gradient buffer and
    adds them, so at the end of every backward pass it holds two of them (154 MB each for
    GPT-2 small). Here backward runs once both gradients are in, and adds the lookup's rows
    into the head's gradient in place: one buffer. On the CPU the sums are bit for bit
    autograd's, since the rows are what F.embedding's backward computes and a + b == b + a
    in floating point (a test checks this).

    The head's gradient is written into, so the head must go straight into a matrix
    product, as in GPT.forward: the product's backward makes that gradient a new buffer
    that nothing else holds. The backward pass is not itself differentiable (no second
    derivatives through it): asked for one, PyTorch raises an error rather than give a
    wrong one."""

    @staticmethod
    def forward(weight, idx):
        return F.embedding(idx, weight), weight.view_as(weight)

    @staticmethod
    def setup_context(ctx, inputs, output):  # forward and setup_context apart: torch.func works too
        ctx.save_for_backward(inputs[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lookup, grad_head):
        (idx,) = ctx.saved_tensors
        # the lookup's gradient for the distinct tokens only, (U, C), with the kernel that
        # F.embedding's backward uses. A plain index_add_ of every token's row would add a
        # repeated token's rows in a varying order on CUDA (atomic adds). torch.unique has
        # to tell the host U, which makes the host wait for the GPU once per backward pass.
        tokens, where = torch.unique(idx, return_inverse=True)  # (U,), and idx's entries as 0..U-1
        rows = torch.ops.aten.embedding_dense_backward(grad_lookup, where, tokens.numel(), -1, False)
        return grad_head.index_add_(0, tokens, rows), None  # distinct rows: each gets one addition


@dataclass
class GPTConfig:
    block_size: int = 1024  # the context length, n_positions in Hugging Face's config
    vocab_size: int = 50257  # GPT-2's BPE vocabulary
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # off by default: DPO needs deterministic log-probs
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm


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
        # weight tying (Press & Wolf 2017): GPT-2 scores tokens with its own
        # embedding matrix, so its checkpoints hold no separate head
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
        if self.lm_head.weight is not self.transformer.wte.weight:
            raise ValueError(
                "lm_head.weight is no longer the token embedding's matrix (GPT-2 ties them, and "
                "this forward pass uses wte's for both); tie them again with "
                "model.lm_head.weight = model.transformer.wte.weight"
            )
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        # one matrix for the lookup and the head, with one gradient buffer (TiedEmbedding);
        # lm_head and wte only hold it: their own forward, and hooks on them, never run
        tok_emb, head = TiedEmbedding.apply(self.transformer.wte.weight, idx)  # (B, T, C), (vocab_size, C)
        x = self.transformer.drop(tok_emb + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if logits_at is not None:
            x = x[logits_at]  # (N, C)
        return x @ head.t()  # (B, T, vocab_size), or (N, vocab_size)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Continue idx (B, T) by max_new_tokens tokens; temperature 0 is greedy."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]  # the context window slides
            logits = self(idx_cond)[:, -1, :]  # (B, vocab_size): only the last position predicts the next token
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
        """A GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a .safetensors file,
        or a directory holding model.safetensors (and config.json). See Section 3."""
        return load_gpt2_checkpoint(name_or_path, device=device, dtype=dtype)

    def save_pretrained(self, directory):
        """Write config.json and model.safetensors in the Hugging Face GPT-2 layout."""
        write_gpt2_checkpoint(self, directory)


def mps_is_available():
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu; a device asked for by name must exist."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but this torch sees no CUDA GPU (a CPU-only build, or no driver)")
    if name == "mps" and not mps_is_available():
        raise RuntimeError("device 'mps' asked for, but MPS (Apple GPU) is not available here")
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if mps_is_available():
        return torch.device("mps")
    return torch.device("cpu")


# -----------------------------------------------------------------------------
# 2. The .safetensors format, by hand
#
# [8 bytes: N, little-endian u64][N bytes: JSON header][data bytes]
# The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]},
# offsets relative to the start of the data, plus an optional "__metadata__" of strings.

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
    # with no gaps and no overlaps, and the data ends where the file ends
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
        raise bad(f"the tensors cover {expected_begin} bytes of data but the file holds {data_size}")
    return entries, metadata, 8 + n


def load_safetensors(path):
    """Read a .safetensors file into a dict of CPU tensors. Never unpickles anything."""
    path = Path(path)
    tensors = {}
    with open(path, "rb") as f:
        entries, _, data_start = read_safetensors_header(f, path, os.fstat(f.fileno()).st_size)
        for begin, end, name, dtype, shape in entries:
            # read straight into a fresh (aligned) tensor: the data of real GPT-2 files
            # starts at an odd offset, so viewing the file's bytes in place would be unaligned
            t = torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype])
            f.seek(data_start + begin)
            if f.readinto(t.view(-1).view(torch.uint8).numpy()) != end - begin:
                raise ValueError(f"{path}: tensor '{name}' is cut short (truncated file?)")
            tensors[name] = t
    return tensors


def give_usual_permissions(path):
    """mkstemp makes files only their owner can read; give the mode open() would have."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_atomically(path, write):
    """Call write(f) on a temporary file beside path, then rename it into place, so an
    interrupted write never leaves a half-written file under the real name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        give_usual_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_safetensors(tensors, path, metadata=None):
    """Write a dict of tensors as a .safetensors file (atomically: temp file + rename)."""
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
    header_bytes += b" " * (-len(header_bytes) % 8)  # pad so the data starts 8-byte aligned

    def write(f):
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for t in tensors.values():
            f.write(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy())  # no extra copy

    write_atomically(path, write)


# -----------------------------------------------------------------------------
# 3. The Hugging Face GPT-2 checkpoint layout
#
# The hub's files name tensors "wte.weight", "h.0.attn.c_attn.weight", ... (files
# written by transformers add a "transformer." prefix). Our names are the same
# with the prefix. OpenAI's Conv1D modules store their weights (in, out), the
# transpose of nn.Linear's (out, in); nothing else is transposed. "h.{i}.attn.bias"
# is a causal-mask buffer (not to be confused with the parameter
# "h.{i}.attn.c_attn.bias"); our attention builds its mask on the fly.

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")

GPT2_MODELS = {  # GPT-2 paper, Table 2; all with vocab 50257 and a 1024-token context
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


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
    ours = hf_to_our_state_dict(load_safetensors(weights_path), weights_path)
    if config is None:
        config = config_from_shapes(ours, weights_path)
    with torch.device("meta"):
        model = GPT(config)  # shapes only: no time spent on a random init we would overwrite
    expected = {n: t.shape for n, t in model.state_dict().items() if n != "lm_head.weight"}
    check_tensors_match(expected, ours, weights_path)
    ours["lm_head.weight"] = ours["transformer.wte.weight"]
    model.load_state_dict({n: t.contiguous() for n, t in ours.items()}, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True made two Parameters; tie them again
    return model.to(device=device or "cpu", dtype=dtype).eval()


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


def write_gpt2_checkpoint(model, directory):
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
    write_atomically(directory / "config.json", lambda f: f.write(json.dumps(hf_config, indent=2).encode()))


# -----------------------------------------------------------------------------
# 4. The Hugging Face hub: reuse the standard cache, else download
#
# Cache layout shared with transformers / huggingface_hub:
#   models--openai-community--gpt2/blobs/<etag>       the bytes
#   models--openai-community--gpt2/refs/main          the commit sha
#   models--openai-community--gpt2/snapshots/<commit>/model.safetensors -> ../../blobs/<etag>

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
    candidates += sorted((repo_dir / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True) \
        if (repo_dir / "snapshots").is_dir() else []
    for snapshot in candidates:
        if (snapshot / "model.safetensors").is_file():  # is_file follows the symlink: a dangling one fails
            return snapshot
    return None


def gpt2_snapshot(name):
    """A local snapshot folder for GPT-2 `name`: from the cache, else downloaded into it."""
    repo = "openai-community/" + name
    # transformers users who asked for plain "gpt2" have it cached under the old repo name
    for cached_repo in (repo, name):
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


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """The hub's own headers (sha256, size, commit) are only on its redirect, not
    on the CDN's answer it points to, so redirects are followed by hand."""

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
    says about the file; returns (the answer carrying the bytes, {etag, size, commit})."""
    expected = {}
    for _ in range(10):
        response = open_url(url, follow_redirects=False)
        h, is_redirect = response.headers, 300 <= response.code < 400
        # on a redirect, ETag and Content-Length describe the redirect, not the file
        stated = {"sha256": h.get("X-Linked-Etag"),
                  "etag": None if is_redirect else h.get("ETag"),
                  "size": h.get("X-Linked-Size") or (None if is_redirect else h.get("Content-Length")),
                  "commit": h.get("X-Repo-Commit")}
        for key, value in stated.items():
            if value and key not in expected:
                expected[key] = value
        if not is_redirect:
            return response, expected
        location = urllib.parse.urljoin(url, h["Location"])
        response.close()
        if urllib.parse.urlsplit(location).netloc == urllib.parse.urlsplit(url).netloc:
            url = location  # still the hub: ask again, without following
            continue
        # the CDN: its Content-Length is still the size, but its ETag is its own hash, never the hub's
        cdn = open_url(location, follow_redirects=True)
        if "size" not in expected and cdn.headers.get("Content-Length"):
            expected["size"] = cdn.headers["Content-Length"]
        return cdn, expected
    raise RuntimeError(f"{url}: more than 10 redirects")


def git_blob_sha1(path):
    """The hub names small files by their git blob id: sha1("blob <size>\\0" + bytes)."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def stream_to_file(response, f, label, expected_size):
    """Copy the body to f with a progress line; returns (bytes written, sha256 hex)."""
    sha256, done, start, last_print = hashlib.sha256(), 0, time.time(), 0.0
    while chunk := response.read(1 << 20):
        f.write(chunk)
        sha256.update(chunk)
        done += len(chunk)
        now = time.time()
        if now - last_print > 0.5 or done == expected_size:
            total = f" / {expected_size / 1e6:.1f}" if expected_size else ""
            rate = done / 1e6 / max(now - start, 1e-9)
            print(f"\r  {label}: {done / 1e6:.1f}{total} MB ({rate:.1f} MB/s)", end="", file=sys.stderr, flush=True)
            last_print = now
    print(file=sys.stderr)
    return done, sha256.hexdigest()


def fetch(url, f, filename, path):
    """Stream url's file into f (open on path); returns (what the hub stated about it,
    bytes written, sha256)."""
    try:
        response, expected = ask_hub(url)
        with response:
            size = int(expected["size"]) if "size" in expected else None
            done, sha256 = stream_to_file(response, f, filename, size)
        return expected, done, sha256
    except OSError as e:  # URLError, timeouts and refused connections are OSErrors too
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RuntimeError(f"could not write the download of {url} to {path}: {e}") from None
        raise RuntimeError(
            f"could not download {url}: {getattr(e, 'reason', None) or e!r}. Check the network "
            f"(or HF_ENDPOINT), or download {filename} yourself and pass "
            "--weights path/to/model.safetensors") from None
    except http.client.HTTPException as e:  # e.g. IncompleteRead, a connection cut mid-answer
        raise RuntimeError(f"could not download {url}: {e!r}; nothing was kept, run again to retry") from None


def stated_hash(expected, key, length):
    """A hex digest the hub stated, unquoted, or None when it stated none of that length."""
    value = (expected.get(key) or "").removeprefix("W/").strip('"').lower()
    return value if re.fullmatch(f"[0-9a-f]{{{length}}}", value) else None


def verified_blob_name(url, path, done, sha256, expected):
    """Check the downloaded file against the hub's size and hash; returns the name
    huggingface_hub gives its blob (the sha256 for large files, git's id for small ones)."""
    size = expected.get("size")
    # the hub's X-Linked-Etag is a sha256; a plain ETag on the hub's own 200 is git's blob id
    # for small files, or a sha256 where a mirror serves large files directly (never the
    # CDN's ETag: ask_hub does not record it)
    linked_sha256 = stated_hash(expected, "sha256", 64) or stated_hash(expected, "etag", 64)
    git_sha1 = None if linked_sha256 else stated_hash(expected, "etag", 40)
    if size is not None and done != int(size):
        raise RuntimeError(f"download of {url} stopped after {done} of {size} bytes (connection dropped?); "
                           "nothing was kept, run again to retry")
    if linked_sha256 and sha256 != linked_sha256:
        raise RuntimeError(f"download of {url} is corrupt: its sha256 is {sha256} but the hub says "
                           f"{linked_sha256}; nothing was kept, run again to retry")
    if git_sha1 and git_blob_sha1(path) != git_sha1:
        raise RuntimeError(f"download of {url} is corrupt: its git blob sha1 is not the hub's "
                           f"{git_sha1}; nothing was kept, run again to retry")
    return linked_sha256 or git_sha1 or sha256


def link_into_snapshot(repo_dir, filename, blob, commit):
    """snapshots/<commit>/<filename> -> ../../blobs/<blob>, and refs/main -> commit."""
    link = repo_dir / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    try:
        link.symlink_to(Path("..") / ".." / "blobs" / blob.name)  # relative, as huggingface_hub makes them
    except OSError:  # no symlinks here (some Windows setups): keep the bytes in the snapshot instead
        os.replace(blob, link)
    (repo_dir / "refs").mkdir(exist_ok=True)
    write_atomically(repo_dir / "refs" / "main", lambda f: f.write(commit.encode()))


def download_to_cache(repo, filename):
    """Download one file of `repo` into the hub cache, verified; returns the commit sha.
    The bytes go to a temporary file that is renamed only once size and hash check out."""
    url = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/{repo}/resolve/main/{filename}"
    blobs = repo_cache_dir(repo) / "blobs"
    try:
        blobs.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=blobs, suffix=".incomplete")
    except OSError as e:
        raise RuntimeError(f"cannot write to the Hugging Face cache at {blobs} ({e.strerror}); point "
                           "HF_HUB_CACHE or HF_HOME at a folder you can write to") from None
    print(f"downloading {url}", file=sys.stderr)
    try:
        with os.fdopen(fd, "wb") as f:
            expected, done, sha256 = fetch(url, f, filename, tmp)
        blob = blobs / verified_blob_name(url, tmp, done, sha256, expected)
        give_usual_permissions(tmp)
        os.replace(tmp, blob)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    commit = expected.get("commit") or "main"
    link_into_snapshot(repo_cache_dir(repo), filename, blob, commit)
    return commit
