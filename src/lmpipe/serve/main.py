"""`lmpipe serve`: the app on a host and port, with uvicorn."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable

from lmpipe.serve.app import create_app
from lmpipe.serve.engine import Completer

log = logging.getLogger("lmpipe.serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(
    completer: Completer,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    docs: bool = False,
    warn: Callable[[str], None] = log.warning,
) -> None:
    """Serve until interrupted; `warn` is told when the server is open to the network with no
    API key."""
    import uvicorn

    if not api_key and not is_loopback(host):
        warn(
            f"serving on {host} without an API key: anyone who can reach this address can use "
            "the model (set --api-key or LMPIPE_API_KEY)"
        )
    app = create_app(completer, api_key=api_key or None, docs=docs)
    uvicorn.run(app, host=host, port=port, log_level="info")
