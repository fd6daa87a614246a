"""sample.py and nanogpt/sampling.py: a trained checkpoint (or GPT-2 weights) sampled from the command line."""
import pytest

from helpers import run, run_command, tiny_config
from nanogpt.checkpoint import load_checkpoint


def sample(out, *args, data=None):
    return run_command("sample.py", f"--out_dir={out}", "--device=cpu", *args,
                       env={"NANOGPT_DATA": str(data)} if data else None)


def test_sample_prints_num_samples(trained, char_dataset):
    r = sample(trained, "--num_samples=3", "--max_new_tokens=20", "--start=First", data=char_dataset.parent)
    assert r.returncode == 0, r.stderr
    chunks = r.stdout.split("---------------\n")
    assert len(chunks) == 4 and all(c.startswith("First") and len(c) >= 25 for c in chunks[:3])
    assert "tokens/s" in chunks[3] and "KV cache on" in chunks[3]


def test_file_prompt(trained, char_dataset, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("All:\nSpeak")
    r = sample(trained, "--num_samples=1", "--max_new_tokens=5", f"--start=FILE:{prompt}", data=char_dataset.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("All:\nSpeak")


@pytest.mark.parametrize("args,message", [
    (["--start="], "error: start is empty"),
    (["--start=FILE:/no/such/file.txt"], "the prompt file '/no/such/file.txt' does not exist"),
    (["--max_new_tokens=0"], "max_new_tokens=0 must be > 0"),
    (["--temperature=0"], "temperature=0.0 must be > 0"),
    (["--top_k=1000"], "top_k=1000 is larger than the vocabulary (34 tokens)"),
    (["--context=wrap"], "context='wrap': choose slide (exact, slow past block_size) or shift (fast)"),
    (["--start=Zebra~"], "the prompt has characters outside the model's vocabulary: ['Z', 'b', '~']"),
])
def test_bad_sampling_input(trained, char_dataset, args, message):
    r = sample(trained, "--max_new_tokens=3", *args, data=char_dataset.parent)
    assert r.returncode != 0
    assert message in r.stderr


def test_long_prompt_is_cropped_with_a_notice(trained, char_dataset):
    r = sample(trained, "--num_samples=1", "--max_new_tokens=3", "--start=" + "a" * 40, data=char_dataset.parent)
    assert r.returncode == 0, r.stderr
    assert "notice: the prompt is 40 tokens, longer than the model's context of 16: keeping its last 16" in r.stderr
    assert r.stdout.startswith("a" * 16)


@pytest.mark.parametrize("context", ["slide", "shift"])
def test_context_modes_past_the_block(trained, char_dataset, context):
    """28 new tokens past block_size=16 (slide re-runs the window 13 times, shift twice), through the triton
    backend for prompt and decoding."""
    r = sample(trained, "--num_samples=2", "--max_new_tokens=28", "--start=A", "--attn=triton", f"--context={context}",
               "--top_k=1", data=char_dataset.parent)
    assert r.returncode == 0, r.stderr
    assert f"KV cache on, context={context}" in r.stdout and "attn=triton" in r.stdout


def test_missing_checkpoint(tmp_path):
    r = sample(tmp_path / "nothing")
    assert r.returncode == 2 and "no checkpoint at" in r.stderr and "train first" in r.stderr


def test_compile_true_in_training_then_sample_without(char_dataset, tmp_path):
    """A checkpoint written by train.py --compile=True samples with sample.py --compile=False."""
    out = tmp_path / "compiled"
    run(tiny_config(out, max_iters=3, eval_interval=1000, compile=True, n_layer=1))
    assert not any(k.startswith("_orig_mod.") for k in load_checkpoint(out / "ckpt.pt")["model"])
    r = sample(out, "--num_samples=1", "--max_new_tokens=5", "--start=A", data=char_dataset.parent)
    assert r.returncode == 0, r.stderr


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os
        return (os.system, (self.command,))


def test_a_shared_checkpoint_and_meta_pkl_run_no_code(trained, char_dataset, tmp_path):
    """A checkpoint whose config.dataset points at a folder with a crafted meta.pkl: sample.py refuses the name
    (absolute path) or the pickle (a plain name under the data root), and the command never runs."""
    import pickle

    import torch
    marker = tmp_path / "pwned"
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    for dataset, message in [
        (str(tmp_path / "shared"), f"dataset='{tmp_path / 'shared'}' (from the checkpoint's config.dataset) is not a "
                                   f"plain folder name under {char_dataset.parent}"),
        ("../shared", "dataset='../shared' (from the checkpoint's config.dataset) is not a plain folder name"),
        ("shared", f"{char_dataset.parent / 'shared' / 'meta.pkl'} is not a plain vocabulary (it names the global "),
    ]:
        for folder in (tmp_path / "shared", char_dataset.parent / "shared"):
            folder.mkdir(exist_ok=True)
            (folder / "meta.pkl").write_bytes(pickle.dumps(_System(f"touch {marker}")))
        ckpt["config"]["dataset"] = dataset
        out = tmp_path / "ckpt-from-elsewhere"
        out.mkdir(exist_ok=True)
        torch.save(ckpt, out / "ckpt.pt")
        r = sample(out, "--max_new_tokens=3", "--num_samples=1", data=char_dataset.parent)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("error: " + message), r.stderr
        assert not marker.exists()
