"""The small exception hierarchy every layer raises.

`exit_code` follows DESIGN.md: 1 failed while working, 2 bad input (arguments, config, files).
The CLI maps any `RestorayError` to its exit code and prints its message; messages name the input and the fix.
"""


class RestorayError(Exception):
    """Failed while working."""

    exit_code = 1


class InputError(RestorayError):
    """Bad input: an argument, a config value, a file or a URI that cannot be used as given."""

    exit_code = 2


class RestorationCancelled(RestorayError):
    """A restoration stopped by its per-step callback (a client went away, a deadline passed)."""

    exit_code = 130


class ConfigError(InputError):
    """A config file or `--set` override that does not validate."""


class PresetError(InputError):
    """An unknown preset name or a preset file that does not validate."""
