"""What one attempt is charged, by how it ended: what the upstream did, in every currency.

An attempt that reached an upstream which took its prompt is charged that prompt and the output
the upstream produced: an answer, an answer the deadline cut, a timeout (the upstream was working
on it when the budget ran out), a client that left while the upstream worked, and a stream that
failed after some of the answer was out. An attempt the upstream refused or failed before taking
it (4xx, 5xx, a reset, an engine not ready) costs nothing: that is the upstream's failure, or a
request it never processed. A request's charge is the sum over its attempts (RequestState.charge),
in tokens and in USD alike, and it is what the reservation settles to and the rate bucket keeps.

Pure.
"""

from __future__ import annotations

# how an attempt can end → whether the upstream took its prompt
TOOK_PROMPT = {
    "answered": True,
    "cut": True,               # the deadline cut a streamed answer short
    "timeout": True,           # the budget ran out while the upstream worked
    "client_closed": True,     # the client left while the upstream worked (or mid-answer)
    "failed_mid_answer": True,  # a stream that failed after pieces were out
    "error": False,            # 5xx, reset, unreadable answer before any output
    "unavailable": False,
    "rejected": False,         # the upstream's 4xx: it did not process the request
    "invalid": False,          # the provider cannot take this input
}


def charged(ended: str, prompt_tokens: int, output_tokens: int) -> tuple[int, int]:
    """(prompt tokens, output tokens) an attempt that ended so is charged; an unknown way is free
    only when it is one of the upstream's own failures above."""
    if TOOK_PROMPT.get(ended, True):
        return max(0, prompt_tokens), max(0, output_tokens)
    return 0, 0
