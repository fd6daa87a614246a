"""nanogpt/loading.py: a model from a checkpoint (compiled or not), refused when it does not fit."""
import pytest
import torch

from helpers import run, tiny_config
from nanogpt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nanogpt.generate import generate
from nanogpt.loading import model_from_checkpoint


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
    with pytest.raises(CheckpointError, match=r"block_size: checkpoint 16 vs --block_size=32"):
        run(tiny_config(trained, init_from="resume", block_size=32))
