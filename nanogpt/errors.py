"""The errors a user can fix: each message names the problem and the fix.

train.py, sample.py and `python -m bench` print any UserError as one `error:` line and exit with code 2;
anything else is a bug and keeps its traceback. This module imports nothing, so every layer can raise them.
"""


class UserError(ValueError):
    """Bad input the user can fix (a config value, a file, a dataset, a model name)."""


class ConfigError(UserError):
    """A bad config key, value or combination; the message names it and says what is accepted."""


class DataError(UserError):
    """A dataset that is missing, truncated, unsafe or does not fit the model."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, unwritable, or does not fit the model or data at hand."""


class PretrainedError(UserError):
    """A name or folder that does not hold GPT-2 weights in Hugging Face format."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or Inf (the fix: a lower learning rate, more warmup, another dtype)."""


class OutDirInUse(UserError):
    """Another training run holds the out_dir (its checkpoints would be overwritten by this one)."""


_MEMORY_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory",
                    "storage size calculation overflowed", "cannot be represented as a symint")


def out_of_memory(error: BaseException) -> "UserError":
    """A failed allocation (a model, batch or context too large for this machine) as the UserError it is; any
    other error is re-raised as it is (a bug keeps its traceback)."""
    text = str(error).lower()
    if isinstance(error, MemoryError) or any(m in text for m in _MEMORY_MESSAGES):
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        return UserError(f"out of memory ({first}): use a smaller model, batch_size, block_size or eval_iters")
    raise error
