"""Exception hierarchy. The CLI turns every ``WadiError`` into one red line on stderr
and a non-zero exit code (the traceback only with ``WADI_DEBUG=1``)."""

from __future__ import annotations


class WadiError(Exception):
    """Base class of every error the toolkit raises on purpose."""

    exit_code: int = 1


class BadInputError(WadiError):
    """The user gave us something we cannot use (path, file, flag value). Exit code 2."""

    exit_code = 2


class CheckpointError(BadInputError):
    """A weights file or folder is missing, unreadable, corrupt, or of a refused format."""


class MismatchError(BadInputError):
    """Two checkpoints (or a checkpoint and a model) do not fit together."""


class WriteError(WadiError):
    """An output could not be written (disk full, read-only file system, permissions) after
    the early checks passed. Whatever was there before is left as it was. Exit code 4."""

    exit_code = 4


class HubError(WadiError):
    """A model could not be fetched from the Hugging Face hub (offline, missing repo)."""

    exit_code = 3


class WadiWarning(UserWarning):
    """Something a user should know although the command goes on (a quantised checkpoint,
    a truncated prompt, an absurd adapter scale). The library emits it with
    :func:`warnings.warn`; the CLI prints it as one yellow ``warning:`` line on stderr."""


class WadiNote(WadiWarning):
    """A line of information about what wadi did on its own (e.g. which temporaries of a
    killed wadi process it removed); the CLI prints it as one ``note:`` line."""


def warn(message: str, category: type[WadiWarning] = WadiWarning) -> None:
    """Emit ``message`` as a :class:`WadiWarning` (or ``category``) from the caller's line."""
    import warnings

    warnings.warn(message, category, stacklevel=3)
