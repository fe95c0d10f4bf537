"""Shared storage: what must outlive an instance (outputs, result caches), in one object
store that every instance of the fleet reads and writes. Without ``STORAGE_URL`` there is
none and the local folders are all there is, as for one instance.

- :mod:`~core.storage.objects`: the object store (obstore), its errors, streamed reads;
- :mod:`~core.storage.outputs`: generated files in the store, served by any instance;
- :mod:`~core.storage.factory`: the store ``STORAGE_URL`` names.
"""

from core.storage.factory import build_object_store
from core.storage.objects import ObjectRead, ObjectStore, StorageError, unavailable
from core.storage.outputs import SharedOutputs

__all__ = ["ObjectRead", "ObjectStore", "SharedOutputs", "StorageError", "build_object_store",
           "unavailable"]
