"""The one mapping from a ServiceError to an HTTP answer, used by FastAPI's handler and the fast path."""

from __future__ import annotations

import json

from ..errors import ServiceError


def error_body(exc: ServiceError) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (Retry-After on 503s that say when), and a JSON body {"error": message}."""
    headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))} if exc.retry_after_s else {}
    return exc.status, headers, json.dumps({"error": str(exc)}).encode()
