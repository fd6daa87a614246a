"""Models from files: a checkpoint written by training, or OpenAI's GPT-2 weights. Used by training
(init_from=resume | gpt2*) and by sampling; it builds on the model, the checkpoint files and the GPT-2 reader.
"""
from nanogpt.checkpoint import clean_state_dict
from nanogpt.errors import CheckpointError
from nanogpt.model import GPT, GPTConfig


def model_from_checkpoint(ckpt: dict, source, attn=None, dropout=None, fused_loss_head=None) -> GPT:
    """Build a GPT from a checkpoint; attn/dropout/fused_loss_head may be chosen anew, the shape may not."""
    args = dict(ckpt["model_args"])
    if attn:
        args["attn"] = attn
    for key, value in (("dropout", dropout), ("fused_loss_head", fused_loss_head)):
        if value is not None:
            args[key] = value
    model = GPT(GPTConfig(**args))
    state_dict = clean_state_dict(ckpt["model"])
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: its weights do not fit its model_args ({str(e).splitlines()[0]})") from None
    return model


def model_from_pretrained(name_or_path, dropout=0.0, attn=None, block_size=None, fused_loss_head=None) -> GPT:
    """GPT-2 weights (a hub name or a Hugging Face folder), cropped to block_size when that is smaller
    (config validation has already checked that it is not larger: pretrained.check_block_size)."""
    overrides = dict(dropout=dropout, attn=attn, fused_loss_head=fused_loss_head)
    model = GPT.from_pretrained(name_or_path, {k: v for k, v in overrides.items() if v is not None and v != ""})
    if block_size is not None and block_size < model.config.block_size:
        model.crop_block_size(block_size)
    return model
