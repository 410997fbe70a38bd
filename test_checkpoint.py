"""
The bytes, proven: checkpoint.py and model.py's loading and saving, against files written by
hand here, folders compared to the byte, and a fake hub on 127.0.0.1.

    python -m pytest test_checkpoint.py

What the tests check against is written here, not taken from the code under test:
- `write_safetensors` / `read_safetensors`, a tiny safetensors writer and reader
  (format: 8-byte little-endian header length N, N bytes of JSON, then raw data);
- `write_checkpoint`, GPT-2 checkpoints in the hub's layout and in transformers' (model.py
  states both), whose logits test_dpo.py's numpy GPT-2 computes on its own;
- `tree`, a whole folder read back from the disk, to compare before and after to the byte;
- `FakeHub`, an HTTP server that answers like huggingface.co (a 302 to a CDN for
  model.safetensors, with the sha256 only in X-Linked-Etag; a 200 with a git-sha1 ETag
  for config.json), as checkpoint.py, section 3, says the real one does.
A few checks run only where Hugging Face's transformers and safetensors packages are
installed (cross-checks; never needed), and one only on a CUDA GPU.
"""

import contextlib
import errno
import gzip
import hashlib
import http.server
import json
import os
import pickle
import re
import socket
import struct
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
from checkpoint import SAFETENSORS_DTYPES, hub_cache_dir, load_safetensors, save_safetensors, write_atomically
from model import GPT
from test_dpo import (TINY, TINY_CONFIG, assert_matches_numpy, gpt2_tokenizer, hub_config, model_logits, needs_cuda,
                      numpy_greedy, numpy_logits, random_gpt2_params, random_tokens, tiny)  # noqa: F401 (tiny: a fixture)


# ---------------------------------------------------------------------------
# A test-side safetensors writer and reader (struct + json only).

ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
             "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NP_TO_ST = {np.dtype(v): k for k, v in ST_DTYPES.items()}


def safetensors_bytes(header, data, align=False):
    """A safetensors file: 8-byte little-endian length N, N bytes of JSON header, then data."""
    text = json.dumps(header, separators=(",", ":")).encode()
    if align:  # what transformers' writer does: pad with spaces so the data is 8-byte aligned
        text += b" " * (-len(text) % 8)
    elif len(text) % 8 == 0:  # like the hub's gpt2 file, whose data starts at byte 14,291
        text += b" "
    assert (len(text) % 8 == 0) == align
    return struct.pack("<Q", len(text)) + text + data


def write_safetensors(path, arrays, align=False):
    """Write numpy arrays back to back, in dict order, with {"format": "pt"} metadata."""
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, a in arrays.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": NP_TO_ST[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    Path(path).write_bytes(safetensors_bytes(header, b"".join(chunks), align))


def bf16_to_float32(raw):
    """BF16 is the top half of a float32's bits."""
    return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path):
    """Return (header, {name: np.ndarray}); BF16 is widened to float32."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    arrays = {}
    for name, info in header.items():
        if name != "__metadata__":
            begin, end = info["data_offsets"]
            a = (bf16_to_float32(data[begin:end]) if info["dtype"] == "BF16"
                 else np.frombuffer(data[begin:end], ST_DTYPES[info["dtype"]]))
            arrays[name] = a.reshape(info["shape"])
    return header, arrays


# ---------------------------------------------------------------------------
# Test-side GPT-2 checkpoints in the two real layouts.

def write_checkpoint(directory, params, config, layout="hub", lm_head=False):
    """Write config.json + model.safetensors the way the hub ("hub") or transformers'
    save_pretrained ("transformers") does (model.py states both layouts)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "hub":  # no prefix, causal-mask buffers, data not 8-byte aligned
        mask = np.tril(np.ones((config["n_positions"],) * 2, np.float32))[None, None]  # (1, 1, P, P)
        tensors = {**params, **{f"h.{i}.attn.bias": mask for i in range(config["n_layer"])}}
    else:  # "transformer." prefix, no masks, header padded to a multiple of 8
        tensors = {"transformer." + k: v for k, v in params.items()}
    if lm_head:
        tensors["lm_head.weight"] = params["wte.weight"]
    write_safetensors(directory / "model.safetensors", tensors, align=(layout == "transformers"))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


@pytest.fixture
def tiny_dir(tmp_path, tiny):
    """A directory holding the tiny checkpoint in the hub's layout."""
    config, params = tiny
    return write_checkpoint(tmp_path / "ckpt", params, config)


# ---------------------------------------------------------------------------
# from_pretrained against the numpy GPT-2.

@pytest.mark.parametrize("layout", ["hub", "transformers"])
@pytest.mark.parametrize("lm_head", [False, True])
def test_from_pretrained_directory_matches_numpy_gpt2(tmp_path, tiny, layout, lm_head):
    """Both real layouts load: hub (no prefix, mask buffers, unaligned data) and
    transformers (prefix, padded header), with or without a redundant lm_head.weight."""
    config, params = tiny
    write_checkpoint(tmp_path / "ckpt", params, config, layout, lm_head)
    model = GPT.from_pretrained(str(tmp_path / "ckpt"))
    assert not model.training  # dropout off: logits must be deterministic
    assert model.lm_head.weight is model.transformer.wte.weight  # still one tensor, for training
    assert_matches_numpy(model, params)


def test_from_pretrained_float64_matches_numpy_gpt2_to_1e_9(tiny, tiny_dir):
    """dtype=torch.float64 loads every tensor in float64, still tied. In float64 rounding is
    gone, so even small slips (eps 1e-6, a GELU variant) would show far above 1e-9."""
    _, params = tiny
    model = GPT.from_pretrained(str(tiny_dir), dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model.lm_head.weight is model.transformer.wte.weight  # .to(dtype) kept the tie
    assert_matches_numpy(model, params, atol=1e-9)


def test_from_pretrained_bare_safetensors_file_uses_config_json_beside_it(tmp_path):
    """n_head=2 cannot come from shapes (16 / 64 is not whole); config.json must supply it."""
    config = hub_config(**TINY)
    params = random_gpt2_params(config, seed=1)
    write_checkpoint(tmp_path, params, config)
    model = GPT.from_pretrained(str(tmp_path / "model.safetensors"))
    assert_matches_numpy(model, params)


def test_from_pretrained_bare_file_without_config_infers_config_from_shapes(tmp_path):
    """n_layer, n_embd, vocab_size and block_size are in the shapes; with GPT-2's n_embd=768,
    n_head=12 is GPT-2's (head size 64)."""
    config = hub_config(n_layer=1, n_head=12, n_embd=768, vocab_size=61, n_positions=8)
    params = random_gpt2_params(config)
    write_checkpoint(tmp_path, params, config)
    (tmp_path / "config.json").unlink()
    model = GPT.from_pretrained(str(tmp_path / "model.safetensors"))
    assert_matches_numpy(model, params, n_head=12, idx=random_tokens(T=8))


def test_from_pretrained_bare_file_of_a_width_gpt2_never_had_asks_for_config_json(tiny_dir):
    """With n_embd=16 the head count is anybody's guess; guessing wrong would load a model
    that runs and is wrong, so without config.json the file is refused."""
    (tiny_dir / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        GPT.from_pretrained(str(tiny_dir / "model.safetensors"))


@pytest.mark.parametrize("spelling", [dict(activation_function="gelu_pytorch_tanh"), dict(n_inner=None),
                                      dict(n_inner=4 * 16)], ids=["gelu_pytorch_tanh", "n_inner null", "n_inner 4C"])
def test_config_json_may_spell_gpt2s_choices_as_transformers_does(tmp_path, tiny, spelling):
    """transformers calls the tanh GELU "gelu_new" or "gelu_pytorch_tanh", and writes GPT-2's
    MLP width as n_inner null or 4 x n_embd: the same GPT-2, so it loads, with its logits."""
    config, params = tiny
    write_checkpoint(tmp_path, params, {**config, **spelling})
    assert_matches_numpy(GPT.from_pretrained(str(tmp_path)), params)


# ---------------------------------------------------------------------------
# from_pretrained refuses a checkpoint it would compute wrongly: a model that runs and is
# wrong is worse than an error. Each edit is to the tiny hub checkpoint's tensors or its
# config.json; each message names the file and the problem.

REFUSED = {  # what is wrong: (edit(tensors, config), what the message must say)
    "a tensor missing": (lambda p, c: p.pop("h.1.mlp.c_fc.bias"),
                         r"missing tensor\(s\) transformer\.h\.1\.mlp\.c_fc\.bias"),
    "a tensor GPT-2 does not have": (lambda p, c: p.update({"h.0.mlp.c_gate.weight": np.zeros((16, 64), np.float32)}),
                                     r"unexpected tensor\(s\) transformer\.h\.0\.mlp\.c_gate\.weight"),
    "a shape config.json does not give": (lambda p, c: p.update({"wpe.weight": p["wpe.weight"][:31]}),
                                          r"wpe\.weight.*\(31, 16\) in the file.*expects \(32, 16\)"),
    "an output head not tied to wte": (lambda p, c: p.update({"lm_head.weight": p["wte.weight"] + 1.0}),
                                       r"lm_head\.weight differs from wte\.weight"),
    "the erf GELU": (lambda p, c: c.update(activation_function="gelu"),
                     r"activation_function 'gelu' is not GPT-2's tanh GELU"),
    "layer norm eps 1e-6": (lambda p, c: c.update(layer_norm_epsilon=1e-6), r"layer_norm_epsilon 1e-06"),
    "an MLP of 2 x n_embd": (lambda p, c: c.update(n_inner=32), r"n_inner 32"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_from_pretrained_refuses_a_checkpoint_it_would_compute_wrongly_naming_the_problem(tmp_path, tiny, case):
    """A ValueError naming the folder and what does not fit, instead of a model that runs:
    a missing tensor would stay random, an unknown one would be dropped, an untied head or a
    config.json asking for another activation, eps or MLP width would be silently ignored."""
    edit, message = REFUSED[case]
    config, params = tiny
    edit(params, config)
    write_checkpoint(tmp_path / "ckpt", params, config)
    with pytest.raises(ValueError, match=message) as err:
        GPT.from_pretrained(str(tmp_path / "ckpt"))
    assert str(tmp_path / "ckpt") in str(err.value)


@pytest.mark.parametrize("content, why", [
    (b'{"n_embd": 16,', "Expecting property name enclosed in double quotes: line 1 column 15 (char 14)"),
    (b'{"n_embd": "\xff"}', "'utf-8' codec can't decode byte 0xff in position 12: invalid start byte"),
], ids=["cut short", "not UTF-8"])
def test_a_config_json_that_is_not_json_is_refused_naming_it_and_what_to_do(tiny_dir, content, why):
    """A config.json cut short, or not UTF-8, is a ValueError naming that file, what is wrong
    and the way out (without it the sizes come from the tensors), not a bare decoding error."""
    (tiny_dir / "config.json").write_bytes(content)
    with pytest.raises(ValueError) as err:
        GPT.from_pretrained(str(tiny_dir))
    assert str(err.value) == (f"{tiny_dir / 'config.json'}: not valid JSON ({why}); delete it to read the sizes "
                              "off the weights")


# ---------------------------------------------------------------------------
# safetensors: round trip, independent parsing, malformed files.

def test_save_safetensors_round_trip_and_header_parsed_independently(tmp_path):
    """dtype strings, shapes and contiguous offsets are what the format spec says; values,
    dtypes and metadata survive; a transposed view is written by value, not by storage."""
    path = tmp_path / "t.safetensors"
    w = torch.randn(3, 5)
    tensors = {"f32": torch.randn(2, 3), "f16": torch.randn(4).half(), "bf16": torch.randn(2, 2).bfloat16(),
               "transposed": w.t(), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    save_safetensors(tensors, path, metadata={"format": "pt", "note": "hello"})

    header, arrays = read_safetensors(path)
    assert header["__metadata__"] == {"format": "pt", "note": "hello"}
    assert {k: v["dtype"] for k, v in header.items() if k != "__metadata__"} == {
        "f32": "F32", "f16": "F16", "bf16": "BF16", "transposed": "F32", "scalar": "F32", "empty": "F32"}
    assert {k: v["shape"] for k, v in header.items() if k != "__metadata__"} == {
        k: list(t.shape) for k, t in tensors.items()}
    spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # no gaps
    n_header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert 8 + n_header + spans[-1][1] == path.stat().st_size
    for name, t in tensors.items():
        np.testing.assert_array_equal(arrays[name], t.float().numpy())

    loaded = load_safetensors(path)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name


EVERY_DTYPE = {  # name in the file: values that each dtype must keep exactly, extremes included
    "F64": ([1 / 3, -0.0, -1e308, 5e-324, np.inf], np.float64, torch.float64),
    "F32": ([1 / 3, -0.0, -3.4e38, 1e-45, -np.inf], np.float32, torch.float32),
    "F16": ([1 / 3, -0.0, 65504.0, -6e-8, np.inf], np.float16, torch.float16),
    "BF16": ([1.5, -2.0, 2.0**127, -np.inf, -(2.0**-133)], None, torch.bfloat16),  # exact in BF16
    "I64": ([-(2**63), 2**63 - 1, -1, 0, 50256], np.int64, torch.int64),
    "I32": ([-(2**31), 2**31 - 1, -1, 0, 7], np.int32, torch.int32),
    "I16": ([-(2**15), 2**15 - 1, -1, 0, 7], np.int16, torch.int16),
    "I8": ([-128, 127, -1, 0, -7], np.int8, torch.int8),  # signed: the negatives must come back negative
    "U8": ([0, 255, 1, 128, 7], np.uint8, torch.uint8),
    "BOOL": ([True, False, True, True, False], np.bool_, torch.bool),
}


def test_every_dtype_checkpoint_py_knows_is_tested_here():
    """The round trip below covers the whole of checkpoint.py's dtype table, no more, no less."""
    assert set(SAFETENSORS_DTYPES) == set(EVERY_DTYPE)


@pytest.mark.parametrize("name", EVERY_DTYPE)
def test_every_dtype_round_trips_exactly_through_files_read_and_written_independently(tmp_path, name):
    """save_safetensors writes each dtype under its spec name with the values a plain
    little-endian reader decodes (I8 as signed two's complement, BOOL as 0/1 bytes), and
    load_safetensors decodes a file the test-side writer made to the same values and dtype."""
    values, np_dtype, torch_dtype = EVERY_DTYPE[name]
    t = torch.tensor(values, dtype=torch_dtype).reshape(5, 1)
    save_safetensors({"t": t}, tmp_path / "ours.safetensors")
    header, arrays = read_safetensors(tmp_path / "ours.safetensors")
    assert header["t"]["dtype"] == name and header["t"]["shape"] == [5, 1]
    expected = np.array(values, np.float32 if name == "BF16" else np_dtype).reshape(5, 1)
    np.testing.assert_array_equal(arrays["t"], expected)
    if expected.dtype.kind == "f":
        np.testing.assert_array_equal(np.signbit(arrays["t"]), np.signbit(expected))  # -0.0 too

    if name == "BF16":  # the test-side writer has no BF16: its bits are a float32's top half
        data = (expected.view(np.uint32) >> 16).astype(np.uint16).tobytes()
        entry = {"dtype": "BF16", "shape": [5, 1], "data_offsets": [0, len(data)]}
        (tmp_path / "theirs.safetensors").write_bytes(safetensors_bytes({"t": entry}, data))
    else:
        write_safetensors(tmp_path / "theirs.safetensors", {"t": expected})
    for path in ("ours.safetensors", "theirs.safetensors"):
        loaded = load_safetensors(tmp_path / path)["t"]
        assert loaded.dtype == torch_dtype and loaded.shape == (5, 1), path
        assert loaded.view(torch.uint8).tolist() == t.view(torch.uint8).tolist(), path  # bit for bit


def test_load_safetensors_reads_hand_written_f16_and_bf16_at_unaligned_offsets(tmp_path):
    """A 6-byte F16 tensor first pushes the F32 and BF16 data off any alignment."""
    f16 = np.array([1.5, -2.0, 65504.0], np.float16)
    f32 = np.array([[0.1, -3e38], [1e-45, 7.0]], np.float32)
    bf16_bits = np.array([0x3FC0, 0xC000, 0x7F80], np.uint16)  # 1.5, -2.0, +inf
    data = f16.tobytes() + f32.tobytes() + bf16_bits.tobytes()
    header = {"__metadata__": {"format": "pt"},
              "half": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
              "single": {"dtype": "F32", "shape": [2, 2], "data_offsets": [6, 22]},
              "brain": {"dtype": "BF16", "shape": [3], "data_offsets": [22, 28]}}
    (tmp_path / "t.safetensors").write_bytes(safetensors_bytes(header, data))
    loaded = load_safetensors(tmp_path / "t.safetensors")
    assert loaded["half"].dtype == torch.float16 and loaded["brain"].dtype == torch.bfloat16
    np.testing.assert_array_equal(loaded["half"].numpy(), f16)
    np.testing.assert_array_equal(loaded["single"].numpy(), f32)
    np.testing.assert_array_equal(loaded["brain"].float().numpy(), [1.5, -2.0, np.inf])


def one_tensor(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


EIGHT_BYTES = np.arange(2, dtype=np.float32).tobytes()
MALFORMED = {  # name: (file bytes, what the message must say)
    "shorter than the length prefix": (b"\x10\x00\x00", r"(?i)truncat|short|small|header"),
    "truncated data": (safetensors_bytes({"a": one_tensor(shape=[4], offsets=[0, 16])}, EIGHT_BYTES * 2)[:-5],
                       r"(?i)truncat|short|offset|range|beyond|exceed|end"),
    "header length past the end": (struct.pack("<Q", 1000) + b'{"a":1}', r"(?i)header"),
    "header length above 100 MB": (struct.pack("<Q", 2**62) + b"{}", r"(?i)header"),
    "header not JSON": (struct.pack("<Q", 5) + b"{oops", r"(?i)json"),
    "header a JSON list": (safetensors_bytes([1, 2], b""), r"(?i)object|dict|mapping"),
    "offsets overlap": (safetensors_bytes({"a": one_tensor(offsets=[0, 8]), "b": one_tensor(offsets=[4, 12])},
                                          EIGHT_BYTES + EIGHT_BYTES[:4]), r"(?i)overlap|contiguous|offset"),
    "gap between tensors": (safetensors_bytes({"a": one_tensor(offsets=[0, 8]), "b": one_tensor(offsets=[12, 20])},
                                              EIGHT_BYTES * 2 + EIGHT_BYTES[:4]), r"(?i)gap|contiguous|offset"),
    "offsets past the data": (safetensors_bytes({"a": one_tensor(offsets=[8, 16])}, EIGHT_BYTES),
                              r"(?i)offset|range|beyond|exceed|truncat|gap|contiguous"),
    "end before begin": (safetensors_bytes({"a": one_tensor(offsets=[8, 0])}, EIGHT_BYTES),
                         r"(?i)offset|range|order|byte|size"),
    "byte count != numel * itemsize": (safetensors_bytes({"a": one_tensor(shape=[3], offsets=[0, 8])}, EIGHT_BYTES),
                                       r"(?i)byte|size|numel|shape"),
    "unknown dtype": (safetensors_bytes({"a": one_tensor(dtype="X3")}, EIGHT_BYTES), r"(?i)dtype|X3"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_load_safetensors_rejects_malformed_file_with_value_error_naming_path(tmp_path, case):
    """A broken download must say what is wrong and where, not crash deep inside numpy/json."""
    content, pattern = MALFORMED[case]
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=pattern) as err:
        load_safetensors(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("extra", [b"\0", b"\0" * 8, EIGHT_BYTES * 3])
def test_load_safetensors_refuses_bytes_after_the_last_tensor(tmp_path, extra):
    """The spec (and its reference reader) wants the tensors to tile the data exactly: bytes
    after the last tensor mean the header and the file disagree (a file appended to, or the
    wrong header). The message names the problem, how many bytes, and the file."""
    path = tmp_path / "trailing.safetensors"
    path.write_bytes(safetensors_bytes({"a": one_tensor()}, EIGHT_BYTES + extra))
    with pytest.raises(ValueError, match=rf"{len(extra)} trailing bytes after the last tensor") as err:
        load_safetensors(path)
    assert str(path) in str(err.value)
    path.write_bytes(safetensors_bytes({"a": one_tensor()}, EIGHT_BYTES))  # the same file, without them,
    assert load_safetensors(path)["a"].tolist() == [0.0, 1.0]  # loads


def test_failed_save_safetensors_keeps_old_file_and_leaves_no_temp_files(tmp_path):
    """A save that dies half-way must not destroy the previous checkpoint or leave debris.
    A meta tensor has a dtype and a shape but no bytes, so writing it fails mid-file."""
    path = tmp_path / "x.safetensors"
    save_safetensors({"a": torch.ones(3)}, path)
    for bad in ("not a tensor", torch.empty(3, device="meta")):
        for target in (path, tmp_path / "new.safetensors"):
            with pytest.raises(Exception):  # any error, as long as it is raised
                save_safetensors({"a": torch.zeros(3), "b": bad}, target)
            assert os.listdir(tmp_path) == ["x.safetensors"]
            assert torch.equal(load_safetensors(path)["a"], torch.ones(3))


# ---------------------------------------------------------------------------
# save_pretrained writes what the hub serves.

def test_save_pretrained_writes_hub_layout_that_numpy_gpt2_reproduces(tmp_path):
    """No prefix, no lm_head, Conv1D (in, out) weights: the numpy GPT-2, which reads
    the hub layout, must reproduce the model's own logits from the saved file alone."""
    torch.manual_seed(0)
    model = GPT(TINY_CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial layer norms and biases too
            p.normal_(0.0, 0.3)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2"
    assert {k: config[k] for k in TINY} == TINY

    header, arrays = read_safetensors(tmp_path / "model.safetensors")
    assert header["__metadata__"]["format"] == "pt"
    expected = {k: v.shape for k, v in random_gpt2_params(hub_config(**TINY)).items()}
    masks = {k for k in arrays if re.fullmatch(r"h\.\d+\.attn\.(masked_)?bias", k)}  # optional buffers
    assert {k: a.shape for k, a in arrays.items() if k not in masks} == expected
    assert arrays["h.0.attn.c_attn.weight"].shape == (16, 48)  # (in, out), not nn.Linear's (out, in)
    params = {k: a for k, a in arrays.items() if k not in masks}
    assert_matches_numpy(model, params)


def test_save_pretrained_then_from_pretrained_round_trips_exactly(tmp_path, tiny, tiny_dir):
    """Loading a hub checkpoint and saving it gives back the same tensors bit for bit,
    and reloading the saved directory gives identical logits."""
    _, params = tiny
    model = GPT.from_pretrained(str(tiny_dir))
    model.save_pretrained(tmp_path / "out")
    _, arrays = read_safetensors(tmp_path / "out" / "model.safetensors")
    for name, a in params.items():
        np.testing.assert_array_equal(arrays[name], a, err_msg=name)
    again = GPT.from_pretrained(str(tmp_path / "out"))
    assert np.array_equal(model_logits(again, random_tokens()), model_logits(model, random_tokens()))


def current_umask():
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def test_saved_files_get_the_usual_permissions(tmp_path):
    """Atomic writes must not leave owner-only files (as mkstemp makes them): the result is
    as open() makes it under the umask."""
    GPT(TINY_CONFIG).save_pretrained(tmp_path)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~current_umask(), name


# ---------------------------------------------------------------------------
# Atomic writes (checkpoint.py, section 1): a file with write_atomically, a folder with
# replace_folder, and what a replace_folder killed half-way leaves, with clean_leftovers.
# Each test reads the whole folder around the target from the disk, before and after.

def tree(root):
    """{path below root: the file's bytes, "folder", or "link to TARGET"}, hidden names
    included and links not followed: a folder's whole state, to compare to the byte."""
    entries = {}
    for folder, subfolders, files in os.walk(root):
        for name in subfolders + files:
            p = Path(folder, name)
            entries[str(p.relative_to(root))] = (f"link to {os.readlink(p)}" if p.is_symlink()
                                                 else "folder" if p.is_dir() else p.read_bytes())
    return entries


def make_folder(folder, files):
    """Write {relative path: bytes} into folder, making the folders on the way."""
    for name, data in files.items():
        (Path(folder) / name).parent.mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_bytes(data)
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder)


def inside(folder, files):
    """What tree() shows of {relative path: bytes} written into `folder`, folders included."""
    entries = {folder: "folder"}
    for name, data in files.items():
        for parent in reversed(Path(name).parents[:-1]):  # data/pairs.jsonl: the folder data
            entries[f"{folder}/{parent}"] = "folder"
        entries[f"{folder}/{name}"] = data
    return entries


OURS = ("config.json", "model.safetensors", "metrics.jsonl")  # what replace_folder may delete
OLD = {"config.json": b'{"run": "old"}', "model.safetensors": b"old weights", "metrics.jsonl": b'{"step": 1}\n'}
NEW = {"config.json": b'{"run": "new"}', "model.safetensors": b"new weights"}
FAILURES = {  # what can interrupt a write
    "a bug": lambda: RuntimeError("a bug"),
    "Ctrl-C": KeyboardInterrupt,
    "a full disk": lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
}


@pytest.mark.parametrize("before", [None, b"old bytes"], ids=["no file", "a file"])
def test_write_atomically_puts_the_new_bytes_in_place_and_nothing_beside_them(tmp_path, before):
    """write(tmp) gets a fresh name .NAME.XXXXXXXX.tmp beside path and makes the file there;
    then path holds exactly the new bytes, with the permissions open() gives under the umask
    (not mkstemp's 0600), and nothing else is in the folder. A reader that had the old file
    open goes on reading the old bytes: path was renamed over, not written into."""
    path = tmp_path / "out.bin"
    if before is not None:
        path.write_bytes(before)
    given = []

    def write(tmp):
        given.append(tmp)
        assert tmp.parent == tmp_path and not os.path.lexists(tmp), tmp
        tmp.write_bytes(b"new bytes")
    if before is None:
        write_atomically(path, write)
    else:
        with open(path, "rb") as reader:  # opened before the write, read after it
            write_atomically(path, write)
            assert reader.read() == before
    assert len(given) == 1 and re.fullmatch(r"\.out\.bin\.[0-9a-f]{8}\.tmp", given[0].name)
    assert tree(tmp_path) == {"out.bin": b"new bytes"}
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("before", [None, b"old bytes"], ids=["no file", "a file"])
def test_write_atomically_that_fails_leaves_the_old_file_and_nothing_beside_it(tmp_path, before, failure):
    """An exception inside write, even Ctrl-C, goes on as it was, and the folder is byte for
    byte what it was: the old file (or none), and no half-written temporary."""
    path = tmp_path / "out.bin"
    if before is not None:
        path.write_bytes(before)
    exception = FAILURES[failure]()

    def write_half(tmp):
        tmp.write_bytes(b"new by")
        raise exception
    with pytest.raises(type(exception)) as err:
        write_atomically(path, write_half)
    assert err.value is exception
    assert tree(tmp_path) == ({} if before is None else {"out.bin": before})


@pytest.mark.parametrize("before", ["nothing", "an empty folder", "an earlier run"])
def test_replace_folder_puts_the_new_files_in_place_of_the_old_and_nothing_beside_them(tmp_path, capsys, before):
    """write(tmp) gets a new, empty folder .NAME.XXXXXXXX.tmp beside path; afterwards path
    holds exactly what it wrote. The earlier run's files (and a temporary write_atomically
    left among them) are all among `names`, so they are deleted and no warning is printed."""
    out = tmp_path / "out"
    if before == "an empty folder":
        out.mkdir()
    elif before == "an earlier run":
        make_folder(out, {**OLD, ".model.safetensors.0123abcd.tmp": b"half of an old save"})
    given = []

    def write(tmp):
        given.append(tmp)
        assert tmp.parent == tmp_path and list(tmp.iterdir()) == [], tmp
        make_folder(tmp, NEW)
    checkpoint.replace_folder(out, write, OURS)
    assert len(given) == 1 and re.fullmatch(r"\.out\.[0-9a-f]{8}\.tmp", given[0].name)
    assert tree(tmp_path) == inside("out", NEW)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("foreign", [
    {"thesis.txt": b"two years of work"},
    {"data/pairs.jsonl": b'{"prompt": "mine"}\n'},  # a folder of the user's
    {"model.safetensors.bak": b"a copy kept by hand"},
    {".model.safetensors.edit.tmp": b"not write_atomically's: no 8 hex digits"},
    {".notes.txt.0123abcd.tmp": b"a temporary of a file not in names"},
], ids=["a file", "a folder", "a backup", "a look-alike temporary", "a temporary of another file"])
def test_replace_folder_never_deletes_a_file_it_was_not_given_the_name_of(tmp_path, capsys, foreign):
    """A file that is not one of `names` (nor write_atomically's temporary for one) is never
    deleted: the old folder, renamed aside, is emptied of this project's files only and stays
    with the user's, byte for byte, and a warning on stderr says where they are."""
    out = make_folder(tmp_path / "out", {**OLD, **foreign})
    checkpoint.replace_folder(out, lambda tmp: make_folder(tmp, NEW), OURS)
    after = tree(tmp_path)
    (old,) = [name for name in after if "/" not in name and name != "out"]
    assert re.fullmatch(r"\.out\.[0-9a-f]{8}\.old", old)
    assert after == {**inside("out", NEW), **inside(old, foreign)}
    warning = capsys.readouterr().err
    assert str(tmp_path / old) in warning and Path(next(iter(foreign))).parts[0] in warning


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("before", ["nothing", "an earlier run"])
def test_replace_folder_that_fails_inside_write_leaves_the_folder_as_it_was(tmp_path, capsys, before, failure):
    """An exception inside write (a bug, Ctrl-C, a full disk) after it wrote a file and half
    of another goes on as it was; the folder around path is byte for byte what it was, with
    nothing beside path: the new files, write_atomically's temporary among them, are gone."""
    if before == "an earlier run":
        make_folder(tmp_path / "out", {**OLD, "thesis.txt": b"the user's"})
    expected = tree(tmp_path)
    exception = FAILURES[failure]()

    def write_then_fail(tmp):
        make_folder(tmp, {"model.safetensors": b"new weights", ".config.json.89abcdef.tmp": b'{"ru'})
        raise exception
    with pytest.raises(type(exception)) as err:
        checkpoint.replace_folder(tmp_path / "out", write_then_fail, OURS)
    assert err.value is exception
    assert tree(tmp_path) == expected
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("failure", FAILURES)
def test_replace_folder_failing_between_its_two_renames_puts_the_old_folder_back(tmp_path, monkeypatch, failure):
    """The one moment path is missing: the old folder has been renamed aside and the new
    one not yet into place. An exception there (here from the second os.replace) puts the
    old folder back: the folder around path is byte for byte what it was."""
    make_folder(tmp_path / "out", {**OLD, "thesis.txt": b"the user's"})
    expected = tree(tmp_path)
    exception, real_replace, renames = FAILURES[failure](), os.replace, []

    def replace_failing_the_second_time(source, target):
        renames.append((Path(source).name, Path(target).name))
        if len(renames) == 2:
            raise exception
        real_replace(source, target)
    monkeypatch.setattr(checkpoint.os, "replace", replace_failing_the_second_time)
    with pytest.raises(type(exception)) as err:
        checkpoint.replace_folder(tmp_path / "out", lambda tmp: make_folder(tmp, NEW), OURS)
    assert err.value is exception
    assert renames[0][0] == "out" and renames[1][1] == "out"  # it did fail between the two
    assert tree(tmp_path) == expected


def test_replace_folder_through_a_symlink_replaces_the_folder_it_points_to(tmp_path):
    """--out may be a link to a folder elsewhere (a bigger disk): the folder is replaced and
    the link, still pointing at it, is left as it was."""
    make_folder(tmp_path / "disk" / "run", OLD)
    (tmp_path / "out").symlink_to(Path("disk") / "run")
    checkpoint.replace_folder(tmp_path / "out", lambda tmp: make_folder(tmp, NEW), OURS)
    assert tree(tmp_path) == {"out": "link to disk/run", "disk": "folder", **inside("disk/run", NEW)}


def leave_leftovers(folder, old_files):
    """Beside folder/out: its earlier files in .out.abcd1234.old, where replace_folder's
    first rename put them, and a .out.0123abcd.tmp folder of a save killed while writing, with
    a whole file and half of another (write_atomically's temporary)."""
    make_folder(folder / ".out.abcd1234.old", old_files)
    make_folder(folder / ".out.0123abcd.tmp", {"model.safetensors": b"new weights",
                                               ".config.json.89abcdef.tmp": b'{"ru'})


def test_clean_leftovers_after_a_kill_between_the_two_renames_puts_the_old_folder_back(tmp_path):
    """A SIGKILL or a power cut between replace_folder's two renames leaves out missing and
    its files waiting in .out.abcd1234.old. clean_leftovers renames that folder back, whole
    (the user's file in it too), and empties and removes the half-written .tmp folder."""
    earlier = {**OLD, "notes.txt": b"the user's"}
    leave_leftovers(tmp_path, earlier)
    checkpoint.clean_leftovers(tmp_path / "out", OURS)
    assert tree(tmp_path) == inside("out", earlier)


def test_clean_leftovers_beside_a_present_folder_removes_them_and_leaves_the_folder(tmp_path):
    """With out in place, a leftover .old folder holds files already replaced (a kill after
    the second rename), and a .tmp folder a save that never finished: both go, and out is
    left byte for byte."""
    make_folder(tmp_path / "out", NEW)
    leave_leftovers(tmp_path, OLD)
    checkpoint.clean_leftovers(tmp_path / "out", OURS)
    assert tree(tmp_path) == inside("out", NEW)


@pytest.mark.parametrize("leftover", [".out.abcd1234.old", ".out.0123abcd.tmp"])
def test_clean_leftovers_keeps_a_file_it_was_not_given_the_name_of(tmp_path, capsys, leftover):
    """A leftover holding a file of the user's is emptied of this project's files only, and
    stays, with that file byte for byte, named in a warning on stderr."""
    make_folder(tmp_path / "out", NEW)
    make_folder(tmp_path / leftover, {**OLD, "thesis.txt": b"two years of work"})
    checkpoint.clean_leftovers(tmp_path / "out", OURS)
    assert tree(tmp_path) == {**inside("out", NEW), **inside(leftover, {"thesis.txt": b"two years of work"})}
    warning = capsys.readouterr().err
    assert str(tmp_path / leftover) in warning and "thesis.txt" in warning


@pytest.mark.parametrize("out_present", [True, False], ids=["out present", "out missing"])
def test_clean_leftovers_leaves_alone_what_only_looks_like_a_leftover(tmp_path, out_present):
    """Only a folder named exactly .out.XXXXXXXX.old or .tmp (8 lower-case hex digits) is
    replace_folder's: another pattern, a plain file of that name, another target's leftover,
    or a link (which must not be followed to delete what it points to) are left as they are,
    and none of them is renamed into out's place."""
    if out_present:
        make_folder(tmp_path / "out", NEW)
    for name in (".out.xyz.old", ".out.ABCD1234.old", ".out.abcd12345.old", "out.abcd1234.old",
                 ".out.abcd1234.old.bak", ".other.abcd1234.old", ".out.abcd1234.tmp.d"):
        make_folder(tmp_path / name, OLD)
    (tmp_path / ".out.abcd1234.old").write_bytes(b"a file, not a folder")
    make_folder(tmp_path / "elsewhere", OLD)
    (tmp_path / ".out.0123abcd.tmp").symlink_to("elsewhere")
    expected = tree(tmp_path)
    checkpoint.clean_leftovers(tmp_path / "out", OURS)
    assert tree(tmp_path) == expected
    checkpoint.clean_leftovers(tmp_path / "missing" / "out", OURS)  # a folder that is not there: no error
    assert tree(tmp_path) == expected


# ---------------------------------------------------------------------------
# A run's folder (checkpoint.py, section 1): tried before the run (prepare_run_folder),
# refused unless it is ours (refuse_others), saved as one unit (save_folder); the files in
# it, each renamed over the old one; and JSON Lines read back (section 4).

RUN = "--out runs/may"  # the option the messages name


def test_prepare_run_folder_makes_the_missing_parents_and_leaves_nothing_else(tmp_path):
    """--out may be several folders down a path that is not there yet: they are made, and the
    folder made beside --out to try a save there is gone again. It returns the folders it
    made, outermost first, and remove_empty_folders takes them away again (a run that failed
    before its first save), but stops at the first that holds something."""
    created = checkpoint.prepare_run_folder(tmp_path / "runs" / "may" / "out", OURS, RUN)
    assert tree(tmp_path) == {"runs": "folder", "runs/may": "folder"}
    assert created == [tmp_path / "runs", tmp_path / "runs" / "may"]
    checkpoint.remove_empty_folders(created)
    assert tree(tmp_path) == {}
    make_folder(tmp_path / "runs", {"mine.txt": b"keep"})  # made meanwhile by someone else
    created = checkpoint.prepare_run_folder(tmp_path / "runs" / "may" / "out", OURS, RUN)
    assert created == [tmp_path / "runs" / "may"]
    (tmp_path / "runs" / "may" / "theirs.txt").write_bytes(b"x")
    checkpoint.remove_empty_folders(created)
    assert tree(tmp_path) == {"runs": "folder", "runs/mine.txt": b"keep", "runs/may": "folder",
                              "runs/may/theirs.txt": b"x"}


def test_prepare_run_folder_that_cannot_try_a_save_says_where_and_removes_the_folders_it_made(tmp_path, monkeypatch):
    """The folders on the way to --out are made first, then a folder beside --out is tried; if
    that cannot be made (a read-only disk; here mkdir fails as it would), the OSError says where,
    and the folders made for it are gone again: a run refused at once leaves no trace."""
    real = Path.mkdir

    def no_folder_beside_out(path, *args, **kwargs):
        if path.name.startswith(".out."):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", no_folder_beside_out)
    out = tmp_path / "runs" / "may" / "out"
    with pytest.raises(OSError) as err:
        checkpoint.prepare_run_folder(out, OURS, RUN)
    assert str(err.value) == f"{RUN}: cannot write in {out.parent.resolve()} (Read-only file system)"
    assert tree(tmp_path) == {}


@pytest.mark.skipif(os.name != "posix", reason="needs /, which is a mount point on POSIX systems")
@pytest.mark.parametrize("through_a_link", [False, True], ids=["/", "a link to /"])
def test_prepare_run_folder_refuses_a_mount_point_even_through_a_link(tmp_path, through_a_link):
    """A mount point cannot be renamed aside, so a save there would fail only after the run.
    A link to one counts as what it points to, since that is the folder a save replaces."""
    out = Path("/")
    if through_a_link:
        (tmp_path / "out").symlink_to("/")
        out = tmp_path / "out"
    with pytest.raises(ValueError) as err:
        checkpoint.prepare_run_folder(out, OURS, RUN)
    assert str(err.value) == f"{RUN} is a mount point, which a save cannot replace as a whole; give a folder inside it"
    assert tree(tmp_path) == ({"out": "link to /"} if through_a_link else {})


MARKED = b'{"ours": true}'  # what the marker file of a folder of ours holds, in these tests
REFUSED_OR_OURS = {  # what the folder holds (None: no folder): the names returned, or the names the refusal shows
    "no folder": (None, []),
    "an empty folder": ({}, []),
    "an earlier run": ({**OLD, "marker": MARKED}, ["config.json", "marker", "metrics.jsonl", "model.safetensors"]),
    "our names, no marker": ({"model.safetensors": b"theirs", "config.json": b"{}"}, "config.json, model.safetensors"),
    "our names, a marker of someone else's": ({**OLD, "marker": b'{"theirs": true}'},
                                             "config.json, marker, metrics.jsonl ..."),
    "three files of the user's": ({**OLD, "c.txt": b"", "a.txt": b"", "b.txt": b""}, "a.txt, b.txt, c.txt"),
    "five files of the user's": ({**OLD, **{f"{c}.txt": b"" for c in "edcba"}}, "a.txt, b.txt, c.txt ..."),
}


@pytest.mark.parametrize("case", REFUSED_OR_OURS)
def test_refuse_others_returns_our_names_or_refuses_showing_the_first_three_of_the_rest(tmp_path, case):
    """A folder is ours when it holds only files of `names` and is_marked says their contents
    are ours (here: a file "marker" holding MARKED), or when it is empty: its names come back,
    sorted. Otherwise the refusal shows what else is there, or, where every name is ours but
    the contents are not, what is there, the first three in sorted order; the folder is left
    as it was either way."""
    files, expected = REFUSED_OR_OURS[case]
    out = tmp_path / "out" if files is None else make_folder(tmp_path / "out", files)
    before = tree(tmp_path)
    is_marked = lambda folder: (folder / "marker").is_file() and (folder / "marker").read_bytes() == MARKED
    if isinstance(expected, list):
        assert checkpoint.refuse_others(out, (*OURS, "marker"), is_marked, RUN) == expected
    else:
        with pytest.raises(ValueError) as err:
            checkpoint.refuse_others(out, (*OURS, "marker"), is_marked, RUN)
        assert str(err.value) == (f"{RUN} holds {expected}, which this project did not write. It only ever "
                                  "replaces its own output: give a new or empty folder")
    assert tree(tmp_path) == before


def test_save_folder_makes_the_missing_parents_of_the_folder(tmp_path):
    """The folders on the way to --out may have gone since the run began: a save makes them."""
    checkpoint.save_folder(tmp_path / "runs" / "may" / "out", lambda tmp: make_folder(tmp, NEW), OURS)
    assert tree(tmp_path) == {"runs": "folder", "runs/may": "folder", **inside("runs/may/out", NEW)}


@pytest.mark.parametrize("out", ["notes.txt/out", "notes.txt"], ids=["below a file", "a file"])
def test_save_folder_that_cannot_save_says_why_and_that_the_folder_is_as_it_was(tmp_path, out):
    """Whether the parent cannot be made (a file is in the way) or the folder cannot be
    replaced (it is a file), the OSError says why, in words, and that nothing changed."""
    make_folder(tmp_path, {"notes.txt": b"the user's"})
    out = tmp_path / out
    why = (os.strerror(errno.EEXIST) if out.name == "out" else
           f"{out.resolve()} is a file, not a folder: refusing to replace it with one")
    with pytest.raises(OSError) as err:
        checkpoint.save_folder(out, lambda tmp: make_folder(tmp, NEW), OURS)
    assert str(err.value) == f"could not save to {out} ({why}); it is as it was before this save"
    assert tree(tmp_path) == {"notes.txt": b"the user's"}


def tensors_as_lists(state):
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


RUN_FILES = {  # saver: (what it is given, the file read back without checkpoint.py, what that must give)
    "save_json": (checkpoint.save_json, {"n_embd": 16, "bias": True, "names": ["a"]}, Path.read_bytes,
                  b'{\n  "n_embd": 16,\n  "bias": true,\n  "names": [\n    "a"\n  ]\n}'),
    "save_jsonl": (checkpoint.save_jsonl, [{"step": 1}, {"loss": 0.5}], Path.read_bytes,
                   b'{"step": 1}\n{"loss": 0.5}\n'),
    "save_state": (checkpoint.save_state, {"step": 3, "lr": [1e-3, 5e-4], "x": torch.tensor([1.5, -2.0])},
                   lambda path: tensors_as_lists(torch.load(path, weights_only=True)),
                   {"step": 3, "lr": [1e-3, 5e-4], "x": [1.5, -2.0]}),
    "save_safetensors": (save_safetensors, {"a": torch.zeros(300)}, lambda path: read_safetensors(path)[1]["a"].tolist(),
                         [0.0] * 300),
}


@pytest.mark.parametrize("saver", RUN_FILES)
def test_each_run_file_is_written_whole_and_renamed_over_the_old_one(tmp_path, saver):
    """config.json (indented, as the hub's), metrics.jsonl (a line per record, each ended),
    resume.pt and a .safetensors file hold what they were given, and each is written beside its name and renamed over
    it (write_atomically): a reader that had the old file open still reads the old bytes,
    which a file written in place would have changed under it."""
    save, value, read, expected = RUN_FILES[saver]
    path = tmp_path / "file"
    path.write_bytes(b"old bytes")
    with open(path, "rb") as reader:
        save(value, path)
        assert reader.read() == b"old bytes"
    assert read(path) == expected
    assert sorted(tmp_path.iterdir()) == [path]


class RunsCode:
    """Unpickled, this makes the folder `path`: the proof that code named in a file ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def test_load_state_never_runs_code_that_a_resume_pt_names(tmp_path):
    """Unpickling may call any function a file names; load_state refuses a file that names
    anything but tensors and plain values, before calling it."""
    ran = tmp_path / "code-ran"
    torch.save({"step": 3, "payload": RunsCode(ran)}, tmp_path / "resume.pt")
    with pytest.raises(ValueError) as err:
        checkpoint.load_state(tmp_path / "resume.pt", "--resume")
    assert not ran.exists()
    assert str(err.value) == (f"--resume: {tmp_path / 'resume.pt'} cannot be read (not a torch.save file of "
                              "tensors and plain values)")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, about the plain pickle
@pytest.mark.parametrize("content", [b"", b"hello world\n", b'{"step": 3}', pickle.dumps({"step": 3})],
                         ids=["empty", "text", "json", "a plain pickle"])
def test_load_state_of_a_file_torch_save_did_not_write_is_a_one_line_error(tmp_path, content):
    """An empty resume.pt (a full disk), or another kind of file under its name: the same
    one-line ValueError, which train_toy prints, never a traceback (torch raises EOFError,
    KeyError or pickle.UnpicklingError for these)."""
    path = tmp_path / "resume.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^--resume: {re.escape(str(path))} cannot be read \((empty|not a torch"
                                         r"\.save file of tensors and plain values)\)$"):
        checkpoint.load_state(path, "--resume")


def test_load_state_of_a_cut_file_names_the_option_the_file_and_the_first_line_of_torchs_reason(tmp_path):
    """A resume.pt cut short (a full disk, a copy interrupted): a one-line ValueError, which
    train_toy prints as it is, saying which option and file, and why in torch's own words."""
    path = tmp_path / "resume.pt"
    torch.save({"step": 3, "x": torch.arange(4.0)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(RuntimeError) as torch_says:
        torch.load(path, weights_only=True)
    with pytest.raises(ValueError) as err:
        checkpoint.load_state(path, "--resume")
    assert str(err.value) == f"--resume: {path} cannot be read ({str(torch_says.value).splitlines()[0]})"


def read_each(record, where):
    """read_records' parse: (where, record), and a ValueError for a record holding "bad"."""
    if "bad" in record:
        raise ValueError("a bad record")
    return where, record


DATA_FILES = {  # the file's bytes (None: no file): the (where, record) pairs read, or (exception, message)
    "a BOM, CRLF, blank lines and no last newline": (
        b'\xef\xbb\xbf{"a": 1}\r\n\r\n  \t\r\n{"b": 2}\n\n{"c": 3}',
        [("line 1", {"a": 1}), ("line 4", {"b": 2}), ("line 6", {"c": 3})]),
    "a BOM on line 2": (b'{"a": 1}\n\xef\xbb\xbf{"b": 2}\n',
                        (ValueError, "{path} line 2: not valid JSON (Unexpected UTF-8 BOM (decode using utf-8-sig))")),
    "not JSON": (b'{"a": 1}\n\n{"b": \n', (ValueError, "{path} line 3: not valid JSON (Expecting value)")),
    "a list on a line": (b'{"a": 1}\n[1, 2]\n', (ValueError, "{path} line 2: expected a JSON object, got list")),
    "a string": (b'"a"\n', (ValueError, "{path} line 1: expected a JSON object, got str")),
    "bad UTF-8": (b'{"a": 1}\n{"a": "\xff"}\n',
                  (ValueError, "{path} line 2: not UTF-8 text (invalid start byte at byte 7)")),
    "a record parse refuses": (b'{"a": 1}\n{"bad": 2}\n', (ValueError, "{path} line 2: a bad record")),
    "a JSON array over several lines, after a BOM and spaces": (
        b'\xef\xbb\xbf \n[{"a": 1},\n {"b": 2}]\n', [("item 1", {"a": 1}), ("item 2", {"b": 2})]),
    "a JSON array holding a string": (b'[{"a": 1}, "b"]', (ValueError, "{path} item 2: expected a JSON object, got str")),
    "a JSON array cut short": (b'[{"a": 1},\n {"b"', (ValueError, "{path}: not valid JSON (Expecting ':' delimiter at "
                                                                 "line 2)")),
    "JSON Lines, gzipped": (gzip.compress(b'{"a": 1}\n\n{"b": 2}\n'), [("line 1", {"a": 1}), ("line 3", {"b": 2})]),
    "a JSON array, gzipped": (gzip.compress(b'[{"a": 1}]'), [("item 1", {"a": 1})]),
    "a gzip file cut short": (gzip.compress(b'{"a": 1}\n' * 1000)[:60], (ValueError, "{path}: not a whole gzip file")),
    "parquet, told by its first bytes": (b"PAR1\x15\x04", (ValueError, "--data {path}: PARQUET is not read here")),
    "no file": (None, (FileNotFoundError, "--data {path}: no such file; give a file of " + checkpoint.DATA_FORMATS)),
    "a folder": ("folder", (FileNotFoundError, "--data {path}: a folder, not a file; give a file of "
                            + checkpoint.DATA_FORMATS)),
}


@pytest.mark.parametrize("case", DATA_FILES)
def test_read_records_reads_each_object_with_where_it_is_or_names_the_file_and_line_at_fault(tmp_path, case):
    """JSON Lines: lines are counted from 1, blank ones included; blank lines (CRLF or spaces
    too) are skipped and a BOM is allowed on line 1 only. A file whose first character is
    "[" is one JSON array, its objects counted as items. Either may be gzipped, told by the
    first bytes, whatever the file's name. Every error names the file, and the line, the item
    or --data, and says what is wrong there."""
    content, expected = DATA_FILES[case]
    path = tmp_path / "pairs.jsonl"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    if isinstance(expected, list):
        assert checkpoint.read_records(path, read_each, "--data") == expected
    else:
        with pytest.raises(expected[0]) as err:
            checkpoint.read_records(path, read_each, "--data")
        assert type(err.value) is expected[0] and str(err.value).startswith(expected[1].format(path=path))
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("name, kind", [("pairs.csv", "CSV"), ("pairs.tsv", "CSV"), ("pairs.parquet", "PARQUET")])
def test_a_format_that_is_not_read_says_which_are_and_how_to_convert(tmp_path, name, kind):
    """CSV and parquet: one line naming the formats that are read and a command that converts."""
    path = tmp_path / name
    path.write_bytes(b"prompt,chosen,rejected\na,b,c\n")
    with pytest.raises(ValueError) as err:
        checkpoint.read_records(path, read_each, "--data")
    assert str(err.value) == (f"--data {path}: {kind} is not read here, only {checkpoint.DATA_FORMATS}. To convert: "
                              f"python -c \"import pandas as pd; pd.read_{kind.lower()}('{path}').to_json("
                              "'pairs.jsonl', orient='records', lines=True, force_ascii=False)\"")


def test_a_gzipped_file_is_read_a_line_at_a_time(tmp_path):
    """Memory bounded as for JSON Lines: a gzipped file is streamed, never read whole. Its second
    half is cut off here, which a reader that decompressed the whole file first would find
    before it parsed a single record; read line by line, the first record comes first (and
    the test's parse stops there)."""
    whole = gzip.compress(b"".join(b'{"n": %d}\n' % i for i in range(200_000)))
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(whole[:len(whole) // 2])

    def stop_at_the_first(record, where):
        raise ValueError(f"the first record, {record}")

    with pytest.raises(ValueError, match=r"line 1: the first record, \{'n': 0\}$"):
        checkpoint.read_records(path, stop_at_the_first, "--data")
    with pytest.raises(ValueError, match="not a whole gzip file"):  # read on, it is cut short
        checkpoint.read_records(path, lambda record, where: None, "--data")


# ---------------------------------------------------------------------------
# Downloading from the hub, against a fake hub on 127.0.0.1 (checkpoint.py, section 3,
# states how the real one answers).

COMMIT = "607a30d783dfa663caf39e06633721c8d4cfcd7e"  # the gpt2 commit many caches hold
REPO_DIR = "models--openai-community--gpt2"  # its folder in the hub cache


def git_blob_sha1(data):
    """The ETag the hub gives files stored in git (config.json): git's object id."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeHub:
    files: dict  # filename -> bytes
    repo: str = "openai-community/gpt2"  # where the files live; another name = a renamed repo
    truncate: bool = False  # the CDN promises the whole file, sends half, hangs up
    linked_etag: str = ""  # override X-Linked-Etag (a wrong sha256)
    no_linked_etag: bool = False  # a hub that states no sha256: only the size can catch a cut
    direct: bool = False  # a mirror that serves large files itself, 200 with a sha256 ETag
    config_etag: str = ""  # override config.json's ETag (a wrong git blob sha1)
    requests: list = field(default_factory=list)


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    """Answers like huggingface.co; HTTP/1.0, so every connection closes after one answer."""

    def do_HEAD(self):
        self.answer(send_body=False)

    def do_GET(self):
        self.answer(send_body=True)

    def log_message(self, *args):  # keep test output quiet
        pass

    def send(self, status, headers, body=b"", send_body=True):
        self.send_response(status)
        for key, value in {**headers, "Content-Length": headers.get("Content-Length", len(body))}.items():
            self.send_header(key, str(value))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def answer(self, send_body):
        hub = self.server.hub
        hub.requests.append((self.command, self.path))
        path = urllib.parse.urlsplit(self.path).path
        m = re.fullmatch(r"/(.+)/resolve/main/([^/]+)", path)
        if path.startswith("/cdn/") and path[5:] in hub.files:  # the CDN: its own, different ETag
            data = hub.files[path[5:]]
            headers = {"ETag": f'"{hashlib.sha256(b"cdn" + data).hexdigest()}"', "Content-Length": len(data)}
            self.send(200, headers, data[: len(data) // 2] if hub.truncate else data, send_body)
        elif m and m[1] != hub.repo:  # renamed repo: a relative redirect to the new hub path
            self.send(307, {"Location": f"/{hub.repo}/resolve/main/{m[2]}"})
        elif m and m[2] == "config.json":  # small file in git: 200 directly
            data = hub.files["config.json"]
            etag = hub.config_etag or git_blob_sha1(data)
            self.send(200, {"ETag": f'"{etag}"', "X-Repo-Commit": COMMIT}, data, send_body)
        elif m and m[2] in hub.files and hub.direct:  # a mirror: the bytes at once, sha256 as ETag
            data = hub.files[m[2]]
            etag = hub.linked_etag or hashlib.sha256(data).hexdigest()
            self.send(200, {"ETag": f'"{etag}"', "X-Repo-Commit": COMMIT}, data, send_body)
        elif m and m[2] in hub.files:  # LFS file: 302 to the CDN; the hub's facts only here
            data, port = hub.files[m[2]], self.server.server_address[1]
            cdn = f"http://localhost:{port}/cdn/{m[2]}?X-Amz-Signature=f00d"  # same server, another host name
            headers = {"Location": cdn, "X-Linked-Size": len(data), "X-Repo-Commit": COMMIT,
                       "X-Linked-Etag": f'"{hub.linked_etag or hashlib.sha256(data).hexdigest()}"'}
            if hub.no_linked_etag:
                del headers["X-Linked-Etag"]
            self.send(302, headers)
        else:
            self.send(404, {"X-Error-Code": "EntryNotFound"})


@contextlib.contextmanager
def serving(hub, monkeypatch):
    """Run the fake hub in a daemon thread with HF_ENDPOINT pointing at it; always shut it down."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHubHandler)
    server.hub = hub
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port_url():
    """A URL where nothing listens: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def files_under(root):
    """Every file and symlink below root, relative to it, sorted."""
    return sorted(str(Path(d, f).relative_to(root)) for d, _, fs in os.walk(root) for f in fs)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache at $HF_HOME/hub under tmp_path; no other hub setting leaks in."""
    for var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME", "HF_ENDPOINT",
                "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf" / "hub"


@pytest.fixture
def no_network(hub_cache, monkeypatch):
    """HF_ENDPOINT at a port where nothing listens: any download attempt fails at once."""
    url = closed_port_url()
    monkeypatch.setenv("HF_ENDPOINT", url)
    return url


@pytest.fixture
def tiny_repo(tiny, tiny_dir):
    """(params, config, files) of the tiny checkpoint in the hub layout, as the hub would serve it."""
    config, params = tiny
    files = {name: (tiny_dir / name).read_bytes() for name in ("config.json", "model.safetensors")}
    return params, config, files


@pytest.mark.parametrize("env, expected", [
    ({"HF_HUB_CACHE": "/a", "HF_HOME": "/b", "XDG_CACHE_HOME": "/c"}, "/a"),
    ({"HF_HOME": "/b", "XDG_CACHE_HOME": "/c"}, "/b/hub"),
    ({"XDG_CACHE_HOME": "/c"}, "/c/huggingface/hub"),
    ({"HOME": "/home/u"}, "/home/u/.cache/huggingface/hub"),
])
def test_hub_cache_dir_follows_huggingface_hub_precedence(monkeypatch, env, expected):
    """The same order huggingface_hub uses, so an existing cache is found and reused."""
    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert Path(hub_cache_dir()) == Path(expected)


def test_from_pretrained_gpt2_downloads_into_hub_cache_then_reuses_it_offline(hub_cache, tiny_repo, monkeypatch):
    """The cache after a download looks like huggingface_hub's (blob named by sha256,
    relative symlink, refs/main, files readable as open() makes them), and a second call
    needs no network at all."""
    params, config, files = tiny_repo
    with serving(FakeHub(files), monkeypatch) as hub:
        assert_matches_numpy(GPT.from_pretrained("gpt2"), params)
        assert any("/cdn/model.safetensors" in path for _, path in hub.requests)
        n_requests = len(hub.requests)
        GPT.from_pretrained("gpt2")
        assert len(hub.requests) == n_requests  # answered from the cache

    sha256, sha1 = hashlib.sha256(files["model.safetensors"]).hexdigest(), git_blob_sha1(files["config.json"])
    assert files_under(hub_cache) == sorted([
        f"{REPO_DIR}/blobs/{sha256}", f"{REPO_DIR}/blobs/{sha1}", f"{REPO_DIR}/refs/main",
        f"{REPO_DIR}/snapshots/{COMMIT}/config.json", f"{REPO_DIR}/snapshots/{COMMIT}/model.safetensors"])
    repo = hub_cache / REPO_DIR
    assert (repo / "refs" / "main").read_text().strip() == COMMIT
    assert (repo / "blobs" / sha256).read_bytes() == files["model.safetensors"]
    for name, blob in [("model.safetensors", sha256), ("config.json", sha1)]:
        assert os.readlink(repo / "snapshots" / COMMIT / name) == f"../../blobs/{blob}"
    for blob in (sha256, sha1):
        assert (repo / "blobs" / blob).stat().st_mode & 0o777 == 0o666 & ~current_umask()

    assert_matches_numpy(GPT.from_pretrained("gpt2"), params)  # server gone
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_matches_numpy(GPT.from_pretrained("gpt2"), params)


WRONG_SHA256 = hashlib.sha256(b"some other file").hexdigest()
CORRUPT = "the file is corrupt: its sha256 is {sha256} but the hub says " + WRONG_SHA256
CUT = "it stopped after {half} of {whole} bytes"
DOWNLOAD_FAULTS = {  # what goes wrong: (how the fake hub answers, None: nothing listens; what the error says)
    "nothing listening": (None, "Connection refused"),
    "cut short, sha256 stated": (dict(truncate=True), CUT),
    "cut short, only the size stated": (dict(truncate=True, no_linked_etag=True), CUT),
    "a sha256 that is not the file's": (dict(linked_etag=WRONG_SHA256), CORRUPT),
    "a mirror's sha256 ETag that is not the file's": (dict(direct=True, linked_etag=WRONG_SHA256), CORRUPT),
}


@pytest.mark.parametrize("fault", DOWNLOAD_FAULTS)
def test_failed_download_raises_connection_error_saying_what_and_keeps_nothing(hub_cache, tiny_repo, monkeypatch,
                                                                                fault):
    """A download that fails, or brings bytes that are not the file the hub describes, is a
    ConnectionError (an OSError, as a network failure is) naming the URL and what went wrong,
    and nothing is cached: a half or corrupt file must never look like a cached model.
    Without a stated sha256 only X-Linked-Size can tell a cut download from a whole one."""
    _, _, files = tiny_repo
    hub_options, problem = DOWNLOAD_FAULTS[fault]
    weights = files["model.safetensors"]
    problem = problem.format(half=len(weights) // 2, whole=len(weights), sha256=hashlib.sha256(weights).hexdigest())
    with contextlib.ExitStack() as stack:
        if hub_options is None:
            monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
        else:
            stack.enter_context(serving(FakeHub(files, **hub_options), monkeypatch))
        with pytest.raises(ConnectionError) as err:
            GPT.from_pretrained("gpt2")
    url = f"{os.environ['HF_ENDPOINT']}/openai-community/gpt2/resolve/main/model.safetensors"
    assert str(err.value).startswith(f"could not download {url}: ") and problem in str(err.value)
    assert files_under(hub_cache.parent) == []


def test_config_json_not_matching_its_git_blob_sha1_is_not_kept(hub_cache, tiny_repo, monkeypatch, capsys):
    """config.json's ETag is git's blob id of its bytes: a mismatch is reported and the file
    is not kept. The weights, already verified, stay; the known gpt2 config then stands in,
    which these tiny weights do not fit, so loading them fails."""
    _, _, files = tiny_repo
    with serving(FakeHub(files, config_etag=git_blob_sha1(b"another config")), monkeypatch), \
            pytest.raises(ValueError, match="missing tensor.*of the configured size"):
        GPT.from_pretrained("gpt2")
    assert "corrupt: its git blob sha1" in capsys.readouterr().err
    sha256 = hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert files_under(hub_cache) == sorted([f"{REPO_DIR}/blobs/{sha256}", f"{REPO_DIR}/refs/main",
                                             f"{REPO_DIR}/snapshots/{COMMIT}/model.safetensors"])


def test_a_whole_download_without_a_stated_sha256_goes_straight_into_the_snapshot(hub_cache, tiny_repo,
                                                                                   monkeypatch):
    """With no hash from the hub there is no blob name, and the CDN's own ETag must not be
    taken for one: the checked-by-size file is kept as a plain file in the snapshot."""
    params, _, files = tiny_repo
    with serving(FakeHub(files, no_linked_etag=True), monkeypatch):
        assert_matches_numpy(GPT.from_pretrained("gpt2"), params)
    weights = hub_cache / REPO_DIR / "snapshots" / COMMIT / "model.safetensors"
    assert not weights.is_symlink() and weights.read_bytes() == files["model.safetensors"]
    assert files_under(hub_cache / REPO_DIR / "blobs") == [git_blob_sha1(files["config.json"])]


def test_a_mirror_serving_files_directly_is_checked_by_its_sha256_etag(hub_cache, tiny_repo, monkeypatch):
    """HF_ENDPOINT may be a mirror that answers 200 with the bytes and a 64-hex ETag: that ETag
    is the sha256 to check (a wrong one is refused, above), and names the blob, while a 40-hex
    one is git's blob id."""
    params, _, files = tiny_repo
    with serving(FakeHub(files, direct=True), monkeypatch):
        assert_matches_numpy(GPT.from_pretrained("gpt2"), params)
    assert files_under(hub_cache / REPO_DIR / "blobs") == sorted([
        hashlib.sha256(files["model.safetensors"]).hexdigest(), git_blob_sha1(files["config.json"])])


@pytest.mark.parametrize("where", ["a file where the cache should be", "a full disk during the download"])
def test_a_cache_that_cannot_be_written_is_an_os_error_saying_where_and_what_to_set(tmp_path, hub_cache, tiny_repo,
                                                                                     monkeypatch, where):
    """Not the network's fault, so not a ConnectionError: an OSError naming the cache folder,
    the system's reason, and the variables that move the cache. A download cut by a full
    disk keeps nothing of what it had written."""
    _, _, files = tiny_repo
    with contextlib.ExitStack() as stack:
        if where == "a file where the cache should be":
            (tmp_path / "not-a-folder").write_text("")
            monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "not-a-folder" / "hub"))
            monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
            cache, reason = tmp_path / "not-a-folder" / "hub", os.strerror(errno.ENOTDIR)
        else:
            def disk_fills(response, f, url, expected_size):  # the disk is full after 100 bytes
                f.write(response.read(100))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            monkeypatch.setattr(checkpoint, "stream_to_file", disk_fills)
            stack.enter_context(serving(FakeHub(files), monkeypatch))
            cache, reason = hub_cache, os.strerror(errno.ENOSPC)
        with pytest.raises(OSError) as err:
            GPT.from_pretrained("gpt2")
    assert not isinstance(err.value, ConnectionError)
    assert str(err.value).startswith(f"cannot write to the Hugging Face cache at {cache / REPO_DIR} ({reason}); ")
    assert "HF_HUB_CACHE or HF_HOME" in str(err.value)
    assert files_under(hub_cache.parent) == []


def test_from_pretrained_follows_relative_redirect_of_renamed_repo(hub_cache, tiny_repo, monkeypatch):
    """A renamed repo answers 307 with a relative Location on the hub itself."""
    params, _, files = tiny_repo
    with serving(FakeHub(files, repo="openai-community/gpt2-renamed"), monkeypatch) as hub:
        model = GPT.from_pretrained("gpt2")
    assert any(path.startswith("/openai-community/gpt2-renamed/") for _, path in hub.requests)
    assert_matches_numpy(model, params)


@pytest.mark.parametrize("value", ["1", "on", "Yes", "TRUE"])
def test_offline_and_not_cached_raises_file_not_found_saying_where_to_put_it(hub_cache, no_network, monkeypatch,
                                                                             value):
    """Offline means no network, whichever way HF_HUB_OFFLINE says yes; the message says
    where in the cache the file should be."""
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    with pytest.raises(FileNotFoundError) as err:
        GPT.from_pretrained("gpt2")
    assert str(hub_cache / REPO_DIR / "snapshots" / "<commit>" / "model.safetensors") in str(err.value)


def test_existing_hub_cache_is_used_without_network_preferring_refs_main(tmp_path, hub_cache, no_network,
                                                                          tiny_repo):
    """A cache made by huggingface_hub is reused as is; of several snapshots, refs/main's wins."""
    params, config, files = tiny_repo
    stale = write_checkpoint(tmp_path / "stale", random_gpt2_params(config, seed=7), config)
    repo = hub_cache / REPO_DIR
    for commit, model_bytes in [("1" * 40, (stale / "model.safetensors").read_bytes()),
                                ("5" * 40, files["model.safetensors"]),
                                ("9" * 40, (stale / "model.safetensors").read_bytes())]:
        sha256 = hashlib.sha256(model_bytes).hexdigest()
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / sha256).write_bytes(model_bytes)
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "model.safetensors").symlink_to(f"../../blobs/{sha256}")
        (repo / "snapshots" / commit / "config.json").write_bytes(files["config.json"])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("5" * 40)
    assert_matches_numpy(GPT.from_pretrained("gpt2"), params)


def test_cache_under_the_old_gpt2_repo_name_is_reused(hub_cache, no_network, tiny_repo):
    """transformers' from_pretrained("gpt2") cached it as models--gpt2 (before the rename to
    openai-community/gpt2); that copy is found too, with no network."""
    params, _, files = tiny_repo
    snapshot = hub_cache / "models--gpt2" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)  # copies, as on systems without symlinks
    assert_matches_numpy(GPT.from_pretrained("gpt2"), params)


@needs_cuda
def test_model_on_cuda_matches_numpy_gpt2_and_decodes_the_same_tokens(tiny, tiny_dir):
    """The GPU path loads onto the GPU and computes the same GPT-2 as the numpy forward pass,
    to float32 rounding (PyTorch keeps TF32 off for float32 matmuls unless asked)."""
    config, params = tiny
    model = GPT.from_pretrained(str(tiny_dir), device="cuda")
    assert all(p.is_cuda for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight  # .to("cuda") kept the tie
    idx = random_tokens()
    with torch.no_grad():
        logits = model(torch.as_tensor(idx, device="cuda")).double().cpu().numpy()
    np.testing.assert_allclose(logits, numpy_logits(params, config["n_head"], idx), rtol=0, atol=1e-4)
    prompt = random_tokens(B=2, T=5)
    out = model.generate(torch.as_tensor(prompt, device="cuda"), max_new_tokens=10, temperature=0)
    for row, p in zip(out.tolist(), prompt):
        assert row == numpy_greedy(params, config["n_head"], p, 10)


# ---------------------------------------------------------------------------
# Cross-checks with Hugging Face's own libraries. The project never needs them and CI does
# not install them; where they are installed, these check the hand-written safetensors code
# and the weight mapping against the implementations everyone else uses.

def test_safetensors_library_reads_our_files_and_we_read_its_files(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="cross-check needs the safetensors package")
    tensors = {"f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 3).bfloat16(),
               "f64": torch.randn(2, dtype=torch.float64), "i64": torch.tensor([1, -2, 2**40]),
               "i8": torch.tensor([-128, 127, -1], dtype=torch.int8), "bool": torch.tensor([True, False])}
    save_safetensors(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt", "note": "x"})
    theirs = safetensors_torch.load_file(str(tmp_path / "ours.safetensors"))
    assert set(theirs) == set(tensors)
    assert all(theirs[k].dtype == t.dtype and torch.equal(theirs[k], t) for k, t in tensors.items())
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}

    safetensors_torch.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    ours = load_safetensors(tmp_path / "theirs.safetensors")
    assert set(ours) == set(tensors)
    assert all(ours[k].dtype == t.dtype and torch.equal(ours[k], t) for k, t in tensors.items())


def transformers_gpt2():
    """A GPT2LMHeadModel of TINY's shape with weights far from their initialisation."""
    transformers = pytest.importorskip("transformers", reason="cross-check needs the transformers package")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).eval()
    with torch.no_grad():
        for p in hf.parameters():  # non-trivial layer norms and biases too
            p.normal_(0.0, 0.3)
    return transformers, hf


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(torch.as_tensor(idx)).logits.double().numpy()


def test_transformers_gpt2_checkpoint_loads_with_the_same_logits(tmp_path):
    """transformers' own save_pretrained output (its real layout, not our imitation of it)
    loads here, and this GPT-2 computes transformers' GPT-2 logits."""
    _, hf = transformers_gpt2()
    hf.save_pretrained(tmp_path / "hf")
    model = GPT.from_pretrained(str(tmp_path / "hf"))
    idx = random_tokens()
    np.testing.assert_allclose(model_logits(model, idx), hf_logits(hf, idx), rtol=0, atol=1e-4)


def test_transformers_gpt2_loads_what_save_pretrained_writes(tmp_path):
    """The other way: transformers reads save_pretrained's hub-layout files as GPT-2."""
    transformers, hf = transformers_gpt2()
    hf.save_pretrained(tmp_path / "hf")
    GPT.from_pretrained(str(tmp_path / "hf")).save_pretrained(tmp_path / "ours")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    idx = random_tokens()
    np.testing.assert_array_equal(hf_logits(again, idx), hf_logits(hf, idx))


# ---------------------------------------------------------------------------
# GPT-2's tokenizer files as Hugging Face reads them (checkpoint.py, section 5): vocab.json,
# merges.txt and tokenizer_config.json, derived from tiktoken's GPT-2 encoding. They are
# checked against what does not share their derivation: a GPT-2 BPE encoder written here in
# the style of OpenAI's original encoder.py, which reads nothing but the two files and must
# tokenize real text exactly as tiktoken does; tiktoken's own token bytes; the sha256 of
# GPT-2's original encoder.json and vocab.bpe; and, where it is installed, transformers'
# AutoTokenizer.

# A few paragraphs of ordinary text: punctuation, numbers, contractions, newlines, runs of
# spaces, a tab, and bytes beyond ASCII (accents, the euro sign, an em dash, an emoji).
TEXT = (
    "The café on Rue Cler opened in 1987, and it hasn't changed much since: the same  six tables,\n"
    "the same chalkboard menu (€4.50 for a croissant and coffee), the same owner—a naïve optimist,\n"
    "by his own account.\n"
    "\n"
    "\"We'll see,\" he says, when asked whether he'd ever sell. \"I've said no 3 times; they'll ask\n"
    "again in 2025, and I'm sure they'd pay 1,250,000 euros for it.\" He laughs 😀 and pours.\n"
    "\n"
    "   Indented by three spaces, with a tab\there, and two trailing spaces  \n"
    "End of story... or is it? 42% of regulars say it isn't!\n"
)

# The sha256 of GPT-2's original files, as tiktoken checks them when it downloads them
# (tiktoken_ext/openai_public.py); vocab.json and merges.txt are those files under their hub names.
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


@pytest.fixture(scope="module")
def enc():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def folder(enc, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2-tokenizer")
    checkpoint.save_gpt2_tokenizer(folder)
    return folder


# -----------------------------------------------------------------------------
# An independent GPT-2 encoder, in the style of OpenAI's encoder.py, built from the files alone

# GPT-2's pre-tokenizer: text is cut into words (with their leading space), numbers,
# punctuation runs and whitespace before BPE sees it; no merge crosses these cuts.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode():
    """encoder.py's table: printable Latin-1 bytes stand for themselves, the others are moved
    to chr(256 + n), so that every byte is a visible character in the files."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Encoder:
    def __init__(self, folder, regex):
        self.encoder = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        self.decoder = {i: s for s, i in self.encoder.items()}
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        self.bpe_ranks = {tuple(line.split(" ")): rank for rank, line in enumerate(lines[1:-1])}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.pattern = regex.compile(GPT2_PATTERN)

    def bpe(self, word):
        """Merge the lowest-ranked adjacent pair, every occurrence of it, until no pair is a merge."""
        word = tuple(word)
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:]))
            first, second = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if (first, second) not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text):
        ids = []
        for piece in self.pattern.findall(text):
            chars = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[part] for part in self.bpe(chars))
        return ids

    def decode_bytes(self, ids):
        return b"".join(bytes(self.byte_decoder[c] for c in self.decoder[i]) for i in ids)


@pytest.fixture(scope="module")
def encoder(folder):
    regex = pytest.importorskip("regex", reason="the 'regex' module (for GPT-2's \\p{L} pattern) is not installed")
    return Encoder(folder, regex)


def test_an_encoder_built_from_the_files_alone_tokenizes_text_exactly_as_tiktoken(encoder, enc):
    """OpenAI's BPE loop, fed only vocab.json and merges.txt, gives tiktoken's ids for real text:
    the merges it needs are there, in the right order, and each token has the right id."""
    ids = encoder.encode(TEXT)
    assert ids == enc.encode(TEXT)
    assert len(ids) > 150  # many merges took part, not a few single bytes
    assert encoder.decode_bytes(ids).decode("utf-8") == TEXT


def test_every_token_id_decodes_through_the_files_to_tiktokens_bytes(encoder, enc):
    """vocab.json and bytes_to_unicode give each of the 50,257 ids tiktoken's bytes back,
    <|endoftext|> (50256) included."""
    ours = [encoder.decode_bytes([i]) for i in range(50257)]
    assert ours == [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab)]


def test_bpe_makes_every_token_from_its_own_bytes(encoder, enc):
    """Each of the 50,000 merged tokens, BPE'd alone with the files' merges, becomes that one
    token: no merge is missing, and each is listed after the merges that make its two parts
    (text uses only some tokens; this reaches them all)."""
    unmade = []
    for i in range(256, enc.eot_token):
        chars = "".join(encoder.byte_encoder[b] for b in enc.decode_single_token_bytes(i))
        if encoder.bpe(chars) != (chars,):
            unmade.append(i)
    assert unmade == [], f"{len(unmade)} tokens are not made by BPE, the first {unmade[:5]}"


# -----------------------------------------------------------------------------
# The files' shapes, and their bytes


def test_vocab_json_holds_50257_tokens_with_endoftext_last(folder, enc):
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 50257 == enc.n_vocab
    assert sorted(vocab.values()) == list(range(50257))
    assert vocab["<|endoftext|>"] == 50256 == enc.eot_token
    assert vocab["Ġthe"] == enc.encode(" the")[0]  # a space is written 'Ġ'


def test_merges_txt_lists_50000_merges_in_rank_order(folder, enc):
    """After '#version: 0.2', merge k joins two tokens of lower id into the token of id 256 + k.
    The first merges are GPT-2's well-known ones; each of the first 25 is also the only way to
    split tiktoken's token 256 + k into two tokens of lower rank, which tiktoken confirms."""
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2" and lines[-1] == ""
    merges = [line.split(" ") for line in lines[1:-1]]
    assert len(merges) == 50000 and all(len(parts) == 2 for parts in merges)
    assert lines[1:8] == ["Ġ t", "Ġ a", "h e", "i n", "r e", "o n", "Ġt he"]

    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert all(vocab[a + b] == 256 + k and vocab[a] < 256 + k and vocab[b] < 256 + k
               for k, (a, b) in enumerate(merges))

    def is_token_before(part, rank):
        try:
            return enc.encode_single_token(part) < rank
        except KeyError:  # not a token at all
            return False

    printable = bytes_to_unicode()
    for k in range(25):
        token = enc.decode_single_token_bytes(256 + k)
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if is_token_before(token[:i], 256 + k) and is_token_before(token[i:], 256 + k)]
        assert len(splits) == 1, f"token {256 + k} {token!r} has more than one split"
        assert merges[k] == ["".join(printable[b] for b in part) for part in splits[0]]


def test_the_files_are_gpt2s_original_encoder_json_and_vocab_bpe_byte_for_byte(folder):
    """vocab.json and merges.txt are the files GPT-2 was released with, and that the hub's gpt2
    repo serves: their sha256 are the ones tiktoken checks GPT-2's downloads against."""
    assert hashlib.sha256((folder / "vocab.json").read_bytes()).hexdigest() == ENCODER_JSON_SHA256
    assert hashlib.sha256((folder / "merges.txt").read_bytes()).hexdigest() == VOCAB_BPE_SHA256


def test_a_merge_is_the_split_bpe_makes_not_any_split_into_two_tokens():
    """'abc' splits into two earlier tokens both as ab+c and as a+bc; the merge that makes it is
    the one BPE reaches by merging the lowest-ranked pair first (ranks of 'ab' and 'bc' swapped)."""
    assert checkpoint.bpe_parts(b"abc", {b"ab": 256, b"bc": 257, b"abc": 258}, 258) == [b"ab", b"c"]
    assert checkpoint.bpe_parts(b"abc", {b"bc": 256, b"ab": 257, b"abc": 258}, 258) == [b"a", b"bc"]


def test_saving_writes_the_three_files_and_leaves_the_rest_of_the_folder_alone(folder, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not ours")
    (tmp_path / "vocab.json").write_text("an older vocab.json")
    checkpoint.save_gpt2_tokenizer(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "merges.txt", "model.safetensors", "tokenizer_config.json", "vocab.json"]
    assert (tmp_path / "model.safetensors").read_bytes() == b"not ours"
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes()
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2Tokenizer"


def test_a_tokenizer_that_cannot_load_says_in_one_line_how_to_provide_its_files(monkeypatch):
    """Offline without tiktoken's cached files: one line naming the two files and
    TIKTOKEN_CACHE_DIR, instead of the HTTP library's message."""
    tiktoken = pytest.importorskip("tiktoken")

    def offline(name):
        raise ConnectionError("HTTPSConnectionPool(host='example.invalid', port=443): Max retries exceeded")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/no/such/folder")
    with pytest.raises(OSError) as error:
        checkpoint.load_gpt2_encoding()
    message = str(error.value)
    assert "\n" not in message and "HTTPSConnectionPool" not in message
    assert "vocab.bpe and encoder.json" in message and "TIKTOKEN_CACHE_DIR" in message and "/no/such/folder" in message


# -----------------------------------------------------------------------------
# transformers, where it is installed


def test_transformers_loads_the_folder_and_tokenizes_as_tiktoken(folder, enc):
    """AutoTokenizer.from_pretrained on a folder that holds only the three files (no config.json,
    no tokenizer.json) builds GPT-2's tokenizer: tiktoken's ids, the text back, GPT-2's
    special token and context length."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (optional)")
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer(TEXT)["input_ids"]
    assert ids == enc.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 50256
    assert tokenizer.model_max_length == 1024
