"""The upstream's status shape, as the gateway answers it and as webhooks carry it."""

from __future__ import annotations

from typing import Any

from .store import HandleView


def status_body(view: HandleView) -> dict[str, Any]:
    """The upstream's status shape, with the gateway's handle as ``request_id``."""
    return {
        "request_id": view.handle,
        "status": view.status,
        "model_id": view.model,
        "error": view.error,
        "output": view.output,
        "created_at": view.created_at,
        "updated_at": view.updated_at,
        "completed_at": view.completed_at,
    }
