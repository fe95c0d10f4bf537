"""Child process hosting a librdkafka mock cluster: ``python -m consumers.broker._rdkafka_mock_main``.

Line protocol. On stdout, first ``READY <host:port> <librdkafka version>`` or
``ERROR <reason>`` (then exit status 1). Then on stdin, one command per line, each
answered by one stdout line:

    create <partitions> <topic>   ->  OK created | OK exists | ERR <reason>
    quit (or end of input)        ->  the cluster is destroyed and the process exits 0

End of input means the parent is gone, so the child never outlives it.
"""

from __future__ import annotations

import sys

from ._librdkafka import LibrdkafkaError, MockCluster

__all__ = ["main"]


def _answer(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _handle(cluster: MockCluster, command: str) -> str:
    parts = command.split()
    if len(parts) == 3 and parts[0] == "create" and parts[1].isdigit():
        try:
            created = cluster.create_topic(parts[2], int(parts[1]))
        except LibrdkafkaError as exc:
            return f"ERR {exc}"
        return "OK created" if created else "OK exists"
    return f"ERR unknown command {command!r}"


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
