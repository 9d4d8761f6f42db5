"""The `Guard` middleware: it owns a request's `Lease` for the whole life of the HTTP request
and releases it however that ends (response sent, client gone at any point, error,
cancellation), so capacity cannot leak."""

from __future__ import annotations

import asyncio
import secrets

from lmpipe.serve.errors import error_response
from lmpipe.serve.limits import Admission, Lease

LEASE = "lmpipe.lease"  # the ASGI scope key of a request's Lease
DRAIN_BYTES = 16 << 20  # an oversized body up to this is read (and dropped) so the 413 arrives


class Guard:
    """Pure ASGI middleware around the app: the API key, the body (read here, bounded: 413), and
    the request's `Lease`, released when the request ends however it ends. After the body, only
    this middleware reads the connection: a client that leaves releases its lease at once, and
    the app sees `http.disconnect`."""

    def __init__(self, app, admission: Admission, api_key: str | None = None) -> None:
        self.app, self.admission = app, admission
        self.key = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key and scope["path"] != "/health":
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, self.key):
                msg = (
                    "invalid API key" if given else "an API key is required (Authorization: Bearer)"
                )
                response = error_response(
                    401, msg, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                )
                return await response(scope, receive, send)
        body = await self._read_body(scope, receive, send, headers)
        if body is None:
            return
        lease = Lease(self.admission)
        scope[LEASE] = lease
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            lease.release()

        first = True

        async def app_receive():
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        watcher = asyncio.ensure_future(watch())
        try:
            await self.app(scope, app_receive, send)
        finally:
            watcher.cancel()
            lease.release()

    async def _read_body(self, scope, receive, send, headers) -> bytes | None:
        """The whole body, or None once a 413 went out (or the client left mid-upload)."""
        limit = self.admission.limits.max_body_bytes
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        chunks, size = [], 0
        over = declared > limit
        if not over or declared <= DRAIN_BYTES:
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                more = message.get("more_body", False)
                if size > limit:
                    over = True
                    if size > DRAIN_BYTES:
                        break
                elif not over:
                    chunks.append(chunk)
        if over:
            response = error_response(
                413,
                f"the request body is over this server's limit of {limit:,} bytes "
                "(--max-body-bytes)",
            )
            await response(scope, receive, send)
            return None
        return b"".join(chunks)
