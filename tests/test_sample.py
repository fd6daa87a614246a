import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from nanogpt.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from nanogpt.generate import generate, sample_next
from nanogpt.model import GPT, GPTConfig
from test_train import run, tiny_config


@pytest.fixture
def trained(char_dataset, tmp_path):
    out = tmp_path / "out"
    run(tiny_config(out, max_iters=30, eval_interval=1000))
    return out


def sample(out, *args, data=None):
    env = {**os.environ}
    if data:
        env["NANOGPT_DATA"] = str(data)
    return subprocess.run([sys.executable, "sample.py", f"--out_dir={out}", "--device=cpu", *args], cwd=ROOT,
                          capture_output=True, text=True, env=env)


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
    """40 new tokens past block_size=16, through the triton backend for prompt and decoding."""
    r = sample(trained, "--num_samples=2", "--max_new_tokens=40", "--start=A", "--attn=triton", f"--context={context}",
               "--top_k=1", data=char_dataset.parent)
    assert r.returncode == 0, r.stderr
    assert f"KV cache on, context={context}" in r.stdout and "attn=triton" in r.stdout


def test_missing_checkpoint(tmp_path):
    r = sample(tmp_path / "nothing")
    assert r.returncode == 1 and "no checkpoint at" in r.stderr and "train first" in r.stderr


# ------------------------------------------------------------------------------------------------ sampling
# (the KV cache and the decode path: tests/test_generate.py)


def tiny_model(attn="sdpa", block_size=24):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=41, n_layer=2, n_head=2, n_embd=32, attn=attn)).eval()


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, top_k=1, generator=g).item() for _ in range(20)} == {3}
    assert {sample_next(logits, top_k=2, generator=g).item() for _ in range(200)} == {2, 3}
    # probabilities ~ [0.03, 0.09, 0.24, 0.64]: top_p=0.7 keeps tokens 3 and 2
    assert {sample_next(logits, top_p=0.7, generator=g).item() for _ in range(200)} == {2, 3}
    assert {sample_next(logits, top_p=0.5, generator=g).item() for _ in range(50)} == {3}
    with pytest.raises(ValueError, match="temperature=0 must be > 0"):
        sample_next(logits, temperature=0)


def test_seeded_generation_is_reproducible():
    model = tiny_model()
    idx = torch.zeros(3, 1, dtype=torch.long)
    a = generate(model, idx, 15, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = generate(model, idx, 15, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])  # one batch, different samples


# ------------------------------------------------------------------------------------------------ checkpoints


def test_compiled_model_checkpoint_loads_without_compile(trained, tmp_path):
    ckpt = load_checkpoint(trained / "ckpt.pt")
    model = model_from_checkpoint(ckpt, "ckpt")
    compiled = torch.compile(model, backend="eager")
    ckpt["model"] = compiled.state_dict()  # keys carry the '_orig_mod.' prefix
    assert any(k.startswith("_orig_mod.") for k in ckpt["model"])
    save_checkpoint(ckpt, tmp_path / "c" / "ckpt.pt")
    reloaded = model_from_checkpoint(load_checkpoint(tmp_path / "c" / "ckpt.pt"), "c")
    idx = torch.zeros(1, 1, dtype=torch.long)
    assert torch.equal(generate(reloaded.eval(), idx, 5, top_k=1), generate(model.eval(), idx, 5, top_k=1))


def test_compile_true_in_training_then_sample_without(char_dataset, tmp_path):
    """A checkpoint written by train.py --compile=True samples with sample.py --compile=False."""
    out = tmp_path / "compiled"
    run(tiny_config(out, max_iters=3, eval_interval=1000, compile=True, n_layer=1))
    assert not any(k.startswith("_orig_mod.") for k in load_checkpoint(out / "ckpt.pt")["model"])
    r = sample(out, "--num_samples=1", "--max_new_tokens=5", "--start=A", data=char_dataset.parent)
    assert r.returncode == 0, r.stderr


def test_checkpoint_from_another_model_or_file(trained, tmp_path, char_dataset):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="is not a readable nanogpt checkpoint"):
        load_checkpoint(tmp_path / "junk" / "ckpt.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "junk" / "other.pt")
    with pytest.raises(CheckpointError, match="is not a nanogpt checkpoint: it lacks model, model_args"):
        load_checkpoint(tmp_path / "junk" / "other.pt")
    ckpt = load_checkpoint(trained / "ckpt.pt")
    ckpt["model_args"]["n_embd"] = 64
    with pytest.raises(CheckpointError, match="its weights do not fit its model_args"):
        model_from_checkpoint(ckpt, "x")
    # resuming on a dataset with another vocabulary
    from nanogpt.data import prepare_char
    prepare_char("abc\n" * 100, char_dataset.parent / "abc")
    with pytest.raises(CheckpointError, match="was trained with vocab_size 34, but dataset abc has 4"):
        run(tiny_config(trained, init_from="resume", dataset="abc"))
    with pytest.raises(CheckpointError, match=r"block_size: checkpoint 16 vs 32"):
        run(tiny_config(trained, init_from="resume", block_size=32))


def test_pickled_code_is_never_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    torch.save({"model": {}, "model_args": {}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a readable nanogpt checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
