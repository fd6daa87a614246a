"""nanogpt/errors.py: every error a user can fix reaches them from train.py, sample.py and `python -m bench` as one
`error:` line and exit code 2, never a traceback. Tried as a new user would: offline, fresh folders."""
import pytest

from helpers import run_command, write_tokens


def offline(tmp_path):
    """No network for the Hugging Face hub and an empty cache; datasets in a temporary folder."""
    return {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
            "NANOGPT_DATA": str(tmp_path / "data")}


def assert_one_error_line(r, *fragments):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_offline_finetune_is_one_line(tmp_path):
    """nanoGPT's fine-tune recipe on a machine that cannot reach the hub and has no GPT-2 in its cache: one line,
    before any work (the Shakespeare dataset is not prepared for nothing)."""
    pytest.importorskip("huggingface_hub")
    (tmp_path / "data").mkdir()
    r = run_command("train.py", "config/finetune_shakespeare.py", f"--out_dir={tmp_path / 'out'}",
                    env=offline(tmp_path))
    assert_one_error_line(r, "cannot get 'gpt2-xl': the Hugging Face hub cannot be reached and it is not in the "
                             "local cache", "pass a local folder")
    assert r.stdout == "" and not any((tmp_path / "data").iterdir())


@pytest.mark.parametrize("args,fragments", [
    (["sample.py", "--init_from=gpt2", "--device=cpu", "--num_samples=1", "--max_new_tokens=2"],
     ["cannot get 'gpt2'", "hub cannot be reached"]),
    (["sample.py", "--out_dir={tmp}/none", "--device=cpu"], ["no checkpoint at", "train first"]),
    (["train.py", "--init_from=resume", "--out_dir={tmp}/none", "--dataset=tiny", "--device=cpu", "--n_layer=1",
      "--n_head=1", "--n_embd=8", "--block_size=8"], ["no checkpoint at"]),
    (["train.py", "--init_from={tmp}", "--device=cpu"], ["has no config.json: not a Hugging Face model folder"]),
    (["train.py", "--dataset=nothing_here", "--device=cpu", "--n_layer=1", "--n_head=1", "--n_embd=8",
      "--block_size=8", "--out_dir={tmp}/out"], ["does not exist: prepare the dataset first"]),
    (["-m", "bench", "--real_data=True", "--dataset=nothing_here", "--device=cpu", "--n_layer=1", "--n_head=1",
      "--n_embd=8", "--block_size=8"], ["does not exist: prepare the dataset first"]),
])
def test_user_errors_are_one_line(tmp_path, args, fragments):
    write_tokens(tmp_path / "data" / "tiny" / "train.bin", list(range(100)))
    write_tokens(tmp_path / "data" / "tiny" / "val.bin", list(range(100)))
    r = run_command(*[a.format(tmp=tmp_path) for a in args], env=offline(tmp_path))
    assert_one_error_line(r, *fragments)
