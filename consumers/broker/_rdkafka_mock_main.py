"""Child process hosting a librdkafka mock cluster: ``python -m consumers.broker._rdkafka_mock_main``.

Line protocol. On stdout, first ``READY <host:port> <librdkafka version>`` or
``ERROR <reason>`` (then exit status 1). Then on stdin, one command per line, each
answered by one stdout line (``OK …`` or ``ERR <reason>``):

    create <partitions> <topic>                  ->  OK created | OK exists
    down <broker_id>                             ->  OK   (-1: every broker)
    up <broker_id>                               ->  OK
    rtt <broker_id> <ms>                         ->  OK
    broker-errors <broker_id> <api_key> <code>:<rtt_ms>[,…]   ->  OK
    errors-left <broker_id> <api_key>            ->  OK <count>
    quit (or end of input)                       ->  the cluster is destroyed, exit 0

End of input means the parent is gone, so the child never outlives it.
"""

from __future__ import annotations

import sys

from ._librdkafka import LibrdkafkaError, MockCluster

__all__ = ["main"]


class _BadCommand(ValueError):
    pass


def _answer(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _int(word: str, what: str) -> int:
    try:
        return int(word)
    except ValueError:
        raise _BadCommand(f"{what} must be an integer, got {word!r}") from None


def _code_rtts(word: str) -> list[tuple[int, int]]:
    pairs = []
    for item in word.split(","):
        code, _, rtt = item.partition(":")
        pairs.append((_int(code, "an error code"), _int(rtt or "0", "a delay")))
    return pairs


def _handle(cluster: MockCluster, command: str) -> str:
    try:
        match command.split():
            case ["create", partitions, topic]:
                created = cluster.create_topic(topic, _int(partitions, "partitions"))
                return "OK created" if created else "OK exists"
            case ["down", broker]:
                cluster.set_down(_int(broker, "broker_id"))
            case ["up", broker]:
                cluster.set_up(_int(broker, "broker_id"))
            case ["rtt", broker, ms]:
                cluster.set_rtt(_int(broker, "broker_id"), _int(ms, "rtt"))
            case ["broker-errors", broker, api, pairs]:
                cluster.push_broker_request_errors(
                    _int(broker, "broker_id"), _int(api, "api_key"), _code_rtts(pairs))
            case ["errors-left", broker, api]:
                left = cluster.broker_errors_left(_int(broker, "broker_id"),
                                                  _int(api, "api_key"))
                return f"OK {left}"
            case _:
                return f"ERR unknown command {command!r}"
    except (LibrdkafkaError, _BadCommand) as exc:
        return f"ERR {exc}"
    return "OK"


def main() -> int:
    try:
        cluster = MockCluster()
    except (LibrdkafkaError, OSError) as exc:
        _answer(f"ERROR {exc}")
        return 1
    try:
        _answer(f"READY {cluster.bootstraps} {cluster.version}")
        for raw in sys.stdin:
            command = raw.strip()
            if command == "quit":
                break
            if command:
                _answer(_handle(cluster, command))
    finally:
        cluster.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
