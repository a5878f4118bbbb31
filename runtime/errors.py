"""One error hierarchy for all of gptedge.

Every error a user can cause is a :class:`GptEdgeError` subclass. Its message says what went
wrong, which file or argument, and what to do. The CLI prints that one line and exits with the
class's ``exit_code`` (a traceback only with ``--debug``).
"""

from __future__ import annotations


class GptEdgeError(Exception):
    """Base of every error gptedge raises on purpose."""

    exit_code = 1


class InputError(GptEdgeError):
    """A path, file or checkpoint given by the user is missing, malformed or unsupported."""

    exit_code = 2


class UnsupportedModelError(InputError):
    """The checkpoint describes an architecture or config key that gptedge does not implement."""

    exit_code = 3


class BundleError(GptEdgeError):
    """A bundle folder is incomplete, corrupt, or of a format version this runtime cannot read."""

    exit_code = 4


class BackendUnavailableError(GptEdgeError):
    """The requested backend cannot run here (package or hardware missing)."""

    exit_code = 5


class GenerationError(GptEdgeError):
    """Generation was asked for something impossible (prompt too long, bad sampling argument) or
    produced non-finite values."""

    exit_code = 6


class ParityError(GptEdgeError):
    """The exported graph does not reproduce the source model within tolerance."""

    exit_code = 7


class QualityGateError(GptEdgeError):
    """A quantized or pruned bundle lost more quality than its budget allows."""

    exit_code = 8


class OutputExistsError(GptEdgeError):
    """The output path exists and ``--overwrite`` was not given, or it cannot be created."""

    exit_code = 9


class EngineError(GptEdgeError):
    """A TensorRT engine cannot be built, loaded, or does not fit the target."""

    exit_code = 10


__all__ = [
    "BackendUnavailableError",
    "BundleError",
    "EngineError",
    "GenerationError",
    "GptEdgeError",
    "InputError",
    "OutputExistsError",
    "ParityError",
    "QualityGateError",
    "UnsupportedModelError",
]
