"""Label Studio's REST API as the end-to-end tests use it (legacy token), and the ``context`` the labeling UI sends
for a typed query. Used by ``tests/ls_fixtures.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import requests

#: The recommended labeling config (README), which test projects use unless told otherwise.
LABELING_CONFIG_FILE = Path(__file__).resolve().parent.parent / "backend" / "labeling_config.xml"


def labeling_config() -> str:
    """The project's recommended labeling config, ``backend/labeling_config.xml``."""
    return LABELING_CONFIG_FILE.read_text()


class LSError(AssertionError):
    """A Label Studio API call answered with an unexpected status."""


class LSClient:
    """Label Studio's REST API with a legacy token."""

    def __init__(self, url: str, token: str, timeout: float = 120.0) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {token}"

    def request(self, method: str, path: str, expect: tuple[int, ...] = (200, 201), **kwargs: Any) -> Any:
        """Call ``path`` (``/api/...``); the parsed JSON body, or an :class:`LSError` with the response text."""
        kwargs.setdefault("timeout", self.timeout)
        resp = self.session.request(method, self.url + path, **kwargs)
        if resp.status_code not in expect:
            raise LSError(f"{method} {path} -> {resp.status_code} (expected {expect}): {resp.text[:2000]}")
        if resp.status_code == 204 or not resp.content:
            return None
        return resp.json()

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> Any:
        return self.request("PATCH", path, **kwargs)

    # --- projects, tasks, imports -----------------------------------------------------------------------------
    def create_project(self, title: str, label_config: str | None = None, **fields: Any) -> dict:
        body = {"title": title, "label_config": label_config or labeling_config(), **fields}
        return self.post("/api/projects", json=body)

    def tasks(self, project: int) -> list[dict]:
        """Every task of a project, by id."""
        body = self.get("/api/tasks", params={"project": project, "page_size": 1000, "fields": "all"})
        tasks = body["tasks"] if isinstance(body, dict) else body
        return sorted(tasks, key=lambda t: t["id"])

    def task(self, task: int) -> dict:
        return self.get(f"/api/tasks/{task}")

    def upload_images(self, project: int, paths: list[Path]) -> list[dict]:
        """Upload image files as new tasks (multipart import, as the UI's Import does); returns the new tasks."""
        before = {t["id"] for t in self.tasks(project)}
        files = [(f"file{i}", (p.name, p.read_bytes(), "image/png")) for i, p in enumerate(paths)]
        self.post(f"/api/projects/{project}/import", files=files)
        new = [t for t in self.tasks(project) if t["id"] not in before]
        assert len(new) == len(paths), f"uploaded {len(paths)} files, got {len(new)} new tasks"
        # In the order of ``paths``: uploads are stored as /data/upload/<project>/<uuid>-<file name>.
        return [next(t for t in new if str(t["data"]["image"]).endswith("-" + p.name)) for p in paths]

    def import_tasks(self, project: int, tasks: list[dict]) -> dict:
        """Import JSON tasks (``[{"data": {...}}, ...]``)."""
        return self.post(f"/api/projects/{project}/import", json=tasks)

    def set_task_data(self, task: int, data: dict) -> dict:
        return self.patch(f"/api/tasks/{task}", json={"data": data})

    # --- ML backend ---------------------------------------------------------------------------------------------
    def connect_ml_backend(self, project: int, url: str, title: str = "LISA", interactive: bool = True,
                           **fields: Any) -> dict:
        """Add an ML backend to a project (Settings → Model → Connect Model)."""
        body = {"project": project, "url": url, "is_interactive": interactive, "title": title, **fields}
        return self.post("/api/ml", json=body)

    def ml_backend(self, ml_id: int) -> dict:
        return self.get(f"/api/ml/{ml_id}")

    def interactive_annotating(self, ml_id: int, task: int, context: dict | None) -> dict:
        """What the labeling UI posts when a smart prompt is finished; LS answers ``{"data": ...}`` or errors."""
        return self.post(f"/api/ml/{ml_id}/interactive-annotating", json={"task": task, "context": context})

    def retrieve_predictions(self, project: int, task_ids: list[int] | None = None) -> Any:
        """The Data Manager's "Retrieve Predictions" action on all tasks, or on ``task_ids``."""
        selected = {"all": True, "excluded": []} if task_ids is None else {"all": False, "included": task_ids}
        return self.post(
            "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
            json={"selectedItems": selected},
        )

    # --- predictions, annotations -------------------------------------------------------------------------------
    def predictions(self, task: int) -> list[dict]:
        body = self.get("/api/predictions", params={"task": task})
        return body["results"] if isinstance(body, dict) and "results" in body else body

    def annotations(self, task: int) -> list[dict]:
        return self.get(f"/api/tasks/{task}/annotations")

    def create_annotation(self, task: int, result: list[dict], **fields: Any) -> dict:
        return self.post(f"/api/tasks/{task}/annotations", json={"result": result, **fields})


def textarea_context(query: str, from_name: str = "query", to_name: str = "image") -> dict:
    """The ``context`` the labeling UI sends after a query is typed into the TextArea and Enter is pressed."""
    region = {"id": "q1", "from_name": from_name, "to_name": to_name, "type": "textarea", "origin": "manual",
              "value": {"text": [query]}}
    return {"result": [region]}
