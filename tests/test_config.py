import subprocess
import sys

import pytest

from helpers import ROOT
from nanogpt.config import (
    ConfigError,
    SampleConfig,
    TrainConfig,
    help_text,
    parse_args,
    validate_sample,
    validate_train,
)


def write(tmp_path, text, name="cfg.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_then_file_then_overrides(tmp_path):
    path = write(tmp_path, "batch_size = 32\nlearning_rate = 1e-3\ndataset = 'shakespeare_char'\nimport math\n"
                           "n_embd = 64 * 2\n")
    cfg = parse_args(TrainConfig, [path, "--batch_size=7", "--dropout=0.1", "--compile=False"])
    assert cfg.batch_size == 7  # the override beats the file
    assert cfg.learning_rate == 1e-3 and cfg.dataset == "shakespeare_char" and cfg.n_embd == 128  # from the file
    assert cfg.dropout == 0.1 and cfg.compile is False
    assert cfg.n_layer == TrainConfig().n_layer  # the default


def test_later_files_override_earlier(tmp_path):
    a = write(tmp_path, "batch_size = 1\nn_layer = 3\n", "a.py")
    b = write(tmp_path, "batch_size = 2\n", "b.py")
    cfg = parse_args(TrainConfig, [a, b])
    assert (cfg.batch_size, cfg.n_layer) == (2, 3)


def test_values_are_python_literals_and_strings_may_be_unquoted():
    cfg = parse_args(TrainConfig, ["--dataset=shakespeare_char", "--out_dir='x y'", "--wandb_run_name=123",
                                   "--learning_rate=6e-4", "--min_lr=0", "--max_iters=5"])
    assert cfg.dataset == "shakespeare_char" and cfg.out_dir == "x y" and cfg.wandb_run_name == "123"
    assert cfg.min_lr == 0.0 and isinstance(cfg.min_lr, float)
    assert cfg.max_iters == 5


@pytest.mark.parametrize("argv,message", [
    (["--lerning_rate=1"], "command line: unknown config key 'lerning_rate' (did you mean 'learning_rate'?)"),
    (["--batch_size=1.5"], "command line: batch_size=1.5 has type float, but batch_size takes int"),
    (["--compile=1"], "command line: compile=1 has type int, but compile takes bool"),
    (["--batch_size=True"], "batch_size=True has type bool, but batch_size takes int"),
    (["--learning_rate=fast"], "learning_rate='fast' has type str, but learning_rate takes float"),
    (["--batch_size"], "--batch_size: expected --key=value"),
    (["config/does_not_exist.py"], "config file 'config/does_not_exist.py' does not exist"),
])
def test_bad_command_line_input(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_args(TrainConfig, argv)
    assert message in str(e.value)


def test_bad_file_key_and_type(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'n_layers' \(did you mean 'n_layer'\?\)"):
        parse_args(TrainConfig, [write(tmp_path, "n_layers = 4\n")])
    with pytest.raises(ConfigError, match="n_layer='4' has type str, but n_layer takes int"):
        parse_args(TrainConfig, [write(tmp_path, "n_layer = '4'\n")])


@pytest.mark.parametrize("overrides,message", [
    (dict(n_embd=100, n_head=3), "n_embd=100 is not divisible by n_head=3"),
    (dict(batch_size=0), "batch_size=0 must be > 0"),
    (dict(dropout=1.0), "dropout=1.0 must be in [0, 1)"),
    (dict(attn="flash"), "unknown kernel backend attn='flash': choose one of naive, sdpa, triton"),
    (dict(dtype="float8"), "dtype='float8' is not supported: choose one of auto, float32, bfloat16, float16"),
    (dict(dtype="float16", device="cpu"), "dtype=float16 is not supported on the CPU"),
    (dict(device="cuda"), "device='cuda' but CUDA is not available here: use --device=cpu"),
    (dict(device="tpu"), "device='tpu' is not a device"),
    (dict(init_from="gpt3"), "init_from='gpt3' is neither scratch, resume"),
    (dict(init_from="gpt2", block_size=2048), "block_size=2048 is larger than gpt2's 1024 positions"),
])
def test_validation_errors(overrides, message):
    cfg = TrainConfig(**{"device": "cpu", **overrides})
    with pytest.raises(ConfigError) as e:
        validate_train(cfg)
    assert message in str(e.value)


def test_accumulation_must_divide_across_ranks():
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=5 is not divisible by the 2 processes"):
        validate_train(TrainConfig(device="cpu", gradient_accumulation_steps=5), world_size=2)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="set TRITON_INTERPRET=1"):
        validate_train(TrainConfig(device="cpu", attn="triton"))


@pytest.mark.parametrize("value", ["1", "true", "YES", "on", "y", "0", "", "2", "false", "off", " 1"])
def test_one_rule_for_whether_triton_interprets(monkeypatch, value):
    """kernels._common.interpreting() reads TRITON_INTERPRET as Triton itself does, and the config check asks it:
    a value Triton runs on the interpreter passes, any other is refused."""
    import triton

    from kernels._common import interpreting
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreting() == triton.knobs.runtime.interpret
    if interpreting():
        validate_train(TrainConfig(device="cpu", attn="triton"))
    else:
        with pytest.raises(ConfigError, match="set TRITON_INTERPRET=1"):
            validate_train(TrainConfig(device="cpu", attn="triton"))


def test_wandb_missing(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="wandb_log=True needs the wandb package: pip install wandb"):
        validate_train(TrainConfig(device="cpu", wandb_log=True))


@pytest.mark.parametrize("overrides,message", [
    (dict(start=""), "start is empty"),
    (dict(start="FILE:/no/such/prompt.txt"), "the prompt file '/no/such/prompt.txt' does not exist"),
    (dict(max_new_tokens=0), "max_new_tokens=0 must be > 0"),
    (dict(temperature=0.0), "temperature=0.0 must be > 0"),
    (dict(temperature=-1.0), "temperature=-1.0 must be > 0"),
    (dict(top_k=-1), "top_k=-1 must be >= 0"),
    (dict(top_p=0.0), "top_p=0.0 must be in (0, 1]"),
    (dict(num_samples=0), "num_samples=0 must be > 0"),
])
def test_sample_validation_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate_sample(SampleConfig(**{"device": "cpu", **overrides}))
    assert message in str(e.value)


def test_help_lists_every_key():
    text = help_text(TrainConfig, "usage")
    for key in TrainConfig.__dataclass_fields__:
        assert f"--{key}" in text


def test_cli_error_is_one_line_and_exit_2():
    r = subprocess.run([sys.executable, "train.py", "--lerning_rate=1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("error: command line: unknown config key 'lerning_rate'")
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "--learning_rate" in r.stdout and "--attn" in r.stdout


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.py")))
def test_shipped_config_files_parse(path):
    parse_args(TrainConfig, [str(path)])
