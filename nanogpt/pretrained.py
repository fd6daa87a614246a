"""OpenAI GPT-2 weights in Hugging Face format -> our GPT, without `transformers` at run time.

    GPT.from_pretrained("gpt2")                 # gpt2 | gpt2-medium | gpt2-large | gpt2-xl, via the HF hub cache
    GPT.from_pretrained("/path/to/hf/folder")   # config.json + model.safetensors or pytorch_model.bin

The shape comes from config.json; only dropout (and the kernel backend) may be overridden. HF's GPT-2 uses
Conv1D modules whose weights are stored transposed relative to nn.Linear: those are transposed on load.
"""
import json
from pathlib import Path

import torch

from nanogpt.errors import ConfigError, PretrainedError

# the OpenAI GPT-2 sizes on the Hugging Face hub; all of them have 1024 positions
HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
OVERRIDABLE = ("dropout", "attn", "fused_loss_head")  # how the model runs, not its shape
HF_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
HUB_POSITIONS = 1024


def is_pretrained_source(name_or_path) -> bool:
    """A GPT-2 name of the hub or an existing (presumably Hugging Face) folder."""
    return str(name_or_path) in HUB_NAMES or Path(name_or_path).is_dir()


def check_block_size(block_size: int, name_or_path) -> None:
    """The one check that a context fits the pretrained model's positions, before any weights are read:
    hub names have 1024, a folder says it in config.json."""
    if str(name_or_path) in HUB_NAMES and not Path(name_or_path).is_dir():
        positions = HUB_POSITIONS
    else:
        positions = read_config(Path(name_or_path))["block_size"]
    if block_size > positions:
        raise ConfigError(f"block_size={block_size} is larger than {name_or_path}'s {positions} positions: "
                          f"use --block_size={positions} or less")


def resolve_folder(name_or_path) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if str(name_or_path) not in HUB_NAMES:
        raise PretrainedError(f"{name_or_path!r} is neither a folder nor a known model: use one of "
                              f"{', '.join(HUB_NAMES)} or a local folder in Hugging Face GPT-2 format")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PretrainedError(f"loading {name_or_path!r} from the hub needs huggingface_hub: "
                              f"pip install '.[pretrained]' (or pass a local folder)") from None
    patterns = ["config.json", "model.safetensors", "pytorch_model.bin"]
    try:  # the local cache first: an offline machine with a filled cache works
        return Path(snapshot_download(str(name_or_path), allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=patterns))
    except Exception as e:
        raise PretrainedError(f"cannot get {name_or_path!r}: the Hugging Face hub cannot be reached and it is not "
                              f"in the local cache ({type(e).__name__}); download it where there is network, "
                              f"or pass a local folder") from None


def read_state_dict(folder: Path) -> dict:
    st = folder / "model.safetensors"
    if st.exists():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise PretrainedError(f"{st} needs the safetensors package: pip install safetensors") from None
        return load_file(str(st))
    binfile = folder / "pytorch_model.bin"
    if binfile.exists():
        return torch.load(binfile, map_location="cpu", weights_only=True)
    raise PretrainedError(f"{folder} has no model.safetensors or pytorch_model.bin")


def read_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise PretrainedError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        hf = json.loads(cfg_path.read_text())
        args = dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], vocab_size=hf["vocab_size"],
                    block_size=hf.get("n_positions", hf.get("n_ctx", 1024)), bias=True)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PretrainedError(f"{cfg_path} is not a GPT-2 config ({type(e).__name__}: {e})") from None
    activation = hf.get("activation_function", "gelu_new")
    if activation not in HF_ACTIVATIONS:
        raise PretrainedError(f"{cfg_path}: activation_function {activation!r} is not supported "
                              f"({', '.join(HF_ACTIVATIONS)})")
    args["gelu"] = HF_ACTIVATIONS[activation]
    return args


def load_gpt2(build_model, name_or_path, override_args=None):
    """GPT-2 weights into build_model(model_args) (e.g. GPT.from_pretrained's `cls(GPTConfig(**args))`): the
    loader is handed the constructor, so this module needs no import of the model."""
    override_args = dict(override_args or {})
    bad = [k for k in override_args if k not in OVERRIDABLE]
    if bad:
        raise PretrainedError(f"only {', '.join(OVERRIDABLE)} may be overridden for pretrained weights, "
                              f"not {', '.join(bad)}")
    folder = resolve_folder(name_or_path)
    args = read_config(folder)
    args.update(override_args)
    model = build_model(args)
    sd = model.state_dict()

    hf_sd = {}
    for k, v in read_state_dict(folder).items():
        k = k.removeprefix("transformer.")
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue  # causal-mask buffers, not weights
        hf_sd[k] = v
    hf_sd.pop("lm_head.weight", None)  # tied to wte
    ours = {k.removeprefix("transformer."): k for k in sd if k != "lm_head.weight"}
    missing = sorted(set(ours) - set(hf_sd))
    unexpected = sorted(set(hf_sd) - set(ours))
    if missing or unexpected:
        raise PretrainedError(f"{folder}: weights do not match a GPT-2 of this config (missing: {missing[:5]}, "
                              f"unexpected: {unexpected[:5]})")
    with torch.no_grad():
        for short, full in ours.items():
            src = hf_sd[short]
            if short.endswith(CONV1D_WEIGHTS):
                src = src.t()
            if src.shape != sd[full].shape:
                raise PretrainedError(f"{folder}: {short} has shape {tuple(src.shape)}, expected "
                                      f"{tuple(sd[full].shape)}")
            sd[full].copy_(src)
    return model
