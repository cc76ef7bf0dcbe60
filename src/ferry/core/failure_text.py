"""How a failed step is worded for its user: Triton's reason once, without its layers' prefixes, and what to do."""

from __future__ import annotations

import re

from ferry.core.errors import TritonError

_OUT_OF_MEMORY = re.compile(r"out of memory|outofmemory|cannot allocate memory|\bOOM\b", re.IGNORECASE)
_LOAD_PREFIXES = re.compile(  # the layers of a load refusal, outermost first: request, model, version, status code
    r"^(Triton refused loading '[^']*': )?(load failed for model '[^']*': )?(failed to load '[^']*'( version \d+)?: )?"
    r"(version \d+ is at UNAVAILABLE state: )?((Internal|Invalid argument|Not found|Unavailable): )?")
SMOKE_HINT = ("the version answers, but not what its smoke.json records: if the new answers are right, log "
              "the version again with their golden outputs (or looser rtol/atol); otherwise fix the model")
_MISSING_BACKEND = re.compile(r"unable to find backend library for backend '([^']+)'")


def load_reason(message: str) -> str:
    """Triton's reason for a failed load without the prefixes each of its layers adds (the request, the
    model, the version's state), and without its advice for a missing backend, which misleads here."""
    reason = _LOAD_PREFIXES.sub("", message, count=1).strip().rstrip(";").strip()
    missing = _MISSING_BACKEND.search(reason)
    return f"the server has no backend '{missing[1]}'" if missing else reason or message


def load_hint(error: TritonError) -> str:
    """What to do about a failed load."""
    if _OUT_OF_MEMORY.search(f"{error.message} {error.detail}"):
        return ("there is no room for the candidate beside the active version: deploy with --strategy rolling "
                "(each replica swaps versions, never holding both)")
    if _MISSING_BACKEND.search(error.message):
        return ("give the version's config.pbtxt a backend this Triton has (its backend directory lists them), "
                "or serve it from a Triton image that has that backend")
    return error.hint or ("the version's files or config cannot start on this Triton: the reason above is "
                          "Triton's own, its log has the rest; fix the version and register it again")
