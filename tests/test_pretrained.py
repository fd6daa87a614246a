"""GPT.from_pretrained on a small random transformers GPT-2 saved to a folder (no download)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT
from kernels.testing import relative_error
from nanogpt.backends import available_backends
from nanogpt.model import GPT
from nanogpt.pretrained import PretrainedError

transformers = pytest.importorskip("transformers")


def _save_hf_gpt2(folder_factory, weights_format):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # activation: gelu_new
    model = transformers.GPT2LMHeadModel(config).eval()
    folder = folder_factory.mktemp(f"gpt2-{weights_format}")
    model.save_pretrained(folder, safe_serialization=weights_format == "safetensors")
    return folder, model


@pytest.fixture(scope="module", params=["safetensors", "bin"])
def hf_folder(request, tmp_path_factory):
    """A saved GPT-2 in each weights format from_pretrained reads (the format matters to loading only)."""
    return _save_hf_gpt2(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def hf_safetensors_folder(tmp_path_factory):
    return _save_hf_gpt2(tmp_path_factory, "safetensors")


@pytest.mark.parametrize("attn", available_backends())
def test_logits_match_transformers(hf_folder, attn):
    folder, hf_model = hf_folder
    model = GPT.from_pretrained(str(folder), dict(attn=attn)).eval()
    assert model.config.block_size == 64 and model.config.vocab_size == 50257 and model.config.gelu == "tanh"
    idx = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(idx).logits
        got = torch.cat([model(idx[:, :t + 1])[0] for t in range(idx.shape[1])], dim=1)
    assert (got - expected).abs().max().item() <= 1e-4
    assert relative_error(got, expected) <= 1e-5


def test_only_dropout_and_attn_may_be_overridden(hf_folder):
    folder, _ = hf_folder
    assert GPT.from_pretrained(str(folder), dict(dropout=0.1)).config.dropout == 0.1
    with pytest.raises(PretrainedError, match="only dropout, attn, fused_loss_head may be overridden for pretrained weights, not n_layer"):
        GPT.from_pretrained(str(folder), dict(n_layer=3))


def test_bad_names_and_folders(tmp_path):
    with pytest.raises(PretrainedError, match="'gpt5' is neither a folder nor a known model: use one of gpt2"):
        GPT.from_pretrained("gpt5")
    with pytest.raises(PretrainedError, match="has no config.json: not a Hugging Face model folder"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PretrainedError, match="config.json is not a GPT-2 config"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(n_layer=1, n_head=1, n_embd=16, vocab_size=10)))
    with pytest.raises(PretrainedError, match="has no model.safetensors or pytorch_model.bin"):
        GPT.from_pretrained(str(tmp_path))


def test_hub_name_offline_says_the_hub_cannot_be_reached(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(PretrainedError, match="the Hugging Face hub cannot be reached and it is not in the local cache"):
        GPT.from_pretrained("gpt2-xl")


def test_finetune_and_sample_from_a_local_folder(hf_safetensors_folder, data_dir, tmp_path):
    """train.py --init_from=<folder> with a cropped block, then sample.py from its checkpoint and the folder. One
    weights format: the commands reach the weights through GPT.from_pretrained, which the tests above load in
    both formats (each format here cost ~15 s of the suite's time)."""
    folder, _ = hf_safetensors_folder
    from helpers import SAMPLE_TEXT
    from nanogpt.data import prepare_bpe
    prepare_bpe(SAMPLE_TEXT, data_dir / "shakespeare")
    env = {**os.environ, "NANOGPT_DATA": str(data_dir)}
    out = tmp_path / "ft"
    r = subprocess.run([sys.executable, "train.py", "config/finetune_shakespeare.py", f"--init_from={folder}",
                        "--device=cpu", "--block_size=32", "--batch_size=2", "--gradient_accumulation_steps=2",
                        "--max_iters=3", "--eval_iters=2", f"--out_dir={out}", "--always_save_checkpoint=True"],
                       cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "initializing from OpenAI GPT-2 weights" in r.stdout
    r = subprocess.run([sys.executable, "train.py", f"--init_from={folder}", "--dataset=shakespeare", "--device=cpu",
                        "--block_size=128", f"--out_dir={tmp_path / 'x'}"], cwd=ROOT, capture_output=True, text=True,
                       env=env)
    assert r.returncode == 2 and "block_size=128 is larger than" in r.stderr and "64 positions" in r.stderr
    for args in ([f"--out_dir={out}"], [f"--init_from={folder}"]):
        r = subprocess.run([sys.executable, "sample.py", *args, "--device=cpu", "--num_samples=1",
                            "--max_new_tokens=5", "--start=Hello"], cwd=ROOT, capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("Hello")
