"""API keys: who is calling, and may they use this model.

Keys are stored only as SHA-256 hashes (a leaked config leaks no key); a caller is known by its
key's name from then on, in logs and metrics. With auth off every request is the anonymous caller,
who may use every model and has no rate limits.

    python -m apps.edge.auth new NAME     a fresh random key, and the config entry that accepts it
"""

from __future__ import annotations

import hashlib
import secrets
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from apps.config import ApiKey, AuthSettings, Priority
from apps.errors import Forbidden, ModelNotFound, Unauthorized

BEARER = "bearer "


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: the key's name, its limits and its priority class."""

    name: str
    priority: Priority
    models: frozenset[str] | None  # None: every model
    rate_limited: bool  # has any per-key limit the shared limiter must check
    # Its config entry: the limits sent with each reservation.
    key: ApiKey | None = field(default=None, compare=False)

    def may_use(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models


ANONYMOUS = Caller(name="anonymous", priority="normal", models=None, rate_limited=False)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyTable:
    """Looks up the caller of a request from its Authorization header."""

    def __init__(self, settings: AuthSettings) -> None:
        self._enabled = settings.enabled
        self._callers = {key.sha256: _caller(key) for key in settings.keys}

    def authenticate(self, authorization: str | None, api_key: str | None = None) -> Caller:
        """The caller, or 401 for a missing, malformed or unknown key. The key comes as
        `Authorization: Bearer KEY` (OpenAI's clients) or as `x-api-key: KEY` (`api_key`,
        Anthropic's)."""
        if not self._enabled:
            return ANONYMOUS
        if authorization and authorization.lower().startswith(BEARER):
            key = authorization[len(BEARER) :].strip()
        elif api_key:
            key = api_key.strip()
        else:
            raise Unauthorized(
                "Missing API key: send it as `Authorization: Bearer KEY` (or `x-api-key: KEY`).",
                code="missing_api_key",
            )
        caller = self._callers.get(key_hash(key))
        if caller is None:
            raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")
        return caller

    @staticmethod
    def authorize(caller: Caller, model_id: str, served: Iterable[str]) -> None:
        """404 for a model that is not served, 403 for one this key may not use. The 404 lists only
        the models this key may use, so a key learns nothing of the others."""
        served = list(served)
        if model_id not in served:
            visible = sorted(m for m in served if caller.may_use(m))
            raise ModelNotFound(
                f"The model `{model_id}` does not exist. Served models: {visible}", param="model"
            )
        if not caller.may_use(model_id):
            raise Forbidden(f"This API key may not use the model `{model_id}`.", param="model")


def _caller(key: ApiKey) -> Caller:
    models = frozenset(key.models) if key.models is not None else None
    return Caller(
        name=key.name, priority=key.priority, models=models, rate_limited=key.rate_limited, key=key
    )


def new_key_entry(name: str) -> tuple[str, Mapping[str, str]]:
    """A fresh random key and the config entry that accepts it."""
    key = "sk-" + secrets.token_urlsafe(32)
    return key, {"name": name, "sha256": key_hash(key)}


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "new":
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    key, entry = new_key_entry(argv[1])
    print(f"key (give it to {argv[1]}, it is not stored anywhere): {key}")
    print("config entry (under auth.keys):")
    print(f"  - name: {entry['name']}\n    sha256: {entry['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
