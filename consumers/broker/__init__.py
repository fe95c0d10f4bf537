"""The embedded Kafka-protocol broker: one interface, several implementations.

    with launch_broker("tansu") as broker:          # or "rdkafka-mock"
        broker.create_topics(["generation.completed"], partitions=3)
        ... AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers) ...

What each implementation can do is in ``broker.capabilities`` and docs/brokers.md.
"""

from .base import BrokerCapabilities, BrokerError, BrokerStartError, EmbeddedBroker
from .launch import KNOWN_BROKERS, launch_broker
from .rdkafka_mock import RdkafkaMockBroker
from .tansu import TansuBroker

__all__ = [
    "KNOWN_BROKERS",
    "BrokerCapabilities",
    "BrokerError",
    "BrokerStartError",
    "EmbeddedBroker",
    "RdkafkaMockBroker",
    "TansuBroker",
    "launch_broker",
]
