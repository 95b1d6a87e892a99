"""A loopback stand-in for the parts of Label Studio that capture and export use, and the webhooks it would send.

:class:`FakeLabelStudio` serves uploaded images (``/data/upload/...``), ``GET /api/projects/<id>`` and the paginated
``GET /api/tasks?project=<id>&fields=all`` (as ``{"tasks": [...], "total": n}`` or, with ``list_shape``, a bare
list; a page past the end is a 404, as Django REST framework answers), all behind ``Authorization: Token``.
:class:`Project` holds the annotations and writes the webhook payloads Label Studio sends for them.

PYTEST_DONT_REWRITE
"""

from __future__ import annotations

import copy
import dataclasses
import http.server
import io
import json
import threading
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

from backend.brush import mask_to_rle

TOKEN = "fedcba9876543210fedcba9876543210fedcba98"
CONFIG = """<View><Image name="image" value="$image"/><TextArea name="query" toName="image"/>
<BrushLabels name="mask" toName="image"><Label value="Target"/><Label value="Other"/><Label value="Ignore"/>
</BrushLabels></View>"""


def png(width: int, height: int, seed: int) -> bytes:
    """A small random PNG (distinct per seed, so each has its own content hash)."""
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
        out, format="PNG")
    return out.getvalue()


def textarea(text: str) -> dict[str, Any]:
    return {"id": "q", "type": "textarea", "from_name": "query", "to_name": "image", "origin": "manual",
            "value": {"text": [text]}}


def brush(mask: np.ndarray, label: str = "Target", origin: str = "manual") -> dict[str, Any]:
    h, w = mask.shape
    return {"id": f"r{label}", "type": "brushlabels", "from_name": "mask", "to_name": "image", "origin": origin,
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]},
            "meta": {"prompt": "p", "model_version": "tiny-1"} if origin != "manual" else {}}


@dataclasses.dataclass
class Project:
    """One Label Studio project: images, tasks and their current annotations (with the webhook payloads)."""

    id: int = 1
    images: dict[str, bytes] = dataclasses.field(default_factory=dict)
    tasks: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    annotations: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def add_task(self, task_id: int, width: int = 32, height: int = 24) -> dict[str, Any]:
        name = f"img{task_id}.png"
        self.images[f"/data/upload/{self.id}/{name}"] = png(width, height, task_id)
        self.tasks[task_id] = {"id": task_id, "data": {"image": f"/data/upload/{self.id}/{name}"},
                               "project": self.id}
        return self.tasks[task_id]

    def annotate(self, annotation_id: int, task_id: int, result: list[dict[str, Any]], minute: int,
                 **extra: Any) -> dict[str, Any]:
        """Create or update an annotation (``minute``: its updated_at); returns the webhook event for it."""
        created = self.annotations.get(annotation_id, {}).get("created_at", _at(minute))
        ann = {"id": annotation_id, "result": result, "task": task_id, "project": self.id, "completed_by": 1,
               "was_cancelled": False, "ground_truth": False, "lead_time": 3.5, "created_at": created,
               "updated_at": _at(minute), "prediction": {}, "parent_prediction": None, **extra}
        action = "ANNOTATION_UPDATED" if annotation_id in self.annotations else "ANNOTATION_CREATED"
        self.annotations[annotation_id] = ann
        return self.event(action, ann)

    def event(self, action: str, ann: dict[str, Any]) -> dict[str, Any]:
        return {"action": action, "annotation": copy.deepcopy(ann), "task": copy.deepcopy(self.tasks[ann["task"]]),
                "project": {"id": self.id, "title": "capture test", "label_config": CONFIG}}

    def delete(self, annotation_id: int) -> dict[str, Any]:
        self.annotations.pop(annotation_id, None)
        return {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": annotation_id}],
                "project": {"id": self.id, "title": "capture test", "label_config": CONFIG}}

    def api_tasks(self) -> list[dict[str, Any]]:
        out = []
        for tid in sorted(self.tasks):
            anns = [copy.deepcopy(a) for a in self.annotations.values() if a["task"] == tid]
            out.append({**copy.deepcopy(self.tasks[tid]), "annotations": anns, "predictions": [], "drafts": []})
        return out


def _at(minute: int) -> str:
    return f"2026-03-01T{10 + minute // 60:02d}:{minute % 60:02d}:00.000000Z"


class FakeLabelStudio:
    """The HTTP server; ``url`` is its base URL. ``image_delay_s`` slows image downloads (a backlog builds)."""

    def __init__(self, project: Project, image_delay_s: float = 0.0, list_shape: bool = False) -> None:
        self.project, self.image_delay_s, self.list_shape = project, image_delay_s, list_shape
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.headers.get("Authorization") != f"Token {TOKEN}":
                    return self._send(401, b'{"detail": "no token"}')
                parts = urlsplit(self.path)
                if parts.path in fake.project.images:
                    time.sleep(fake.image_delay_s)
                    return self._send(200, fake.project.images[parts.path], "image/png")
                if parts.path.rstrip("/") == f"/api/projects/{fake.project.id}":
                    body = {"id": fake.project.id, "title": "capture test", "label_config": CONFIG}
                    return self._send(200, json.dumps(body).encode())
                if parts.path.rstrip("/") == "/api/tasks":
                    return self._tasks(parse_qs(parts.query))
                return self._send(404, b'{"detail": "Not found."}')

            def _tasks(self, query: dict[str, list[str]]) -> None:
                page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["100"])[0])
                tasks = fake.project.api_tasks() if query.get("project") == [str(fake.project.id)] else []
                chunk = tasks[(page - 1) * size : page * size]
                if page > 1 and not chunk:
                    return self._send(404, b'{"detail": "Invalid page."}')
                body = chunk if fake.list_shape else {"tasks": chunk, "total": len(tasks)}
                return self._send(200, json.dumps(body).encode())

            def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
