"""HTTP layer: the aiohttp app serving health, files, metrics and the original API."""

from http_files.app import create_app
from http_files.services import AppServices

__all__ = ["AppServices", "create_app"]
