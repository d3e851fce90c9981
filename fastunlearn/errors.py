"""fastunlearn's own exceptions: subclasses of the built-in ones, so ``except ValueError`` still works."""


class FastUnlearnError(Exception):
    """Base class of every error fastunlearn raises on purpose."""


class InvalidArgumentError(FastUnlearnError, ValueError):
    """An argument has the right type but a bad value."""


class InvalidTypeError(FastUnlearnError, TypeError):
    """An argument has the wrong type."""


class MissingFileError(FastUnlearnError, FileNotFoundError):
    """A path the user gave does not exist or lacks a required file."""


class CorruptResultError(FastUnlearnError, ValueError):
    """A saved result could not be read (truncated or corrupt file)."""


class NonFiniteError(FastUnlearnError, FloatingPointError):
    """Training kept producing non-finite losses or gradients."""


class WriteError(FastUnlearnError, OSError):
    """An output (result folder, checkpoint) could not be written: full or read-only disk, bad path."""

    def __str__(self):  # the message, not OSError's "[Errno N] strerror: filename" layout
        return str(self.args[0]) if self.args else super().__str__()


def write_error(path, err: OSError, what: str = "result") -> WriteError:
    """A ``WriteError`` naming ``path`` and the cause; callers have already removed partial output."""
    reason = err.strerror or str(err) or type(err).__name__
    e = WriteError(f"{what}: could not write {str(path)!r} ({reason}); nothing partial was left behind")
    e.errno, e.filename = err.errno, str(path)
    return e


def bad_value(arg: str, expected: str, got=None) -> InvalidArgumentError:
    msg = f"{arg}: expected {expected}"
    if got is not None:
        msg += f", got {got!r}"
    return InvalidArgumentError(msg)


def bad_type(arg: str, expected: str, got=None) -> InvalidTypeError:
    msg = f"{arg}: expected {expected}"
    if got is not None:
        msg += f", got {type(got).__name__}"
    return InvalidTypeError(msg)
