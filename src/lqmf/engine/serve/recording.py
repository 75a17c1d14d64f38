"""`lqmf serve --record`: keeping each answer (core/learning.py's completions log) and taking
feedback on it (POST /v1/feedback). Only the server imports this; nothing here loads a model."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request

from lqmf.core.errors import InputError
from lqmf.core.learning import add_feedback, completion_record, completions_log
from lqmf.core.workspace import Workspace


class Recorder:
    """Appends each answer to the workspace's completions log before the response goes out."""

    def __init__(self, workspace: Workspace, task: str):
        self.workspace, self.task = workspace, task
        self.log = completions_log(workspace)

    async def keep(self, ident: str, adapter: str | None, kind: str, prompt: Any, answer: str,
                   labels: list[str] | None = None) -> None:
        record = completion_record(ident, adapter, self.task, kind, prompt, answer, labels)
        await asyncio.to_thread(self.log.append, record)  # on disk (fsync) before the client hears of it


def feedback_router(recorder: Recorder) -> APIRouter:
    """POST /v1/feedback {"id", "rating": "up"|"down", "correction"?}: 200 with what was kept;
    400 for a bad rating or correction, 404 for an id the server never recorded."""
    api = APIRouter()

    @api.post("/v1/feedback")
    async def feedback(request: Request):
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError("the body must be a JSON object: {\"id\", \"rating\", \"correction\"}") from None
        entry = (await asyncio.to_thread(add_feedback, recorder.workspace, [body]))[0]
        return {"object": "feedback", **entry}

    return api
