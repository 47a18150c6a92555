"""A fake object storage for ingestion tests: Django's in-memory storage, but reading a name it does
not hold raises ``ObjectNotFound``, not an ``OSError``, as object-storage backends may (a botocore
``ClientError`` with a 404 from older django-storages' ``S3Storage.size``, Google Cloud's ``NotFound``,
Azure's ``ResourceNotFoundError``). Configure it as ``STORAGES["default"]["BACKEND"]``."""

from __future__ import annotations

from django.core.files.storage import InMemoryStorage

BACKEND = "tests.knowledge.object_storage.ObjectStorage"


class ObjectNotFound(Exception):
    """The storage holds no object of that name (deliberately not an ``OSError``)."""


class ObjectStorage(InMemoryStorage):
    """``InMemoryStorage`` whose reads (``open``, ``size``) of a missing name raise ``ObjectNotFound``;
    ``exists`` and ``delete`` (a missing name is not an error) are ``InMemoryStorage``'s."""

    def _open(self, name, mode="rb"):
        if "w" not in mode and not self.exists(name):
            raise ObjectNotFound(f"NoSuchKey: {name}")
        return super()._open(name, mode)

    def size(self, name):
        if not self.exists(name):
            raise ObjectNotFound(f"NoSuchKey: {name}")
        return super().size(name)
