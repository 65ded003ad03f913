"""Optional bearer-token authentication: one set of keys for the OpenAI routes, another for feedback and admin.

    ALCHEMIST_API_KEYS / ALCHEMIST_API_KEYS_FILE       /v1/completions, /v1/chat/completions, /v1/models,
                                                       /v1/score
    ALCHEMIST_ADMIN_KEYS / ALCHEMIST_ADMIN_KEYS_FILE   /v1/feedback, /v1/versions, /v1/versions/rollback

A variable holds keys separated by commas or newlines; a file holds one per line (blank lines and `#` comments
are skipped), so a Kubernetes Secret can be mounted as the file. A file is read again when it changes (checked
every few seconds), so a rotated Secret takes effect without a restart. A set with no keys configured leaves
its routes open. `/healthz`, `/readyz`, `/metrics` and the OpenAPI document are always open.

A request without `Authorization: Bearer <key>`, or with a key of the other set, gets 401 with an OpenAI-style
error and a `WWW-Authenticate` header. Keys are kept only as SHA-256 digests and compared in constant time
against every key of the set; they are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from alchemist_worker.api.body_limit import ASGIApp, Receive, Scope, Send, error_body, send_error

log = logging.getLogger(__name__)

API = "api"
ADMIN = "admin"
ROUTES: dict[str, tuple[str, ...]] = {
    API: ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/score"),
    ADMIN: ("/v1/feedback", "/v1/versions"),
}
RELOAD_CHECK_S = 5.0


def audience(path: str) -> str | None:
    """Which key set guards `path` (API or ADMIN), or None for an open route."""
    for name, prefixes in ROUTES.items():
        if any(path == prefix or path.startswith(prefix + "/") for prefix in prefixes):
            return name
    return None


def parse_keys(text: str) -> list[str]:
    """Keys separated by commas or newlines; blank entries and `#` comment lines are skipped."""
    keys: list[str] = []
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        keys.extend(part.strip() for part in line.split(",") if part.strip())
    return keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).digest()


@dataclass
class KeySet:
    """The keys of one audience: from a variable, a file, or both."""

    name: str  # the variable, e.g. ALCHEMIST_API_KEYS (messages name it, never a key)
    inline: tuple[bytes, ...] = ()
    file: Path | None = None
    _from_file: tuple[bytes, ...] = ()
    _file_stamp: tuple[int, int, int] | None = None
    _checked_at: float = field(default=0.0)

    @classmethod
    def from_env(cls, name: str, env: Mapping[str, str]) -> KeySet:
        """Reads `name` and `name_FILE`; raises ValueError when the file cannot be read or holds no key."""
        inline = tuple(_digest(k) for k in parse_keys(env.get(name, "")))
        path = env.get(name + "_FILE", "").strip()
        keys = cls(name, inline, Path(path) if path else None)
        if keys.file is not None:
            keys._load(strict=True)
        return keys

    @property
    def configured(self) -> bool:
        return bool(self.inline) or self.file is not None

    def accepts(self, presented: str) -> bool:
        """Constant time in the key presented: every key of the set is compared, digests of equal length."""
        self._maybe_reload()
        candidate = _digest(presented)
        matched = False
        for digest in self.inline + self._from_file:
            matched |= hmac.compare_digest(candidate, digest)
        return matched

    def _maybe_reload(self) -> None:
        if self.file is None or time.monotonic() - self._checked_at < RELOAD_CHECK_S:
            return
        self._load(strict=False)

    def _load(self, strict: bool) -> None:
        if self.file is None:
            return
        self._checked_at = time.monotonic()
        try:
            stat = self.file.stat()
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if stamp == self._file_stamp:
                return
            keys = parse_keys(self.file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            if strict:
                raise ValueError(f"{self.name}_FILE={self.file}: cannot read it: {exc}") from None
            log.warning(
                "%s_FILE=%s cannot be read (%s); keeping the keys read before", self.name, self.file, exc
            )
            return
        if not keys:
            if strict:
                raise ValueError(f"{self.name}_FILE={self.file} holds no key (one per line)")
            log.warning("%s_FILE=%s holds no key now; keeping the keys read before", self.name, self.file)
            return
        self._from_file = tuple(_digest(k) for k in keys)
        self._file_stamp = stamp
        log.info("%s_FILE: %d keys loaded from %s", self.name, len(keys), self.file)


@dataclass
class AccessKeys:
    api: KeySet
    admin: KeySet

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AccessKeys:
        env = os.environ if env is None else env
        keys = cls(KeySet.from_env("ALCHEMIST_API_KEYS", env), KeySet.from_env("ALCHEMIST_ADMIN_KEYS", env))
        if keys.api.configured and not keys.admin.configured:
            log.warning("API keys are set but no admin keys: /v1/feedback and /v1/versions are open")
        return keys

    def for_audience(self, name: str) -> KeySet:
        return self.api if name == API else self.admin


def bearer_token(authorization: bytes | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, token = authorization.decode("latin-1").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class BearerAuth:
    """ASGI middleware: checks the bearer token of every request to a guarded route before the app runs."""

    def __init__(self, app: ASGIApp, keys: AccessKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        who = audience(scope.get("path", "")) if scope["type"] == "http" else None
        keys = self.keys.for_audience(who) if who is not None else None
        if keys is None or not keys.configured:
            await self.app(scope, receive, send)
            return
        token = bearer_token(dict(scope.get("headers") or []).get(b"authorization"))
        if token is not None and keys.accepts(token):
            await self.app(scope, receive, send)
            return
        kind = "an admin key" if who == ADMIN else "an API key"
        if token is None:
            message = f"missing bearer token: this route needs {kind} in 'Authorization: Bearer <key>'"
            challenge = b'Bearer realm="alchemist"'
        else:
            message = f"invalid bearer token: this route needs {kind}"
            challenge = b'Bearer realm="alchemist", error="invalid_token"'
        await send_error(
            send, 401, error_body(message, code="invalid_api_key"), [(b"www-authenticate", challenge)]
        )
