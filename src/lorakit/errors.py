"""Every error lorakit raises on bad input derives from :class:`LorakitError`.

Each names the problem (the key, the path, the module) and is raised *before* anything is modified, so a
failed call leaves the model and the files as they were.
"""


class LorakitError(Exception):
    """Base class of lorakit's own errors."""


class ConfigError(LorakitError, ValueError):
    """A configuration key, value or type is wrong (the message lists the valid ones)."""


class TargetError(LorakitError, ValueError):
    """A target spec matched nothing, or matched a module type the method cannot adapt."""


class AdapterFileError(LorakitError, ValueError):
    """An adapter directory is missing, malformed, for another model, or of an unsupported type."""


class MergeError(LorakitError, RuntimeError):
    """A merge was asked of a method that cannot be folded into one weight."""


class AssetError(LorakitError, FileNotFoundError):
    """An offline model or dataset is not installed (the message gives the command that installs it)."""
