"""Conformance of Kafka-protocol brokers to what the engine relies on."""
