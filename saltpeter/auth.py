"""Wrapper authentication: a per-instance secret derived from a daemon key.

The key is 32 random bytes generated on first start and kept in ``<statedir>/daemon.key``
with mode 0600. Each launched instance's wrappers get ``HMAC-SHA256(key, instance)`` as
``SP_TOKEN`` in their environment (never on a command line). The server recomputes it,
so nothing per instance needs storing, and a token for one instance is worthless for any
other. Salt delivers one environment to all minions of a launch, so the token is per
instance; the server additionally accepts a machine only if it was launched for that
instance.
"""

import hashlib
import hmac
import logging
import os
import secrets
from typing import Dict

log = logging.getLogger(__name__)

KEY_FILE = "daemon.key"
KEY_BYTES = 32


def load_or_create_key(statedir: str) -> bytes:
    """The daemon key, created (mode 0600) if it does not exist yet."""
    path = os.path.join(statedir, KEY_FILE)
    try:
        with open(path, "rb") as handle:
            key = handle.read()
        if len(key) >= KEY_BYTES:
            return key
        log.warning("daemon key %s is too short; making a new one", path)
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(KEY_BYTES)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    os.replace(tmp, path)
    log.info("generated a new daemon key in %s", path)
    return key


def instance_token(key: bytes, instance: str) -> str:
    """The secret the wrappers of ``instance`` must present."""
    return hmac.new(key, instance.encode("utf-8", "surrogateescape"),
                    hashlib.sha256).hexdigest()


class TokenChecker:
    """Checks the token each wrapper message carries against its instance's secret.

    A server checks every message, so each instance's token is computed once (an HMAC
    per message was a measurable share of a 10,000-wrapper fleet's CPU); every message is
    still compared in constant time. Only instances the server knows are asked about,
    and ``forget`` drops an instance when the server forgets its sessions, so this holds
    no more than the running instances."""

    def __init__(self, key: bytes):
        self.key = key
        self._expected: Dict[str, bytes] = {}

    def is_valid(self, instance: str, token) -> bool:
        """True if ``token`` is the secret of ``instance``; anything else (not a string,
        not ASCII, another instance's token) is invalid."""
        if not isinstance(token, str) or not token.isascii():
            return False
        expected = self._expected.get(instance)
        if expected is None:
            expected = instance_token(self.key, instance).encode("ascii")
            self._expected[instance] = expected
        return hmac.compare_digest(expected, token.encode("ascii"))

    def forget(self, instance: str) -> None:
        self._expected.pop(instance, None)
