"""Errors the model library raises. Each message says what was wrong and what to do about it."""


class LisaError(Exception):
    """Base class of every error raised on purpose by ``model``."""


class CheckpointError(LisaError):
    """A checkpoint folder, Hub id or CLIP tower cannot be loaded as the model family it was taken for."""


class InputError(LisaError, ValueError):
    """An image or query that the model refuses (undecodable, too large, empty, too long...)."""
