"""Models from files: a checkpoint written by training, or OpenAI's GPT-2 weights. Used by training
(init_from=resume | gpt2*) and by sampling; it builds on the model, the checkpoint files and the GPT-2 reader.
"""
from dataclasses import fields

from nanogpt.checkpoint import clean_state_dict
from nanogpt.config import check_model_memory
from nanogpt.errors import CheckpointError, ConfigError
from nanogpt.model import GPT, GPTConfig


def model_from_checkpoint(ckpt: dict, source, attn=None, dropout=None, fused_loss_head=None) -> GPT:
    """Build a GPT from a checkpoint; attn/dropout/fused_loss_head may be chosen anew, the shape may not."""
    args = dict(ckpt["model_args"])
    if attn:
        args["attn"] = attn
    for key, value in (("dropout", dropout), ("fused_loss_head", fused_loss_head)):
        if value is not None:
            args[key] = value
    known = {f.name: f.type for f in fields(GPTConfig)}
    off_when_zero = {f.name for f in fields(GPTConfig) if f.default == 0}  # n_kv_head, attn_window: 0 is "off"
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise CheckpointError(f"{source}: model_args has keys this model does not know ({', '.join(unknown)}): it "
                              f"was written by another program or version (use a checkpoint written by train.py)")
    for k, v in args.items():
        name = getattr(known[k], "__name__", known[k])
        expected = {"int": int, "float": (int, float), "bool": bool, "str": str}.get(name)
        if expected is not None and (not isinstance(v, expected) or (expected is int and isinstance(v, bool))):
            raise CheckpointError(f"{source}: model_args {k}={v!r} is not of type {known[k]} (use a checkpoint written "
                                  f"by train.py)")
        if expected is int and (v < 0 if k in off_when_zero else v <= 0):
            bound = ">= 0" if k in off_when_zero else "> 0"
            raise CheckpointError(f"{source}: model_args {k}={v} must be {bound} (use a checkpoint written by "
                                  f"train.py)")
    try:
        check_model_memory(GPTConfig(**args), args.get("vocab_size", 50304), batch_size=1)
        model = GPT(GPTConfig(**args))
    except ConfigError as e:
        raise CheckpointError(f"{source}: its model_args do not describe a valid model ({e})") from None
    state_dict = clean_state_dict(ckpt["model"])
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: its weights do not fit its model_args ({_state_dict_problem(e)}): use "
                              f"another copy, or train anew") from None
    return model


def _state_dict_problem(error, limit=300) -> str:
    """torch's "Error(s) in loading state_dict for GPT:" is followed by the details on other lines: keep them, on
    one."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = " ".join(lines[1:]) or (lines[0] if lines else type(error).__name__)
    return detail if len(detail) <= limit else detail[:limit] + "..."


def model_from_pretrained(name_or_path, dropout=0.0, attn=None, block_size=None, fused_loss_head=None) -> GPT:
    """GPT-2 weights (a hub name or a Hugging Face folder), cropped to block_size when that is smaller
    (config validation has already checked that it is not larger: pretrained.check_block_size)."""
    overrides = dict(dropout=dropout, attn=attn, fused_loss_head=fused_loss_head)
    model = GPT.from_pretrained(name_or_path, {k: v for k, v in overrides.items() if v is not None and v != ""})
    if block_size is not None and block_size < model.config.block_size:
        model.crop_block_size(block_size)
    return model
