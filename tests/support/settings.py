"""Engine settings for tests on fresh topics: short sessions, heartbeats and retry delays,
so that a test waits on events, not on the defaults' seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from consumers.security import without_security
from core.settings import Settings, load_settings
from tests.support.kafka_security import settings_overrides

__all__ = ["engine_settings", "plaintext"]


def engine_settings(tmp_path: Path, bootstrap: str, topic_prefix: str, **overrides: Any
                  ) -> Settings:
    """Settings for an engine on ``bootstrap`` under ``topic_prefix``, its own group, files
    under ``tmp_path``, the local voice, any port; ``overrides`` win."""
    return load_settings(**{
        "kafka_bootstrap_servers": bootstrap,
        "kafka_topic_prefix": topic_prefix,
        "kafka_group_id": f"{topic_prefix}group",
        "kafka_session_timeout_ms": 2000,
        "kafka_heartbeat_interval_ms": 200,
        "kafka_fetch_max_wait_ms": 10,
        "output_dir": tmp_path / "outputs",
        "service_port": 0,
        "voice_backend": "local",
        "retry_base_delay": 0.01,
        "retry_max_delay": 0.05,
        "shutdown_grace_seconds": 10,
        **settings_overrides(bootstrap),
        **overrides,
    })


def plaintext(settings: Settings) -> Settings:
    """``settings`` for a broker a test starts for itself, which is plaintext whatever
    security the session's broker has (ENGINE_TEST_KAFKA_SECURITY)."""
    return without_security(settings)
