"""
The bytes: every file this project reads or writes, and nothing about GPT.

1. Atomic writes. A file, or a whole folder of files, is replaced as one unit, and what
   survives a process killed at any moment is stated where it is done. Then what is written
   that way: JSON files, torch.save's files, and a run's folder, checked before the run.
2. The .safetensors format, read and written by hand: tensors in, tensors out, and
   nothing is ever unpickled.
3. The Hugging Face hub: the standard cache that transformers users already have, and a
   download checked by its size and hash before anything is kept.
4. Data files: JSON Lines and JSON arrays, gzipped or not, as preference data sets and a
   run's metrics come.
5. GPT-2's tokenizer: tiktoken's encoding loaded, and its files as Hugging Face reads them
   (vocab.json, merges.txt, tokenizer_config.json), derived offline from it.

model.py uses 1 to 3 for GPT-2's checkpoints (config.json, the weights, the hub) and 5 to
save the tokenizer beside them; train.py and train_toy.py use 1 for the run folder (--out:
run.json, the policy, metrics.jsonl, and what --resume needs) and 5 for the tokenizer;
train.py and sample.py use 4 for the data files, and train.py for metrics.jsonl on --resume.
Read model.py and dpo.py first: this file is for when you want to know how the bytes move.
"""

import functools
import gzip
import hashlib
import http.client
import json
import math
import os
import pickle
import re
import secrets
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

import torch

# -----------------------------------------------------------------------------
# 1. Atomic writes
#
# Everything is written under a temporary name beside its target and renamed into place
# once complete. A rename within one folder is atomic: the name holds the old contents or
# the new ones, never a mix. fsync before the rename puts the bytes on disk first, so that
# a power cut cannot leave a complete-looking name over missing bytes.


def unused_sibling(path, suffix):
    """.NAME.XXXXXXXX.suffix beside path (the same folder, so that renames stay atomic)."""
    while True:
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.{suffix}")
        if not os.path.lexists(candidate):
            return candidate


def fsync(path):
    """Wait until path's bytes (a file's, or a folder's list of names) are on the disk."""
    if os.name != "posix" and Path(path).is_dir():
        return  # only POSIX systems can open a folder for this
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path, write):
    """Make the file `path` by calling write(tmp), then renaming tmp into its place.

    write(tmp) gets a fresh name in path's folder and creates the file there (open(tmp, "wb")
    gives it the usual permissions). path holds its old bytes or the new ones, never part of
    either, whenever the process dies. On any exception, KeyboardInterrupt too, tmp is
    removed, path is left as it was, and the exception goes on."""
    path = Path(path)
    tmp = unused_sibling(path, "tmp")
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)  # a file, or the symlink link_or_move makes; write must not make a folder
        raise
    fsync(path.parent)


def save_json(value, path):
    """value as indented JSON text, atomically (config.json)."""
    text = json.dumps(value, indent=2)
    write_atomically(path, lambda tmp: tmp.write_text(text))


def load_json(path):
    try:
        return json.loads(Path(path).read_bytes())  # JSON is UTF-8, whatever the machine's locale
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def is_ours(name, names):
    """A file `names` lists, or write_atomically's temporary file for one of them."""
    return name in names or any(re.fullmatch(rf"\.{re.escape(n)}\.[0-9a-f]{{8}}\.tmp", name) for n in names)


def remove_ours(folder, names):
    """Delete the files of `names` in folder (is_ours), then the folder if that emptied it.
    Nothing else is deleted: a warning names what else is there, and it is returned ([] once
    the folder is gone)."""
    others = []
    for entry in Path(folder).iterdir():
        if is_ours(entry.name, names) and not entry.is_dir():
            entry.unlink()
        else:
            others.append(entry.name)
    if not others:
        Path(folder).rmdir()
    else:
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        print(f"warning: left {folder} in place: it holds {', '.join(sorted(others)[:3])}{more}, which this "
              "project did not write", file=sys.stderr)
    return others


def replace_folder(path, write, names, replaced=lambda: None):
    """Make the folder `path` hold what write(tmp) writes into a new, empty folder tmp, as one unit.

    write(tmp) may create only the files that `names` lists. Guarantees, for a process
    killed at any moment, power cut included:
    - path holds all of its old files or all of the new ones, never a mix. For one moment,
      between two renames, path is missing and its old files wait, whole, in the folder
      .NAME.XXXXXXXX.old beside it; clean_leftovers, which the next run calls first, puts
      them back.
    - Nothing is deleted but files of `names` inside tmp or the old folder, and those two
      folders once empty. Anything else that was in path is never deleted: it stays in the
      old folder, and a warning says where.
    On an exception before the new folder is in place (Ctrl-C, a full disk) tmp is removed,
    path is as it was, and the exception goes on. replaced() is called the moment the new
    folder is in place: an exception after it (while the old folder is emptied) goes on with
    path holding the new files, and leaves the old folder for clean_leftovers."""
    path = Path(path).resolve()  # a symlink's target is replaced, not the link
    if os.path.lexists(path) and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a folder: refusing to replace it with one")
    tmp, old = unused_sibling(path, "tmp"), None
    try:
        tmp.mkdir()
        write(tmp)
        for file in tmp.iterdir():
            fsync(file)
        fsync(tmp)
        if os.path.lexists(path):
            old = unused_sibling(path, "old")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not os.path.lexists(path):
            os.replace(old, path)
            old = None
        if tmp.is_dir():
            remove_ours(tmp, names)
        raise
    replaced()
    fsync(path.parent)
    if old is not None:
        remove_ours(old, names)


def clean_leftovers(path, names):
    """Finish what a replace_folder killed half-way left beside path: if path is missing, its
    old folder goes back in its place; other .NAME.XXXXXXXX.tmp and .old folders are removed
    as replace_folder would have removed them (remove_ours: files of `names` only)."""
    path = Path(path).resolve()
    leftover = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{8}}\.(tmp|old)")
    if not path.parent.is_dir():
        return
    for entry in sorted(path.parent.iterdir()):
        match = leftover.fullmatch(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir():
            continue
        if match[1] == "old" and not os.path.lexists(path):
            os.replace(entry, path)  # killed between the two renames: the old folder comes back
            continue
        remove_ours(entry, names)


def prepare_run_folder(path, names, option):
    """For a run that will save its files (names) into the folder path with replace_folder:
    finish what a killed save left beside it (clean_leftovers), then try now, not after hours
    of training, what a save will do there: create a folder beside it. Returns the folders it
    created above path, outermost first: remove_empty_folders takes them away again if the
    run fails before its first save."""
    path = Path(path).resolve()
    clean_leftovers(path, names)
    if os.path.ismount(path):
        raise ValueError(f"{option} is a mount point, which a save cannot replace as a whole; give a folder inside it")
    created = [folder for folder in reversed(path.parents) if not folder.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = unused_sibling(path, "tmp")
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        remove_empty_folders(created)
        raise OSError(f"{option}: cannot write in {path.parent} ({e.strerror or e})") from None
    return created


def remove_empty_folders(folders):
    """Remove the folders (outermost first) that prepare_run_folder created, innermost first,
    as long as they are empty: a run that failed leaves no trace of itself."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:  # not empty (a save landed in it, or someone else's file), or already gone
            return


def refuse_others(path, names, is_marked, option):
    """The names in the folder path ([] if it is missing), if it is ours to replace: it holds
    nothing but files of `names`, and is_marked(path) says that their contents are ours
    (someone else's folder may hold files of the same names). Otherwise a ValueError names up
    to three of what is there."""
    found = sorted(p.name for p in Path(path).iterdir()) if Path(path).is_dir() else []
    others = [name for name in found if name not in names] or ([] if not found or is_marked(path) else found)
    if others:
        raise ValueError(f"{option} holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}, which this "
                         "project did not write. It only ever replaces its own output: give a new or empty folder")
    return found


def save_folder(path, write, names, replaced=lambda: None):
    """replace_folder, its parent created first; an OSError says that path is as it was."""
    try:
        Path(path).absolute().parent.mkdir(parents=True, exist_ok=True)
        replace_folder(path, write, names, replaced)
    except OSError as e:
        raise OSError(f"could not save to {path} ({e.strerror or e}); it is as it was before this save") from None


def save_state(state, path):
    """torch.save, atomically, of tensors and plain values only (what load_state reads)."""
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def load_state(path, option):
    """torch.load with weights_only=True: tensors, numbers, strings, lists and dicts, and
    nothing else is ever unpickled."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, KeyError):  # another kind of file, or one that holds more than that
        why = "not a torch.save file of tensors and plain values"
    except (RuntimeError, EOFError, ValueError) as e:  # cut short, or empty
        why = str(e).splitlines()[0] if str(e) else "empty"
    raise ValueError(f"{option}: {path} cannot be read ({why})")


# -----------------------------------------------------------------------------
# 2. The .safetensors format, by hand
#
# [8 bytes: N, little-endian u64][N bytes: JSON header][data bytes]
# The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]},
# offsets relative to the start of the data, plus an optional "__metadata__" of strings
# ({"format": "pt"} in GPT-2's files). Tensors are stored row-major, little-endian, and
# tile the data exactly: no gaps, no overlaps, nothing after the last one.
#
# Never assume the data is aligned: the hub's gpt2 model.safetensors has a header of
# N = 14,283 bytes, so its data starts at byte 14,291, which is not a multiple of 8 (an
# old writer that did not pad). Each tensor's bytes are copied into a fresh tensor instead
# of being viewed in place.

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the reference implementation's bound: refuse absurd headers


def read_safetensors_header(f, path, file_size):
    """Parse and check the header; returns (tensor entries sorted by offset, data start)."""
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
    header.pop("__metadata__", None)
    entries = []
    for name, info in header.items():
        dtype = info.get("dtype") if isinstance(info, dict) else info
        if dtype not in SAFETENSORS_DTYPES:
            raise bad(f"tensor '{name}' has unknown dtype {dtype!r} (known: {', '.join(SAFETENSORS_DTYPES)})")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise bad(f"tensor '{name}' has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise bad(f"tensor '{name}' has invalid data_offsets {offsets!r}")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"tensor '{name}' spans {offsets[1] - offsets[0]} bytes but its {dtype} shape {shape} needs {nbytes}")
        entries.append((offsets[0], offsets[1], name, dtype, shape))
    entries.sort()
    data_size, expected_begin = file_size - 8 - n, 0
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
    return entries, 8 + n


def load_safetensors(path):
    """Read a .safetensors file into a dict of CPU tensors."""
    path = Path(path)
    tensors = {}
    with open(path, "rb") as f:
        entries, data_start = read_safetensors_header(f, path, os.fstat(f.fileno()).st_size)
        for begin, end, name, dtype, shape in entries:
            t = torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype])  # fresh, so aligned
            f.seek(data_start + begin)
            if f.readinto(t.view(-1).view(torch.uint8).numpy()) != end - begin:
                raise ValueError(f"{path}: tensor '{name}' is cut short (truncated file?)")
            tensors[name] = t
    return tensors


def save_safetensors(tensors, path, metadata=None):
    """Write a dict of str -> tensor as a .safetensors file, atomically (write_atomically)."""
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise ValueError(f"save_safetensors needs a dict of str -> torch.Tensor; got {name!r} -> {type(t).__name__}")
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor '{name}' has dtype {t.dtype}, which .safetensors cannot store here")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map strings to strings")
    header, offset = ({"__metadata__": dict(metadata)} if metadata else {}), 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # pad with spaces so that the data starts 8-byte aligned

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            for t in tensors.values():
                f.write(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy())  # no extra copy

    write_atomically(path, write)


# -----------------------------------------------------------------------------
# 3. The Hugging Face hub: reuse the standard cache, else download
#
# transformers and huggingface_hub keep downloads in $HF_HUB_CACHE, else $HF_HOME/hub, else
# $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub, laid out as
#   models--openai-community--gpt2/blobs/<etag>       the bytes, named by the hub's ETag
#   models--openai-community--gpt2/refs/main          a text file holding the commit sha
#   models--openai-community--gpt2/snapshots/<commit>/model.safetensors -> ../../blobs/<etag>
# (a relative symlink; a copy of the file where symlinks are not possible). A repo that was
# renamed (gpt2 became openai-community/gpt2) may be cached under its old name. The
# network is off when HF_HUB_OFFLINE (or the legacy TRANSFORMERS_OFFLINE), upper-cased, is
# 1, ON, YES or TRUE.
#
# The hub serves {HF_ENDPOINT or https://huggingface.co}/{repo}/resolve/main/{filename}:
# - small files kept in git (config.json) answer 200 with the bytes; their ETag is the git
#   blob sha1 (40 hex) of the content, not a sha256;
# - large files (model.safetensors) answer 302 to a signed URL on a CDN host. The hub's facts
#   are only on that 302: X-Linked-Etag (the quoted sha256 of the content, 64 hex),
#   X-Linked-Size (bytes) and X-Repo-Commit. The CDN's answer has none of them, and its own
#   ETag is a different 64-hex value that must never be checked against the content;
# - a renamed repo answers with a relative redirect to its new path on the hub;
# - a mirror (HF_ENDPOINT) may serve large files directly: 200 and a sha256 ETag.
# urllib would follow redirects silently and lose the 302's headers, so they are followed
# by hand.


def hub_cache_dir():
    for variable, below in (("HF_HUB_CACHE", ()), ("HF_HOME", ("hub",)), ("XDG_CACHE_HOME", ("huggingface", "hub"))):
        if os.environ.get(variable):
            return Path(os.environ[variable], *below)
    return Path.home() / ".cache" / "huggingface" / "hub"


def hub_offline():
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def repo_cache_dir(repo):
    return hub_cache_dir() / ("models--" + repo.replace("/", "--"))


def cached_snapshot(repo, filename):
    """The cached snapshot folder of repo holding filename, preferring the one refs/main names."""
    repo_dir = repo_cache_dir(repo)
    candidates = []
    if (repo_dir / "refs" / "main").is_file():
        candidates.append(repo_dir / "snapshots" / (repo_dir / "refs" / "main").read_text().strip())
    if (repo_dir / "snapshots").is_dir():
        candidates += sorted((repo_dir / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for snapshot in candidates:
        if (snapshot / filename).is_file():  # is_file follows the symlink: a dangling one fails
            return snapshot
    return None


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """Hand redirects back instead of following them, so that their headers can be read."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def open_url(url, follow_redirects):
    opener = urllib.request.build_opener(*([] if follow_redirects else [NoRedirects]))
    try:
        return opener.open(urllib.request.Request(url, headers={"User-Agent": "dpo-reference/1.0"}), timeout=30)
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400 and not follow_redirects:
            return e  # a redirect: its headers and Location are what we asked for
        raise


def ask_hub(url):
    """Follow the hub's own redirects (a renamed repo) by hand, collecting what the hub states
    about the file; returns (the answer carrying the bytes, {sha256, etag, size, commit})."""
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
    raise ConnectionError(f"{url}: more than 10 redirects")


def stated_hash(stated, key, length):
    """A hex digest the hub stated, unquoted, or None when it stated none of that length."""
    value = (stated.get(key) or "").removeprefix("W/").strip('"').lower()
    return value if re.fullmatch(f"[0-9a-f]{{{length}}}", value) else None


def git_blob_sha1(path):
    """The hub names small files by their git blob id: sha1("blob <size>\\0" + bytes)."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def download_failed(url, problem):
    return ConnectionError(f"could not download {url}: {problem}; nothing was kept. Check the network "
                           "(or HF_ENDPOINT) and run again")


def stream_to_file(response, f, url, expected_size):
    """Copy the body to f with a progress line; returns (bytes written, sha256 hex)."""
    sha256, done, start, last_print = hashlib.sha256(), 0, time.time(), 0.0
    name = url.rsplit("/", 1)[-1]
    while True:
        try:
            chunk = response.read(1 << 20)
        except (OSError, http.client.HTTPException) as e:  # a timeout, or a connection cut mid-answer
            raise download_failed(url, getattr(e, "reason", None) or repr(e)) from None
        if not chunk:
            break
        f.write(chunk)
        sha256.update(chunk)
        done += len(chunk)
        now = time.time()
        if now - last_print > 0.5 or done == expected_size:
            total = f" / {expected_size / 1e6:.1f}" if expected_size else ""
            rate = done / 1e6 / max(now - start, 1e-9)
            print(f"\r  {name}: {done / 1e6:.1f}{total} MB ({rate:.1f} MB/s)", end="", file=sys.stderr, flush=True)
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
    """Download one file of `repo` into the hub cache, checked; returns the commit sha.

    The blob is named, as huggingface_hub names it, by the hash the hub states (the sha256 of
    a large file, the git blob sha1 of a small one), and is renamed into place only once its
    size and that hash check out. A hub that states no hash gets the file straight into the
    snapshot, checked by its size alone."""
    url = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/{repo}/resolve/main/{filename}"
    repo_dir = repo_cache_dir(repo)

    def unwritable(e):
        return OSError(f"cannot write to the Hugging Face cache at {repo_dir} ({e.strerror or e}); point "
                       "HF_HUB_CACHE or HF_HOME at a folder you can write to, with space to spare")

    try:
        (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)  # before the network: fail early
    except OSError as e:
        raise unwritable(e) from None
    print(f"downloading {url}", file=sys.stderr)
    try:
        response, stated = ask_hub(url)
    except (OSError, http.client.HTTPException) as e:  # URLError, refused connections and timeouts are OSErrors
        raise download_failed(url, getattr(e, "reason", None) or repr(e)) from None
    commit, size = stated.get("commit") or "main", int(stated["size"]) if "size" in stated else None
    # a plain ETag is git's blob id for small files, or a sha256 where a mirror serves large
    # files directly (never the CDN's ETag: ask_hub does not record it)
    sha256 = stated_hash(stated, "sha256", 64) or stated_hash(stated, "etag", 64)
    sha1 = None if sha256 else stated_hash(stated, "etag", 40)

    def download_and_check(tmp):
        with open(tmp, "wb") as f:
            done, got_sha256 = stream_to_file(response, f, url, size)
        if size is not None and done != size:
            raise download_failed(url, f"it stopped after {done} of {size} bytes (connection dropped?)")
        if sha256 and got_sha256 != sha256:
            raise download_failed(url, f"the file is corrupt: its sha256 is {got_sha256} but the hub says {sha256}")
        if sha1 and git_blob_sha1(tmp) != sha1:
            raise download_failed(url, f"the file is corrupt: its git blob sha1 is not the hub's {sha1}")

    snapshot_file = repo_dir / "snapshots" / commit / filename
    target = repo_dir / "blobs" / (sha256 or sha1) if (sha256 or sha1) else snapshot_file
    try:
        with response:
            target.parent.mkdir(parents=True, exist_ok=True)  # the snapshot folder, without a hash
            write_atomically(target, download_and_check)
        if target != snapshot_file:  # a blob: the snapshot links to it
            snapshot_file.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(snapshot_file, lambda tmp: link_or_move(target, tmp))
        (repo_dir / "refs").mkdir(exist_ok=True)
        write_atomically(repo_dir / "refs" / "main", lambda tmp: tmp.write_text(commit))
    except ConnectionError:
        raise
    except OSError as e:  # not the network: the disk
        raise unwritable(e) from None
    return commit


def hub_snapshot(repo, also_cached_as=()):
    """A local snapshot folder of `repo` holding model.safetensors: the cached one (under repo
    or an older name of it), else downloaded into the cache, the weights first and then
    config.json, which may fail without losing the weights (the caller then does without)."""
    for cached_repo in (repo, *also_cached_as):
        snapshot = cached_snapshot(cached_repo, "model.safetensors")
        if snapshot is not None:
            return snapshot
    if hub_offline():
        where = repo_cache_dir(repo) / "snapshots" / "<commit>" / "model.safetensors"
        raise FileNotFoundError(f"{repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set, so it will "
                                f"not be downloaded. Put the file at {where} (with refs/main naming <commit>)")
    commit = download_to_cache(repo, "model.safetensors")
    try:
        download_to_cache(repo, "config.json")
    except ConnectionError as e:
        print(f"warning: {e}", file=sys.stderr)
    return repo_cache_dir(repo) / "snapshots" / commit


# -----------------------------------------------------------------------------
# 4. Data files: JSON Lines and JSON arrays, gzipped or not
#
# Preference data sets come as JSON Lines (one object a line: the HH-RLHF files, a Hugging
# Face data set's to_json), as one JSON array of objects, and gzipped. Other formats are
# refused with a way to convert them.

DATA_FORMATS = "JSON Lines (one object a line) or one JSON array of objects (.json), either of them gzipped"
CONVERT = ("python -c \"import pandas as pd; pd.read_{kind}('{path}').to_json('pairs.jsonl', orient='records', "
           "lines=True, force_ascii=False)\"")


def save_jsonl(records, path):
    """A list of JSON objects, one a line, atomically."""
    write_atomically(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in records)))


def json_objects(f, path):
    """(where, object) for each object in the open binary file f: "line N" of JSON Lines, read a
    line at a time, or "item N" of one JSON array (told by its first character). Blank lines
    are skipped and a UTF-8 BOM (a Windows editor's) is allowed."""
    if f.peek(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        try:
            items = json.loads(f.read().decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        yield from ((f"item {number}", item) for number, item in enumerate(items, start=1))
        return
    for number, line in enumerate(f, start=1):
        try:
            text = line.decode("utf-8").removeprefix("\ufeff" if number == 1 else "")
            if text.strip():
                yield f"line {number}", json.loads(text)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} line {number}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number}: not valid JSON ({e.msg})") from None


def read_records(path, parse, option):
    """[parse(record, where) for each JSON object of a data file] (json_objects), gzipped or
    not (told by the file's first bytes, not its name). A ValueError from parse, or a record
    that is not an object, is an error naming the file and the line or item."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path}: " + ("a folder, not a file" if path.is_dir() else "no such file")
                                + f"; give a file of {DATA_FORMATS}")
    with open(path, "rb") as f:
        magic = f.read(4)
    kind = "parquet" if magic == b"PAR1" else {".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}.get(
        path.suffix.lower())
    if kind:
        raise ValueError(f"{option} {path}: {kind.upper()} is not read here, only {DATA_FORMATS}. To convert: "
                         + CONVERT.format(kind=kind, path=path))
    parsed = []
    try:
        with (gzip.open if magic[:2] == b"\x1f\x8b" else open)(path, "rb") as f:
            for where, record in json_objects(f, path):
                try:
                    if not isinstance(record, dict):
                        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
                    parsed.append(parse(record, where))
                except ValueError as e:
                    raise ValueError(f"{path} {where}: {e}") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # cut short, or not gzip after all
        raise ValueError(f"{path}: not a whole gzip file ({e or 'cut short'})") from None
    return parsed


# -----------------------------------------------------------------------------
# 5. GPT-2's tokenizer files, for Hugging Face
#
# transformers reads GPT-2's tokenizer from vocab.json and merges.txt (and tokenizer_config.json
# for the class and its settings). Both are derived here from tiktoken's GPT-2 encoding, offline,
# through tiktoken's public API only. What GPT-2's byte-level BPE is made of:
# - ids 0-255 are the 256 single bytes, in the order of the characters that the table below
#   gives them: the 188 printable ones first ('!' is 0), then the 68 others (the space is 220);
# - id 256 + k is the token made by merge k, the k-th line after merges.txt's "#version: 0.2"
#   line: a token's rank is the order in which BPE merges it (the lowest first);
# - id 50256 is <|endoftext|>, a special token that BPE never makes.
# Both files write a token's bytes as a string of printable characters, one per byte, by GPT-2's
# bytes_to_unicode table, so that no byte is a space, a newline or invisible: vocab.json maps
# these strings to ids, and each line of merges.txt holds the two parts of one merge, separated
# by a space, in rank order. Written this way they are byte for byte GPT-2's original
# encoder.json and vocab.bpe, the files tiktoken itself downloads.

def gpt2_bytes_to_unicode():
    """GPT-2's table {byte: character}. A byte that is a printable character other than the
    space (Latin-1's '!'..'~', '¡'..'¬', '®'..'ÿ': 188 of them) stands for itself; the 68 others
    (controls, the space, 0x7f-0xa0, the soft hyphen 0xad) are shifted, in byte order, to
    chr(256), chr(257), ...: the space becomes 'Ġ' and the newline 'Ċ'."""
    table, shifted = {}, 0
    for byte in range(256):
        if chr(byte).isprintable() and byte != ord(" "):
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def bpe_parts(token, ranks, max_rank):
    """The parts that byte-level BPE leaves `token` (bytes) in when it may use only the merges
    of rank < max_rank: start from single bytes and merge, again and again, the adjacent pair
    whose concatenation has the lowest rank. For the token of rank r, called with max_rank=r,
    this stops at exactly two parts, and they are merge r's (stopping at two parts is safe: the
    only merge that could join them is r itself)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best_rank, best = max_rank, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], max_rank)
            if rank < best_rank:
                best_rank, best = rank, i
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def load_gpt2_encoding():
    """tiktoken's GPT-2 encoding, or a one-line OSError saying how to provide its files."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises several kinds when its files cannot be fetched
        where = os.environ.get("TIKTOKEN_CACHE_DIR")
        now = f"it is {where}" if where else "it is not set"
        raise OSError(f"could not load GPT-2's tokenizer ({type(e).__name__}): tiktoken fetches vocab.bpe and "
                      "encoder.json once, from the network; offline, TIKTOKEN_CACHE_DIR must point at a folder "
                      f"holding them as tiktoken caches them ({now})") from None


@functools.cache
def gpt2_tokenizer_files():
    """{file name: text} for vocab.json and merges.txt, derived once per process (about half a
    second) and shared by every call: do not change the dict.

    Each merge is recovered by simulating BPE (bpe_parts) rather than by looking for a split of
    the token into two tokens of lower rank, because most tokens have several such splits:
    ' an' (rank 281) is both ' '+'an' and ' a'+'n', and BPE takes ' a'+'n' because ' a'
    (rank 257) is merged before 'an' (rank 272). Of GPT-2's 50,000 merges, 27,429 tokens have
    more than one split; taking the first split gets 12,091 of them wrong, and even the split
    whose parts have the lowest ranks gets 3,989 wrong."""
    enc = load_gpt2_encoding()
    if enc.n_vocab != 50257 or enc.eot_token != 50256:
        raise RuntimeError(f"tiktoken's gpt2 encoding has {enc.n_vocab} tokens and <|endoftext|> at "
                           f"{enc.eot_token}, not GPT-2's 50257 and 50256: is tiktoken's gpt2 entry changed?")
    tokens = [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab)]  # position = id = rank
    ranks = {token: rank for rank, token in enumerate(tokens[:enc.eot_token])}
    merges = []
    for rank in range(256, enc.eot_token):
        parts = bpe_parts(tokens[rank], ranks, rank)
        if len(parts) != 2:
            raise RuntimeError(f"GPT-2's token {rank} ({tokens[rank]!r}) is not one merge of two lower-ranked "
                               f"tokens (BPE leaves {len(parts)} parts): tiktoken's gpt2 encoding is not GPT-2's")
        merges.append(parts)

    table = gpt2_bytes_to_unicode()

    def printable(token):
        return "".join(table[b] for b in token)

    vocab = {printable(token): i for i, token in enumerate(tokens[:enc.eot_token])}
    vocab["<|endoftext|>"] = enc.eot_token
    # json.dumps' defaults (one line, ", " and ": ", \u escapes) are how encoder.json was written
    return {"vocab.json": json.dumps(vocab),
            "merges.txt": "#version: 0.2\n" + "".join(f"{printable(a)} {printable(b)}\n" for a, b in merges)}


# What transformers needs to build GPT-2's tokenizer from a folder that holds nothing else. The
# hub's gpt2 repo states only model_max_length and lets config.json's model_type pick the class;
# a folder without config.json must name the class here, or AutoTokenizer cannot build one.
# bos, eos and unk are all <|endoftext|>; no space is added before the first word, as GPT-2 was
# trained; and decoding must not "clean up" spaces before punctuation, which would change the
# text it gives back (older transformers did by default).
GPT2_TOKENIZER_CONFIG = {
    "tokenizer_class": "GPT2Tokenizer",
    "model_max_length": 1024,
    "bos_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "add_prefix_space": False,
    "clean_up_tokenization_spaces": False,
}


def save_gpt2_tokenizer(directory):
    """Write GPT-2's vocab.json, merges.txt and tokenizer_config.json into the folder directory
    (created if missing), each file atomically, so that transformers'
    AutoTokenizer.from_pretrained(directory) loads GPT-2's tokenizer. Other files there are
    left alone."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in gpt2_tokenizer_files().items():
        write_atomically(directory / name, lambda tmp: tmp.write_bytes(text.encode("utf-8")))
    save_json(GPT2_TOKENIZER_CONFIG, directory / "tokenizer_config.json")
