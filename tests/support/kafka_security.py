"""The Kafka security of each broker the tests use, for what the tests build themselves.

With ``ENGINE_TEST_KAFKA_SECURITY=tls`` or ``mtls`` the session's broker is reachable only
through TLS (tests/support/tls_broker.py, mutual TLS with ``mtls``); the session fixture
registers its settings under its address. Engine settings (tests/support/settings.py),
clients (:func:`client_options`) and engine processes (:func:`security_env`) made for that
address then use them; brokers a test starts for itself stay plaintext.
"""

from __future__ import annotations

import os
from typing import Any

from consumers.security import PLAINTEXT, KafkaSecurity
from core.settings import load_settings

__all__ = ["SESSION_SECURITY", "client_options", "register", "security_env",
           "security_for", "settings_overrides"]

#: "" (plaintext), "tls" or "mtls": how the session's embedded broker is reached.
SESSION_SECURITY = os.environ.get("ENGINE_TEST_KAFKA_SECURITY", "").strip().lower()

_REGISTERED: dict[str, dict[str, str]] = {}
_BUILT: dict[str, KafkaSecurity] = {}


def register(bootstrap: str, env: dict[str, str]) -> None:
    """``env``: the engine's settings (environment names) for clients of ``bootstrap``."""
    _REGISTERED[bootstrap] = dict(env)
    _BUILT.pop(bootstrap, None)


def security_env(bootstrap: str) -> dict[str, str]:
    """Environment for an engine process on ``bootstrap`` ({} when plaintext)."""
    return dict(_REGISTERED.get(bootstrap, {}))


def settings_overrides(bootstrap: str) -> dict[str, str]:
    """The same as ``load_settings`` keyword arguments."""
    return {name.lower(): value for name, value in security_env(bootstrap).items()}


def security_for(bootstrap: str) -> KafkaSecurity:
    if bootstrap not in _REGISTERED:
        return PLAINTEXT
    if bootstrap not in _BUILT:
        _BUILT[bootstrap] = KafkaSecurity.from_settings(load_settings(
            **settings_overrides(bootstrap), _env_file=None))
    return _BUILT[bootstrap]


def client_options(bootstrap: str) -> dict[str, Any]:
    """Keyword arguments for an aiokafka client of ``bootstrap``."""
    return security_for(bootstrap).options()
