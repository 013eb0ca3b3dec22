"""Bearer-token auth: accepted tokens come from an environment variable (comma-separated) or a secret file (one per
line); only their SHA-256 digests travel to the ingress, and a presented token is compared digest to digest in
constant time (hmac.compare_digest) against every accepted one."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from restoration.errors import InputError
from serving.config import ServeConfig


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def accepted_digests(config: ServeConfig) -> list[str]:
    """Digests of the tokens config.tokens_env and config.token_file hold; InputError when auth is on and none are."""
    tokens = [token.strip() for token in os.environ.get(config.tokens_env, "").split(",")]
    if config.token_file:
        path = Path(config.token_file).expanduser()
        try:
            tokens += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except OSError as err:
            raise InputError(f"serve.token_file {config.token_file!r}: cannot be read ({err})") from err
    tokens = [token for token in tokens if token]
    if config.auth and not tokens:
        raise InputError(
            f"serve.auth is on but no token is set: put tokens in ${config.tokens_env} (comma-separated) or serve.token_file, "
            "or turn auth off with --set serve.auth=false"
        )
    return sorted({digest(token) for token in tokens})


def check_bearer(header: str | None, digests: list[str]) -> int | None:
    """None when the Authorization header carries an accepted token; else the status to answer (401 none, 403 wrong)."""
    if not header:
        return 401
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return 401
    presented = digest(token.strip())
    matched = False
    for accepted in digests:  # every digest compared, whichever matches: no early exit to time
        matched |= hmac.compare_digest(presented, accepted)
    return None if matched else 403
