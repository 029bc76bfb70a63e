"""Streaming multipart/form-data reader that keeps uploads in memory only.

Why not FastAPI's ``UploadFile``: Starlette spools any part over 1 MB to a temporary file on
disk, and a photo of someone's skin must never touch the disk unless the operator opted in
(``store_uploads_dir``). This reader also enforces the size limits while the body streams in,
so a client that omits or lies about Content-Length cannot make the server buffer more than
the limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, Request
from pydantic import TypeAdapter, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect

from app.metrics import Metrics

# Room for multipart boundaries, part headers and small form fields on top of the file limit.
MULTIPART_OVERHEAD = 64 * 1024
MAX_FIELD_BYTES = 1024  # non-file fields are flags like explain=true
MAX_PARTS = 64


@dataclass
class FilePart:
    """One uploaded file, held in memory."""

    index: int
    filename: str | None
    content_type: str | None
    data: bytearray = field(default_factory=bytearray)
    oversized: bool = False  # more than the per-file limit arrived; data was dropped


@dataclass
class ParsedForm:
    """The parts of a multipart body that the route asked for."""

    fields: dict[str, str]
    files: list[FilePart]
    body_bytes: int
    not_files: set[str] = field(default_factory=set)  # file fields sent as plain text
    repeated: set[str] = field(default_factory=set)  # form fields sent more than once


# The client is told, and the connection closed: the rest of the body is not worth reading.
CLOSE = {"Connection": "close"}


def _too_large(detail: str) -> HTTPException:
    return HTTPException(status_code=413, detail=detail, headers=CLOSE)


@dataclass(frozen=True)
class BodyLimits:
    """How long and how slowly a client may send its body (0 rate: no rate check)."""

    timeout_s: float = 60.0
    min_rate_bytes: int = 0
    grace_s: float = 5.0


def _too_slow(detail: str) -> HTTPException:
    return HTTPException(status_code=408, detail=detail, headers=CLOSE)


async def body_chunks(request: Request, limits: BodyLimits) -> AsyncIterator[bytes]:
    """The request body as it arrives, cut off with 408 when it takes too long in total
    or arrives slower than ``min_rate_bytes`` per second on average (after ``grace_s``).

    Raises Starlette's ClientDisconnect when the client goes away (logged as client_closed
    by the middleware, never as a server error).
    """
    started = time.monotonic()
    received = 0
    while True:
        deadline = started + limits.timeout_s
        if limits.min_rate_bytes > 0:
            deadline = min(deadline, started + limits.grace_s + received / limits.min_rate_bytes)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                message = await request.receive()
        except TimeoutError:
            if time.monotonic() - started >= limits.timeout_s:
                raise _too_slow(
                    f"request body not received within {limits.timeout_s:g} s"
                ) from None
            raise _too_slow(
                f"request body arrived slower than {limits.min_rate_bytes} bytes per second"
            ) from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        received += len(chunk)
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


def missing_field(name: str, sent_as_text: bool = False) -> HTTPException:
    """The 422 FastAPI itself answers for a missing form field, same shape."""
    kind, msg = (
        ("value_error", "Expected a file upload (a part with a filename), got a text field")
        if sent_as_text
        else ("missing", "Field required")
    )
    detail = [{"type": kind, "loc": ["body", name], "msg": msg, "input": None}]
    return HTTPException(status_code=422, detail=detail)


def empty_files_error(name: str, files: Iterable[FilePart]) -> HTTPException | None:
    """The 422 for file parts without a byte (the schema says minLength 1), else None."""
    empty = [f.index for f in files if not f.data and not f.oversized]
    if not empty:
        return None
    many = name.endswith("s")  # /predict/batch's `files` is an array
    return HTTPException(
        status_code=422,
        detail=[
            {
                "type": "string_too_short",
                "loc": ["body", name, i] if many else ["body", name],
                "msg": "the file is empty",
                "input": "",
            }
            for i in empty
        ],
    )


class _Collector:
    """python-multipart callbacks that collect parts into memory within the limits."""

    def __init__(
        self,
        file_fields: Iterable[str],
        form_fields: Iterable[str],
        max_file_bytes: int,
        max_files: int,
        too_many_files: HTTPException,
        require_filename: bool = True,
    ) -> None:
        self.file_fields = set(file_fields)
        self.form_fields = set(form_fields)
        self.max_file_bytes = max_file_bytes
        self.max_files = max_files
        self.too_many_files = too_many_files
        self.fields: dict[str, str] = {}
        self.files: list[FilePart] = []
        self.not_files: set[str] = set()
        self.repeated: set[str] = set()
        self.require_filename = require_filename
        self.parts = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._content_type: bytes | None = None
        self._file: FilePart | None = None
        self._field: tuple[str, bytearray] | None = None

    def callbacks(self) -> Any:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise HTTPException(status_code=400, detail=f"more than {MAX_PARTS} form parts")
        self._disposition = b""
        self._content_type = None
        self._file = None
        self._field = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        name = bytes(self._header_name).lower()
        if name == b"content-disposition":
            self._disposition = bytes(self._header_value)
        elif name == b"content-type":
            self._content_type = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name in self.file_fields and self.require_filename and b"filename" not in options:
            # A plain text part is not a file upload (browsers and curl -F name=@file always
            # send a filename, an empty one for an unused picker): read and discarded.
            self.not_files.add(name)
        elif name in self.file_fields:
            if len(self.files) >= self.max_files:
                raise self.too_many_files
            raw_filename = options.get(b"filename")
            self._file = FilePart(
                index=len(self.files),
                filename=raw_filename.decode("utf-8", "replace") if raw_filename else None,
                content_type=self._content_type.decode("latin-1") if self._content_type else None,
            )
            self.files.append(self._file)
        elif name in self.form_fields and b"filename" not in options:
            if name in self.fields:
                self.repeated.add(name)
            self._field = (name, bytearray())
            # Stored by reference; filled by on_part_data.
            self.fields[name] = ""
        # Any other part is read and discarded (still counted against the body limit).

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._file is not None:
            if self._file.oversized:
                return
            if len(self._file.data) + len(chunk) > self.max_file_bytes:
                self._file.oversized = True
                self._file.data = bytearray()  # free it: the file is rejected anyway
                return
            self._file.data += chunk
        elif self._field is not None:
            name, buf = self._field
            if len(buf) + len(chunk) > MAX_FIELD_BYTES:
                raise HTTPException(status_code=400, detail=f"form field {name!r} is too long")
            buf += chunk
            self.fields[name] = buf.decode("utf-8", "replace")


async def read_multipart(
    request: Request,
    *,
    file_fields: Iterable[str],
    form_fields: Iterable[str] = (),
    max_file_bytes: int,
    max_body_bytes: int,
    max_files: int,
    too_many_files: HTTPException,
    body_limits: BodyLimits | None = None,
    require_filename: bool = True,
) -> ParsedForm:
    """Read a multipart body into memory, enforcing the limits as bytes arrive.

    Raises HTTPException 413 (body over the limit), ``too_many_files`` (more than
    ``max_files`` files), 415 (not multipart), 408 (body too slow, see body_chunks) or 400
    (malformed, or cut short before its closing boundary). A file over
    ``max_file_bytes`` is returned with ``oversized=True`` so the batch route can report it
    per file; the single-file route turns it into a 413.
    """
    content_type = request.headers.get("content-type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        # Cheap early answer; the streaming count below is what actually protects memory.
        raise _too_large(f"request body is larger than {max_body_bytes} bytes")
    if not content_type:
        if declared in (None, "0"):
            return ParsedForm(fields={}, files=[], body_bytes=0)
        raise HTTPException(status_code=415, detail="send the image as multipart/form-data")
    mime, params = parse_options_header(content_type)
    if mime != b"multipart/form-data":
        raise HTTPException(
            status_code=415,
            detail="send the image as multipart/form-data (a form with a file field)",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPException(status_code=400, detail="multipart body without a boundary")

    collector = _Collector(
        file_fields, form_fields, max_file_bytes, max_files, too_many_files, require_filename
    )
    total = 0
    try:
        parser = MultipartParser(boundary, collector.callbacks())
        async for chunk in body_chunks(request, body_limits or BodyLimits()):
            total += len(chunk)
            if total > max_body_bytes:
                raise _too_large(f"request body is larger than {max_body_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise HTTPException(status_code=400, detail="malformed multipart body") from exc
    if total and parser.state != MultipartState.END:
        # python-multipart holds back the bytes that might start the boundary; without the
        # closing boundary the last part would silently lose them.
        raise HTTPException(
            status_code=400, detail="incomplete multipart body: no closing boundary"
        )
    return ParsedForm(
        fields=collector.fields,
        files=collector.files,
        body_bytes=total,
        not_files=collector.not_files,
        repeated=collector.repeated,
    )


async def read_upload(request: Request, metrics: Metrics, **limits: Any) -> ParsedForm:
    """read_multipart with the app's body limits, counting a refused body in the metrics
    and the request log line.

    Per-file problems (not an image, too large) are counted later, where they are found.
    """
    settings = getattr(request.app.state, "settings", None)
    if settings is not None and "body_limits" not in limits:
        limits["body_limits"] = BodyLimits(
            timeout_s=settings.body_timeout_s,
            min_rate_bytes=settings.body_min_rate_bytes,
            grace_s=settings.body_rate_grace_s,
        )
    try:
        return await read_multipart(request, **limits)
    except HTTPException as exc:
        reasons = {408: "body_timeout", 413: "too_large", 415: "not_multipart"}
        reason = reasons.get(exc.status_code, "bad_request")
        metrics.rejected_inputs.labels(reason=reason).inc()
        request.state.outcome = f"rejected:{reason}"
        raise


_BOOL = TypeAdapter(bool)


def _as_bool(value: str) -> bool | None:
    try:
        return _BOOL.validate_python(value)
    except ValidationError:
        return None


def form_flag(form: ParsedForm, name: str) -> bool:
    """A boolean form field, read by the rules FastAPI applies to the same query parameter
    (true/false, 1/0, yes/no, on/off); missing means false. Anything else, or the field
    sent twice, is the 422 a bad query value gets.
    """
    value = form.fields.get(name)
    if value is None:
        return False
    flag = _as_bool(value)
    if flag is None or name in form.repeated:
        raise HTTPException(
            status_code=422,
            detail=[
                {
                    "type": "bool_parsing",
                    "loc": ["body", name],
                    "msg": "Input should be a valid boolean, unable to interpret input",
                    "input": value,
                }
            ],
        )
    return flag
