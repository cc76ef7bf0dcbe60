"""Errors that ferry reports to its users: each one says what was wrong and what to do."""


class FerryError(Exception):
    """A problem found before or outside a deploy step; nothing was changed.

    ``retryable`` marks a dependency that did not answer (worth retrying later), as opposed to
    bad input or a broken model (retrying only delays the rollback).
    """

    def __init__(self, message: str, hint: str = "", retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.retryable = retryable

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class StepFailed(FerryError):
    """A step of the deploy transaction failed; the deploy is rolled back."""

    def __init__(self, step: str, message: str, hint: str = "", version: int | None = None, retryable: bool = False) -> None:
        super().__init__(message, hint, retryable)
        self.step = step
        self.version = version

