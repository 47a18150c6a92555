"""The upload size limit applied while a request's files are received.

``SizeLimitedUploadHandler`` goes first in a request's upload handlers: once a file passes
``INGEST_MAX_FILE_BYTES`` it raises Django's ``SkipFile``, so the rest of that file is read from the
connection and thrown away instead of being kept in memory or written to the temporary file (the
handlers after it keep at most the limit plus one 64 KB chunk, and Django closes and deletes that
temporary file). Files within the limit go on to Django's usual handlers: in memory up to
``FILE_UPLOAD_MAX_MEMORY_SIZE``, streamed to a temporary file above it. The names of refused files
are kept on the handler, for the view to report.

Django's documented way to change upload handlers in a view protected against CSRF is used
(``refusing_oversized_uploads``): the view is exempted from the CSRF middleware, which would parse
the body before the handler is in place, and the view it wraps checks CSRF itself.
"""

from __future__ import annotations

from functools import wraps

from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler, SkipFile
from django.views.decorators.csrf import csrf_exempt


class SizeLimitedUploadHandler(FileUploadHandler):
    """Skips every file of the request larger than ``limit_bytes`` (default
    ``settings.INGEST_MAX_FILE_BYTES``); ``refused`` lists their names in the order received.
    Passes the bytes of the other files on unchanged and produces no file itself."""

    def __init__(self, request=None, limit_bytes: int | None = None):
        super().__init__(request)
        self.limit_bytes = settings.INGEST_MAX_FILE_BYTES if limit_bytes is None else limit_bytes
        self.refused: list[str] = []
        self.received = 0

    def new_file(self, *args, **kwargs):
        super().new_file(*args, **kwargs)
        self.received = 0

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        # SkipFile only from here, never from new_file: Django then closes the handlers' files of
        # this file (from new_file that would be the previous, already received file's).
        self.received += len(raw_data)
        if self.received > self.limit_bytes:
            self.refused.append(self.file_name)
            raise SkipFile
        return raw_data

    def file_complete(self, file_size: int) -> None:
        return None  # the next handler (memory or temporary file) makes the file


def refusing_oversized_uploads(view):
    """Wrap ``view`` (which must check CSRF itself, as ``AdminSite.admin_view`` does) so its
    request's files pass ``SizeLimitedUploadHandler`` first; the view finds it with
    ``refused_uploads(request)``."""

    @csrf_exempt
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        request.upload_handlers.insert(0, SizeLimitedUploadHandler(request))
        return view(request, *args, **kwargs)

    return wrapper


def refused_uploads(request) -> list[str]:
    """Names of the files of ``request`` refused for their size while they were received (empty when
    the view is not wrapped by ``refusing_oversized_uploads``)."""
    for handler in request.upload_handlers:
        if isinstance(handler, SizeLimitedUploadHandler):
            return list(handler.refused)
    return []
