"""
GPT-2 in one file, in the style of nanoGPT, able to load the real GPT-2 weights.

The network is GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners", Section 2.3): pre-LayerNorm (Ba et al. 2016) transformer blocks (the block itself
is Vaswani et al. 2017; Eq. 1 for attention), learned position embeddings, the tanh
approximation of GELU (Hendrycks & Gimpel 2016), and an output head tied to the token
embedding (Press & Wolf 2017). It is written in the order data meets it: attention, MLP,
block, config, GPT. GPT.generate keeps a key/value cache (every layer's keys and values of
the positions so far), so that a new token costs one position's work.

After the network: the explicit mapping to and from GPT-2's checkpoints in the Hugging Face layout.
The bytes themselves (.safetensors, config.json, the hub and its cache) are checkpoint.py's business.

References: nanoGPT (Karpathy), picoGPT (Mody), Hugging Face's GPT-2 checkpoints.
Read next: dpo.py, which turns this model's logits into DPO's log-probabilities.
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

import checkpoint

# -----------------------------------------------------------------------------
# The network


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        # query, key and value for all heads in one matrix, as GPT-2 stores them
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            # generation's key/value cache (see GPT.forward): a position's key and value depend only on the
            # tokens up to it, so they never change once computed; keep them, compute only the new positions'
            if cache:
                k, v = torch.cat((cache["k"], k), dim=2), torch.cat((cache["v"], v), dim=2)  # (B, nh, T_seen, hs)
            cache["k"], cache["v"] = k, v
        # softmax(q k^T / sqrt(hs)) v (Vaswani et al. 2017, Eq. 1), with a causal mask when the queries are all
        # the positions there are; one new token after the cached ones is the last position, and sees them all.
        # The fused kernel never materialises the (T, T) mask that GPT-2 checkpoints carry.
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=k.size(2) == T)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
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

    def forward(self, x, cache=None):
        # pre-LayerNorm residual blocks (GPT-2 paper, Section 2.3)
        x = x + self.attn(self.ln_1(x), cache)
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


# The four published sizes (GPT-2 paper, Table 2); all have GPTConfig's vocab_size and block_size.
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
        # weight tying (Press & Wolf 2017), as in GPT-2: one Parameter, two uses, and autograd adds their gradients
        self.transformer.wte.weight = self.lm_head.weight
        # GPT-2's initialisation, with residual projections scaled by 1/sqrt(2 n_layer)
        # (GPT-2 paper, Section 2.3); only used when not loading weights
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def forward(self, idx, logits_at=None, cache=None):
        """Logits (B, T, vocab_size) for token ids idx (B, T); with logits_at, a (B, T) bool mask, only at
        those positions: (N, vocab_size), N = logits_at.sum(), in row-major order. DPO needs logits only for
        a completion's tokens, and the output head is about a third of GPT-2 small's compute.

        cache, for generation: one dict per layer, empty at first (new_cache()), in which each layer's
        attention keeps the keys and values, "k" and "v" (B, nh, T_seen, hs), of every position it has seen.
        idx then continues those positions: a prompt into an empty cache, then one token at a time."""
        B, T = idx.size()
        past = cache[0]["k"].size(2) if cache and cache[0] else 0  # positions already in the cache
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of length {past + T} is longer than the model's context "
                             f"(block_size {self.config.block_size}); shorten the prompt or completion")
        if past and T > 1:
            raise ValueError(f"{T} tokens after {past} cached positions: after the prompt, a cache takes one token "
                             "at a time (only the last position may see every cached one without a mask)")
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,): after the cached ones
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C)
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache[i])
        x = self.transformer.ln_f(x)  # (B, T, C)
        if logits_at is not None:
            x = x[logits_at]  # (N, C)
        return self.lm_head(x)  # (B, T, vocab_size), or (N, vocab_size)

    def new_cache(self):
        """An empty key/value cache for forward: one dict per layer."""
        return [{} for _ in self.transformer.h]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, stop=None, generator=None):
        """Continue idx (B, T) by max_new_tokens tokens; temperature 0 is greedy. stop, if given, is called
        with the (B, n) tokens generated so far after each new one, and returning True ends generation there
        (at <|endoftext|>, say); generator, a torch.Generator, makes sampling repeatable."""
        n_prompt, cache = idx.size(1), None
        for _ in range(max_new_tokens):
            if cache is None or idx.size(1) > self.config.block_size:
                # the prompt, or a window that slides: positions are absolute, so once the first token drops out
                # every key and value changes and the last block_size tokens are computed afresh, a step each
                cache, idx_cond = self.new_cache(), idx[:, -self.config.block_size:]
            else:
                idx_cond = idx[:, -1:]  # the tokens before it are in the cache
            last = torch.zeros(idx_cond.shape, dtype=torch.bool, device=idx.device)
            last[:, -1] = True  # only the last position predicts the next token: the head runs there alone
            logits = self(idx_cond, logits_at=last, cache=cache)  # (B, vocab_size)
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
            if stop is not None and stop(idx[:, n_prompt:]):
                break
        return idx

    @classmethod
    def from_pretrained(cls, name_or_path, device=None, dtype=None):
        """A GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, optionally with the hub's "openai-community/"
        in front), found in the Hugging Face cache or downloaded into it; or a local .safetensors file, or a
        folder holding model.safetensors. A config.json beside the weights gives the sizes, else the tensors."""
        name = str(name_or_path).removeprefix("openai-community/")
        config = None
        if name in GPT2_MODELS and not Path(name_or_path).exists():
            weights = checkpoint.hub_snapshot("openai-community/" + name, also_cached_as=(name,)) / "model.safetensors"
            config = GPTConfig(**GPT2_MODELS[name])  # in case the hub's config.json could not be fetched
        else:
            weights = local_weights(Path(name_or_path))
        if (weights.parent / "config.json").exists():
            config = config_from_hf(weights.parent / "config.json")
        tensors = hf_to_ours(checkpoint.load_safetensors(weights), weights)
        with torch.device("meta"):
            model = GPT(config or config_from_shapes(tensors, weights))  # shapes only: no random init to overwrite
        check_tensors_match({n: t.shape for n, t in model.state_dict().items() if n != "lm_head.weight"},
                            tensors, weights)
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"]  # tied: hf_to_ours dropped any head equal to it
        model.load_state_dict({n: t.contiguous() for n, t in tensors.items()}, assign=True)
        model.transformer.wte.weight = model.lm_head.weight  # assign=True made two Parameters; tie them again
        return model.to(device=device or "cpu", dtype=dtype).eval()

    def save_pretrained(self, directory):
        """config.json and model.safetensors in the hub's layout, each written atomically, and,
        with GPT-2's vocabulary, its tokenizer's files: transformers' Auto classes open the folder."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        checkpoint.save_safetensors(hf_state_dict(self), directory / "model.safetensors", metadata={"format": "pt"})
        checkpoint.save_json(hf_config(self.config, next(self.parameters()).dtype), directory / "config.json")
        if self.config.vocab_size == 50257:
            checkpoint.save_gpt2_tokenizer(directory)


# -----------------------------------------------------------------------------
# GPT-2's checkpoints in the Hugging Face layout
#
# The hub's openai-community/gpt2/model.safetensors (548,105,171 bytes, all F32) holds 160 tensors with no
# "transformer." prefix: wte.weight, wpe.weight, h.{i}.ln_1.*, h.{i}.attn.c_attn.*, h.{i}.attn.c_proj.*,
# h.{i}.ln_2.*, h.{i}.mlp.c_fc.*, h.{i}.mlp.c_proj.*, ln_f.* (148 parameters, 124,439,808 numbers), plus 12
# causal-mask buffers h.{i}.attn.bias of shape [1, 1, 1024, 1024], which scaled_dot_product_attention does
# not need. There is no lm_head.weight: the head is tied to wte.
# OpenAI's Conv1D modules store their four weights (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) as
# (in, out), e.g. c_attn.weight is [768, 2304]: the transpose of nn.Linear's (out, in). Nothing else is.
# transformers' save_pretrained writes the second real layout: the same tensors with a "transformer." prefix,
# and no mask buffers. Both load; save_pretrained here writes the hub's.
# config.json gives n_layer, n_head, n_embd, n_positions and vocab_size. Every GPT-2 has activation_function
# "gelu_new" (the tanh GELU), layer_norm_epsilon 1e-5 and no n_inner (an MLP of 4 x n_embd); this model
# hard-codes them, so a config.json saying otherwise is refused.

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # fullmatch: h.{i}.attn.c_attn.bias is a parameter


def hf_to_ours(hf_tensors, path):
    """Hugging Face GPT-2 tensors, either layout, renamed and transposed into this file's names."""
    ours = {}
    for hf_name, t in hf_tensors.items():
        name = hf_name.removeprefix("transformer.")
        if MASK_BUFFER.fullmatch(name) or name == "lm_head.weight":
            continue  # the mask is not needed; the head is wte (checked below)
        ours["transformer." + name] = t.t() if name.endswith(CONV1D_WEIGHTS) else t
    head, wte = hf_tensors.get("lm_head.weight"), ours.get("transformer.wte.weight")
    if head is not None and wte is not None and not torch.equal(head, wte):
        raise ValueError(f"{path}: lm_head.weight differs from wte.weight, but this GPT ties them "
                         "(as GPT-2 does); an untied checkpoint cannot be loaded here")
    return ours


def hf_state_dict(model):
    """The inverse, for saving: the hub's names, no lm_head (tied), Conv1D weights as (in, out)."""
    hf = {n.removeprefix("transformer."): t for n, t in model.state_dict().items() if n != "lm_head.weight"}
    return {n: (t.t() if n.endswith(CONV1D_WEIGHTS) else t).contiguous() for n, t in hf.items()}


def hf_config(config, dtype):
    """Hugging Face's GPT2Config for a GPTConfig, so that transformers opens what we save."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
            "n_positions": config.block_size, "n_ctx": config.block_size, "vocab_size": config.vocab_size,
            "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "bias": config.bias,
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "bos_token_id": 50256, "eos_token_id": 50256, "torch_dtype": str(dtype).removeprefix("torch.")}


def config_from_hf(config_path):
    """GPTConfig from a config.json, refusing what this model cannot compute."""
    try:
        hf = checkpoint.load_json(config_path)
    except ValueError as e:
        raise ValueError(f"{e}; delete it to read the sizes off the weights") from None
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{config_path}: activation_function {activation!r} is not GPT-2's tanh GELU "
                         "('gelu_new'), which is the only one this model implements")
    if hf.get("layer_norm_epsilon", 1e-5) != 1e-5:
        raise ValueError(f"{config_path}: layer_norm_epsilon {hf['layer_norm_epsilon']} is not GPT-2's 1e-5, "
                         "which this model hard-codes")
    if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 0)):
        raise ValueError(f"{config_path}: n_inner {hf['n_inner']} is not GPT-2's 4 x n_embd, which this model "
                         "hard-codes")
    try:
        return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                         n_head=hf["n_head"], n_embd=hf["n_embd"], bias=hf.get("bias", True))
    except KeyError as e:
        raise ValueError(f"{config_path}: GPT-2 config.json has no {e.args[0]!r}") from None


def config_from_shapes(ours, path):
    """Without config.json, the sizes from the tensors. The number of heads is the one thing
    shapes cannot say, so only GPT-2's four widths are accepted."""
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
    listing = lambda names: ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    if missing := [n for n in expected_shapes if n not in tensors]:
        raise ValueError(f"{path}: missing tensor(s) {listing(missing)} (names as in this model; "
                         "is this a GPT-2 checkpoint of the configured size?)")
    if unexpected := [n for n in tensors if n not in expected_shapes]:
        raise ValueError(f"{path}: unexpected tensor(s) {listing(unexpected)} that this GPT-2 does not have")
    for name, shape in expected_shapes.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(f"{path}: tensor '{name}' has shape {tuple(tensors[name].shape)} in the file "
                             f"but the model expects {tuple(shape)} (does config.json match the weights?)")


def local_weights(path):
    """The model.safetensors that a local file or folder argument names."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is neither one of {', '.join(GPT2_MODELS)} nor an existing "
                                ".safetensors file or folder")
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path} holds no model.safetensors (a Hugging Face GPT-2 snapshot folder "
                                "has one); pass the .safetensors file itself instead")
    return path / "model.safetensors"
