"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""


class FedloraError(Exception):
    """Base class: bad input or an impossible request, reported before work starts where possible."""


class ConfigError(FedloraError):
    """An invalid configuration value: the message names the key, the value and what is valid."""


class DataError(FedloraError):
    """A data file or data set that cannot be used as asked (missing column, empty text, unknown label...)."""


class ModelError(FedloraError):
    """A base model that cannot be loaded, or LoRA targets that match nothing."""


class PrivacyBudgetError(FedloraError):
    """A differential-privacy configuration whose (epsilon, delta) budget cannot be met."""


class UpdateError(FedloraError):
    """A client update that fails validation at the server (wrong keys, shapes, dtypes or non-finite values)."""
