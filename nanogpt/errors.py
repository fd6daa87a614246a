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
