"""librdkafka's mock cluster for a test module: started once, stopped at the module's end."""

from __future__ import annotations

from collections.abc import Iterator

from consumers.broker import RdkafkaMockBroker

__all__ = ["module_mock_broker"]


def module_mock_broker() -> Iterator[RdkafkaMockBroker]:
    """The body of a module-scoped fixture: ``yield from module_mock_broker()``."""
    broker = RdkafkaMockBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
