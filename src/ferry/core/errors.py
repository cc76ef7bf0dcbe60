"""Every error ferry reports to its users, in one tree: each one says what was wrong and what to do.

    FerryError                      the root; ``message`` and ``hint``
    ├── InvalidInput                bad input (a name, a setting, an argument, a damaged file): fix it, do not retry
    │   ├── Misconfigured           ferry's own setup (credentials, a missing extra): the version is not at fault
    │   ├── NoSuchModel             the model has nothing ferry knows of
    │   ├── NotOnnx                 a model file that is not ONNX ferry can read the signature of
    │   └── DeliveryRefused         a webhook delivery the watcher does nothing for (``result`` says why)
    ├── Unavailable                 a dependency did not answer (MLflow, Triton, Prometheus): worth retrying
    │   └── PrometheusError         ... Prometheus, which ``ferry status`` and ``ferry report`` read
    ├── Busy                        another deploy of the model holds it, or left an unfinished journal
    ├── TritonError                 Triton answered with a refusal
    │   └── TritonTimeout           ... or did not answer in time (``retryable``, as is "not reachable")
    ├── RegistryError               MLflow answered with a refusal (unknown alias, version)
    ├── StepFailed                  a step of the transaction failed: the deploy is rolled back
    ├── ReplicaFailed               an action failed on one replica of a fleet (``replica``, ``cause``)
    ├── MlflowRefused               the write-back: MLflow has no such model or version (nothing more is written)
    ├── MlflowDown                  the write-back: MLflow did not answer, or failed (nothing more is tried)
    └── GatewayError                a request the gateway refuses or cannot serve (``route``: checked against)
        ├── BadRequest              malformed or not what the model takes
        ├── Unauthorized            no or a wrong bearer token
        ├── NotServed               a model or version the gateway does not serve
        ├── BodyTimeout             the body did not arrive in time
        ├── TooLarge                over the gateway's size limit
        ├── UnsupportedEncoding     a Content-Encoding the gateway does not inflate
        └── BackendDown             Triton did not answer
    (each protocol of the gateway maps a kind to its own status: ferry.adapters.gateway.refusals)

``retryable`` is what an orchestrator looks at: a dependency that did not answer may answer later;
bad input or a broken model only delays the rollback.
"""

from __future__ import annotations

from typing import Any, Self


class FerryError(Exception):
    """A problem found before or outside a deploy step; nothing was changed."""

    retryable_by_default = False

    def __init__(self, message: str, hint: str = "", retryable: bool | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.retryable = self.retryable_by_default if retryable is None else retryable
        self.detail = detail  # the full text behind a one-line message (a server's stack trace), for the records

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InvalidInput(FerryError):
    """Bad input: a name, a setting, a command-line argument or a file somebody else wrote."""


class Misconfigured(InvalidInput):
    """ferry cannot reach what it needs as it is set up (credentials refused or missing, a package not installed):
    a deploy that meets it is refused with nothing kept, and the version is not marked as failed."""


class NoSuchModel(InvalidInput):
    """The repository has nothing for this model: no committed version, no config, no history."""


class NotOnnx(InvalidInput):
    """The bytes are not an ONNX model ferry can read the signature of."""


class DeliveryRefused(InvalidInput):
    """A webhook delivery the watcher does nothing for; ``result`` names why (its metric label and answer)."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result


class Unavailable(FerryError):
    """A dependency (MLflow, Triton, Prometheus) could not be reached or did not answer in time."""

    retryable_by_default = True


class PrometheusError(Unavailable):
    """Prometheus did not answer a query, or answered something that is not a query result."""


class Busy(FerryError):
    """Another deploy of the model is running, or one stopped before it finished (its journal remains)."""


class TritonError(FerryError):
    """Triton refused a request (or could not be reached: ``retryable``)."""


class TritonTimeout(TritonError):
    """Triton did not answer in time: a load can hang for ever."""

    retryable_by_default = True


class RegistryError(FerryError):
    """The MLflow Model Registry refused a request: unknown model, alias or version."""


class StepFailed(FerryError):
    """A step of the deploy transaction failed; the deploy is rolled back."""

    def __init__(self, step: str, message: str, hint: str = "", version: int | None = None,
                 retryable: bool = False, detail: str = "", replica: str | None = None) -> None:
        super().__init__(message, hint, retryable, detail)
        self.step = step
        self.version = version
        self.replica = replica  # the Triton replica it failed on, in a fleet


class ReplicaFailed(FerryError):
    """An action failed on one replica; ``replica`` names it."""

    def __init__(self, replica: str, error: FerryError) -> None:
        super().__init__(f"on replica {replica}: {error.message}", error.hint, error.retryable, error.detail)
        self.replica = replica
        self.cause = error


class MlflowRefused(FerryError):
    """MLflow answered a write-back call that the model or version does not exist (or the call is invalid)."""


class MlflowDown(FerryError):
    """MLflow did not answer a write-back call (in time), or failed: the write-back tries nothing more."""


class GatewayError(FerryError):
    """A request the gateway refuses or cannot serve; the subclass is the kind, which each protocol answers with
    its own status. ``route`` is the committed route the request was checked against (the answer names its
    version), when it got that far."""

    def __init__(self, message: str, hint: str = "", route: Any = None) -> None:
        super().__init__(message, hint)
        self.route = route

    def on_route(self, route: Any) -> Self:
        """The same refusal, naming the route it was checked against."""
        named = type(self).__new__(type(self))  # not through __init__: subclasses take other arguments
        named.__dict__.update(self.__dict__, route=route)
        named.args = self.args
        return named


class BadRequest(GatewayError):
    """The request is malformed, or not what the model takes."""


class Unauthorized(GatewayError):
    """No bearer token, or a wrong one."""


class NotServed(GatewayError):
    """A model or version the gateway does not serve (nothing committed, or not the committed version)."""


class BodyTimeout(GatewayError):
    """The request's body did not arrive in time."""


class TooLarge(GatewayError):
    """The request (or its inflated body) is over the gateway's limit."""


class UnsupportedEncoding(GatewayError):
    """A Content-Encoding the gateway does not inflate."""


class BackendDown(GatewayError):
    """Triton did not answer the forwarded request."""

    retryable_by_default = True


def one_line(text: str | None, limit: int = 600) -> str:
    """The first non-empty line of a message, control characters out, at most ``limit`` characters (Triton
    appends a failed backend's Python stack to its messages; a tag or a table cell holds one line)."""
    line = next((part.strip() for part in (text or "").splitlines() if part.strip()), "")
    line = "".join(ch if ch.isprintable() else " " for ch in line)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def not_the_versions_fault(error: BaseException) -> bool:
    """ferry's setup, or a dependency that stopped answering (not a step that failed on the version): a deploy
    that meets it while staging is refused with nothing kept, instead of being rolled back against the version."""
    return isinstance(error, Misconfigured) or (isinstance(error, FerryError) and error.retryable
                                                and not isinstance(error, StepFailed))


def unreachable(error: FerryError) -> bool:
    """An error whose cause is a dependency that did not answer (an exit code of its own in the CLI)."""
    return error.retryable
