"""User-facing errors: one clear message, no traceback unless --debug is given."""

from __future__ import annotations


class QuantgateError(Exception):
    """An error a person can act on. The message names the file or field and the fix."""


class RecipeError(QuantgateError):
    """A recipe that does not parse or validate."""


class MissingExtraError(QuantgateError):
    """An optional backend whose package is not installed."""

    def __init__(self, what: str, extra: str, module: str):
        super().__init__(
            f"{what} needs the Python package '{module}', which is not installed. "
            f"Install it with: pip install 'quantgate[{extra}]'"
        )


def require(module: str, *, what: str, extra: str):
    """Import an optional heavy module or raise a MissingExtraError that says how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised through the error message
        if exc.name and exc.name.split(".")[0] != module.split(".")[0]:
            raise  # the module exists but one of its own imports failed: show the real cause
        raise MissingExtraError(what, extra, module) from exc
