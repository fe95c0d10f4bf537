"""A real S3-protocol server on 127.0.0.1 for the tests: moto's server mode, which speaks
the S3 HTTP API (signatures, conditional puts, ranges, presigned URLs) as MinIO or AWS do
for what the engine uses. One per session; each test gets a bucket prefix of its own."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx

__all__ = ["S3Server", "StoreLocation"]

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "engine-tests", "AWS_SECRET_ACCESS_KEY": "engine-secret",
               "AWS_REGION": "us-east-1"}
"""What the engine (obstore) reads from the environment to sign its requests."""


@dataclass(frozen=True)
class StoreLocation:
    endpoint: str
    url: str  # s3://bucket/prefix, for STORAGE_URL


class S3Server:
    """``start()`` → ``location(prefix)`` … → ``stop()``."""

    bucket = "engine-tests"

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer  # imported late: a large import

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint = ""

    def start(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        httpx.put(f"{self.endpoint}/{self.bucket}").raise_for_status()

    def location(self, prefix: str) -> StoreLocation:
        return StoreLocation(self.endpoint, f"s3://{self.bucket}/{prefix.strip('/')}")

    def object(self, key: str) -> bytes | None:
        """An object's bytes (key from the bucket's root) read straight from the server,
        signed as any client must (``None``: missing)."""
        import obstore
        from obstore.store import S3Store

        store = S3Store(self.bucket, endpoint=self.endpoint,
                        access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                        region=CREDENTIALS["AWS_REGION"], client_options={"allow_http": True})
        try:
            return bytes(obstore.get(store, key).bytes())
        except FileNotFoundError:
            return None

    def stop(self) -> None:
        self._server.stop()
