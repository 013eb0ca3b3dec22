"""Bearer-token auth: accepted tokens come from an environment variable (comma-separated) or a secret file (one per
line), each `name:token` (a bare token is accepted as an unnamed one); only their SHA-256 digests and names travel
to the ingress, and a presented token is compared digest to digest in constant time (hmac.compare_digest) against
every accepted one. The name is what logs and limits show of a token; the token itself is never logged."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from pathlib import Path

from restoration.errors import InputError
from serving.config import ServeConfig


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
UNNAMED = "unnamed"


def named(entry: str) -> tuple[str, str]:
    """`name:token` -> (name, token); a bare token -> ("unnamed", token)."""
    name, colon, token = entry.partition(":")
    if colon and TOKEN_NAME.match(name) and token:
        return name, token
    return UNNAMED, entry


def accepted_digests(config: ServeConfig) -> dict[str, str]:
    """{digest: name} of the tokens config.tokens_env and config.token_file hold; InputError when auth is on and
    none are."""
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
    return {digest(token): name for name, token in sorted(named(entry) for entry in tokens)}


def check_bearer(header: str | None, digests: dict[str, str]) -> tuple[int | None, str | None]:
    """(None, the token's digest) when the Authorization header carries an accepted token; else (the status to
    answer, None): 401 none, 403 wrong."""
    if not header:
        return 401, None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return 401, None
    presented = digest(token.strip())
    found = None
    for accepted in digests:  # every digest compared, whichever matches: no early exit to time
        if hmac.compare_digest(presented, accepted):
            found = accepted
    return (None, found) if found is not None else (403, None)
