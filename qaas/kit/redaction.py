"""Keeping secrets out of messages: the one redaction of the service (standard library only).

Every message that may hold a secret -- an engine's error, a Hub server's answer, a log line -- passes
here before it is stored, returned or written: the secrets the caller knows (this job's Hub token) are
replaced, and so is anything shaped like an API key of this service or a Hub token, as a last line of
defence for the ones nobody knew about.
"""

from __future__ import annotations

import re

#: API keys (qaas_ + 43 urlsafe characters) and Hub tokens (hf_ + letters and digits).
_TOKEN_SHAPED = re.compile(r"\b(qaas_|hf_)[A-Za-z0-9_-]{16,}")


def redact(text: str, *known: str | None) -> str:
    """`text` with each known secret replaced by `***` and every token-shaped string cut to its prefix."""
    for secret in known:
        if secret:
            text = text.replace(secret, "***")
    return _TOKEN_SHAPED.sub(lambda m: m.group(1) + "***", text)
