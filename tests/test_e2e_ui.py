"""End to end in Label Studio's labeling UI: headless Chromium types a query and submits LISA's suggestion.

The steps are README's "Connect to Label Studio", done literally: the project and its image through the API (as
the README allows), then in the UI: Settings → Model → Connect Model with Interactive preannotations on (the card
shows Connected), open the task, switch Auto-Annotation on, type a query that is too long and press Enter: the
backend's refusal shows in the ``lisa`` box right under the query box, in the 1400×900 window without scrolling.
Then edit the query to a short phrase, Enter: the suggestion comes and the message is gone; accept it (✓), Submit
(201). Then the saved annotation is read back through the API: the brush region is the backend's mask, unchanged
and with ``origin == "prediction"``, LISA's own mask for the question the backend made of the phrase, the ``lisa``
box saved without the stale message (empty; the demo model's note when it answers), and the backend's ``/webhook``
logged its ``ANNOTATION_CREATED`` and captured the sample with the typed query alone.

The walk (:func:`follow_the_readme`) takes a :class:`UITarget`: here the session's Label Studio and lisa-ls stack
(tiny fixture LISA); ``tests/test_docker_stack.py`` walks it once more against the composed stack (Label Studio and
the backend in containers, the demo model).

The browser is Debian's ``chromium`` driven by the Python ``playwright`` package (never a browser playwright
downloads itself), with a fresh profile, and it can reach nothing but loopback. Screenshots of each step are saved
to ``tests/artifacts/`` (git-ignored).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from ls_fixtures import (
    E2E,
    MAX_MASK_MISMATCH,
    PASSWORD,
    USERNAME,
    LSClient,
    case_png,
    missing_dependency,
    reference_mask,
)
from PIL import Image
from redis_fixtures import wait_for

from backend.brush import rle_to_mask
from backend.dataset import Dataset
from backend.query import MAX_QUERY_CHARS
from backend.regions import MESSAGE_ID

pytest_plugins = ["ls_fixtures", "redis_fixtures"]

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # Belt and braces: no name but loopback resolves, so the page cannot reach anything off the machine.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
]
#: What an annotator types; the backend asks LISA "What is the red object in this image? Please output segmentation
#: mask.", a fixture query the tiny LISA answers with [SEG].
QUERY = "the red object"
#: A query the backend refuses (over MAX_QUERY_CHARS): its message must show in the labeling UI.
TOO_LONG = ("the red object " * 80)[: MAX_QUERY_CHARS + 100]
#: The window of the UI tests (issue 22: the message must be visible in it without scrolling).
VIEWPORT = {"width": 1400, "height": 900}
STEP_TIMEOUT_MS = 60_000
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, list[str]]]:
    """A fresh headless Chromium page (1400×900) and the list of off-machine requests it tried (all aborted)."""
    try:
        from playwright import sync_api
    except ImportError:
        missing_dependency("the playwright package is missing (the dev extra: pip install -e '.[dev]')")
    if not CHROMIUM.exists():
        missing_dependency(f"{CHROMIUM} is missing: `apt-get install chromium` (make test does it when run as root)")
    blocked: list[str] = []
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport=VIEWPORT,
        )

        def only_loopback(route, request):
            if urlsplit(request.url).hostname in LOOPBACK or request.url.startswith(("data:", "blob:")):
                route.continue_()
            else:
                blocked.append(request.url)
                route.abort()

        context.route("**/*", only_loopback)
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(STEP_TIMEOUT_MS)
        try:
            yield page, blocked
        finally:
            context.close()
    shutil.rmtree(profile, ignore_errors=True)
    if blocked:
        print(f"requests off the machine that were blocked: {blocked}")


@dataclasses.dataclass(frozen=True)
class UITarget:
    """What :func:`follow_the_readme` walks: a Label Studio, the backend as Label Studio reaches it, a picture, a
    query and the mask the served model gives for it, and where the backend's log and captured samples are read."""

    client: LSClient  # Label Studio's API, as the project's owner (USERNAME / PASSWORD in the UI)
    ls_url: str  # Label Studio as the browser reaches it
    backend_url: str  # the ML backend as Label Studio reaches it (typed into Connect Model)
    picture: Path
    query: str  # a short phrase the served model answers with [SEG]
    expected: np.ndarray  # bool H x W: the served model's mask for ``query`` on ``picture``
    max_mismatch: float  # fraction of pixels that may differ from ``expected``
    backend_log: Callable[[], str]  # the backend's log so far
    sample: Callable[[int, str], dict | None]  # (project id, sample id) -> the captured record, or None (not yet)
    artifacts: Path  # screenshots go here
    prefix: str = "ui"  # screenshot names: <prefix>_<step>.png
    note: tuple[str, ...] = ()  # what the lisa box says with an answer (the demo model names itself)


@contextlib.contextmanager
def screenshots(page, artifacts: Path, prefix: str) -> Iterator[Callable[[str], None]]:
    """``shot(name)`` saves the page as ``<artifacts>/<prefix>_<name>.png`` (earlier ones of ``prefix`` are removed
    first); a step that fails inside leaves ``<prefix>_failure.png`` too."""
    for old in artifacts.glob(f"{prefix}_*.png"):
        old.unlink()

    def shot(name: str) -> None:
        page.screenshot(path=str(artifacts / f"{prefix}_{name}.png"))

    try:
        yield shot
    except Exception:
        with contextlib.suppress(Exception):  # keep the test's own error, whatever the page's state
            shot("failure")
        raise
    finally:
        print(f"UI screenshots: {artifacts}/{prefix}_*.png")


def walk_in_browser(target: UITarget, page) -> None:
    """:func:`follow_the_readme` with a screenshot per step (and one of the page when a step fails)."""
    with screenshots(page, target.artifacts, target.prefix) as shot:
        follow_the_readme(target, page, shot)


def test_typed_query_suggestion_accepted_and_submitted_in_the_labeling_ui(e2e: E2E, browser_page):
    page, _blocked = browser_page

    def sample(project: int, name: str) -> dict | None:
        dataset = e2e.stack.workdir / "model_dir" / "dataset" / f"project-{project}"
        if not (dataset / "samples" / f"{name}.json").exists():
            return None
        return Dataset.open(dataset, create=False).read_sample(name)

    # LISA's own mask for the question the backend makes of the phrase (the fixture's case 1).
    walk_in_browser(UITarget(client=e2e.client, ls_url=e2e.ls.url, backend_url=e2e.stack.url, picture=case_png(1),
                             query=QUERY, expected=reference_mask(1), max_mismatch=MAX_MASK_MISMATCH,
                             backend_log=e2e.stack.backend_log, sample=sample, artifacts=e2e.artifacts), page)


def follow_the_readme(target: UITarget, page, shot) -> None:
    """README "Connect to Label Studio", steps 3 to 6, then what Label Studio and the backend kept."""
    client = target.client

    # Steps 3 and 5 through the API (as the README allows): a project with the recommended config, an image.
    project = client.create_project("e2e ui")
    [task] = client.upload_images(project["id"], [target.picture])
    with Image.open(target.picture) as im:
        width, height = im.size

    # Log in.
    page.goto(f"{target.ls_url}/user/login/")
    page.fill("input[name=email]", USERNAME)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/user/login" not in url)

    # Step 4 in the UI: Settings → Model → Connect Model, Interactive preannotations on, Validate and Save.
    page.goto(f"{target.ls_url}/projects/{project['id']}/settings/ml")
    page.get_by_role("button", name="Add machine learning model").first.click()
    page.fill("input[name=title]", "LISA (e2e ui)")
    page.fill("input[name=url]", target.backend_url)
    interactive = page.locator("input[name=is_interactive]")
    if not interactive.is_checked():
        page.get_by_text("Interactive preannotations", exact=True).click()
    assert interactive.is_checked()
    shot("01_connect_model")
    with page.expect_response(lambda r: r.url.split("?")[0].endswith("/api/ml") and r.request.method == "POST") as info:
        page.get_by_role("button", name="Save machine learning form").click()
    assert info.value.status == 201, info.value.text()
    ml = info.value.json()
    page.get_by_text("Connected", exact=True).first.wait_for()
    shot("02_model_connected")
    ml = client.ml_backend(ml["id"])
    assert ml["state"] == "CO" and ml["is_interactive"] is True and ml["url"] == target.backend_url, ml

    # Step 6: open the task in the labeling UI.
    page.goto(f"{target.ls_url}/projects/{project['id']}/data?task={task['id']}")
    submit = page.get_by_test_id("bottombar-submit-button")
    submit.wait_for()
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('img')).some("
        "i => i.src.includes('/data/upload/') && i.complete && i.naturalWidth > 0)"
    )
    shot("03_task_opened")

    # Switch Auto-Annotation on (the choice persists in the browser, so look before clicking).
    toggle = page.get_by_test_id("bottombar-auto-annotation-toggle")
    if not toggle.is_checked():
        page.get_by_text("Auto-Annotation", exact=True).click()
    wait_for(toggle.is_checked, 10, "Auto-Annotation to be on")
    shot("04_auto_annotation_on")

    # A query the backend refuses: its message appears in the lisa box, next to the query box, in view.
    [said] = ask(page, TOO_LONG)["data"]["result"]
    assert (said["from_name"], said["id"]) == ("lisa", MESSAGE_ID)
    refusal = said["value"]["text"][0]
    assert f"the query is {len(TOO_LONG)} characters long" in refusal
    shown = page.get_by_text(refusal, exact=True)
    shown.wait_for()
    assert_in_view_unscrolled(page, shown)
    shot("05_refused_query_message")

    # Edit the query (pencil) to a short phrase, Enter: the UI posts interactive-annotating, LS forwards it to
    # /predict, and the answer clears the message.
    page.get_by_test_id("htx-textbox-edit-button").first.click()
    body = ask(page, target.query, page.get_by_test_id("htx-textbox-input").first)
    assert "errors" not in body, body
    [suggested, lisa_box] = body["data"]["result"]
    assert (lisa_box["id"], lisa_box["value"]) == (MESSAGE_ID, {"text": list(target.note)})
    assert suggested["origin"] == "prediction" and "score" not in suggested  # SAM's score is uncalibrated
    assert (suggested["original_width"], suggested["original_height"]) == (width, height)
    shown.wait_for(state="detached")  # the stale message is gone from the page
    messages = page.evaluate(
        "() => Htx.annotationStore.selected.serializeAnnotation().filter(r => r.from_name === 'lisa')"
        ".map(r => r.value.text)")
    assert messages == [list(target.note)], messages

    # The suggestion appears (bottom bar: "1 suggestions" with ✗/✓); accept it.
    page.locator(".lsf-auto-accept__info").filter(has_text="1 suggestion").wait_for()
    shot("06_suggestion_shown_message_cleared")
    accept_suggestions(page, 1)
    regions = page.evaluate(
        "() => Htx.annotationStore.selected.regions.map(r => [r.type, r.origin, r.fromSuggestion])"
    )
    assert ["brushregion", "prediction"] in [r[:2] for r in regions], regions
    shot("07_suggestion_accepted")

    # Submit: Label Studio saves the annotation (201).
    saved = submit_annotation(page, client, task["id"])
    annotation_id = saved["id"]
    shot("08_submitted")

    # The saved annotation: the typed query and the backend's brush, unchanged, with origin "prediction"; the
    # lisa box saved as the answer left it (empty, or the demo model's note), not with the refusal.
    texts = {r["from_name"]: r["value"]["text"] for r in saved["result"] if r["type"] == "textarea"}
    assert texts == {"query": [target.query], "lisa": list(target.note)}, texts
    by_type = {r["type"]: r for r in saved["result"]}
    brush = by_type["brushlabels"]
    assert brush["origin"] == "prediction"
    assert brush["value"]["brushlabels"] == ["Target"]
    assert (brush["original_width"], brush["original_height"]) == (width, height)
    mask = rle_to_mask(brush["value"]["rle"], height, width)
    assert np.array_equal(mask, rle_to_mask(suggested["value"]["rle"], height, width))
    assert brush["meta"]["prompt"] == target.query
    # The served model's own mask for the question the backend made of the phrase.
    assert float(np.mean(mask != target.expected)) <= target.max_mismatch

    # And the backend's /webhook received it, and capture made it a sample of the typed query alone.
    wait_for(lambda: any("webhook ANNOTATION_CREATED" in line and f"annotation={annotation_id}" in line
                         for line in target.backend_log().splitlines()), 10, "the ANNOTATION_CREATED webhook")
    record = wait_for(lambda: target.sample(project["id"], f"ls-{project['id']}-{annotation_id}"), 30,
                      "the captured sample")
    assert record["queries"] == [target.query], record


def open_task(page, ls_url: str, project: int, task: int) -> None:
    """Log in (unless the browser already is), open the task in the labeling UI once its image has loaded, and
    switch Auto-Annotation on (the choice persists in the browser, so look before clicking)."""
    page.goto(f"{ls_url}/user/login/")
    if "/user/login" in page.url:  # a logged-in browser is sent on to its projects
        page.fill("input[name=email]", USERNAME)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(lambda url: "/user/login" not in url)
    page.goto(f"{ls_url}/projects/{project}/data?task={task}")
    page.get_by_test_id("bottombar-submit-button").wait_for()
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('img')).some("
        "i => i.src.includes('/data/upload/') && i.complete && i.naturalWidth > 0)"
    )
    toggle = page.get_by_test_id("bottombar-auto-annotation-toggle")
    if not toggle.is_checked():
        page.get_by_text("Auto-Annotation", exact=True).click()
    wait_for(toggle.is_checked, 10, "Auto-Annotation to be on")


def ask(page, query: str, box=None) -> dict:
    """Type ``query`` into the query box (or ``box``, e.g. the pencil's edit box) and press Enter: the body of
    Label Studio's ``interactive-annotating`` answer (200), what ``/predict`` said."""
    box = box or page.get_by_test_id("textarea-input")
    box.fill(query)
    with page.expect_response(lambda r: "interactive-annotating" in r.url, timeout=STEP_TIMEOUT_MS) as info:
        box.press("Enter")
    assert info.value.status == 200
    return info.value.json()


def accept_suggestions(page, n: int) -> None:
    """Accept (✓ on the bottom bar) the ``n`` suggestions shown, and wait until the bar's counter is gone."""
    page.get_by_test_id("bottombar-accept-suggestions-button").click()
    page.locator(".lsf-auto-accept__info").filter(has_text=f"{n} suggestion").wait_for(state="detached")


def submit_annotation(page, client: LSClient, task: int) -> dict:
    """Submit the task's annotation: Label Studio saves it (201, "Annotation saved successfully"); returns it as
    the API reads it back."""
    with page.expect_response(
        lambda r: r.url.split("?")[0].endswith(f"/api/tasks/{task}/annotations") and r.request.method == "POST"
    ) as info:
        page.get_by_test_id("bottombar-submit-button").click()
    assert info.value.status == 201, info.value.text()
    annotation_id = info.value.json()["id"]
    page.get_by_text("Annotation saved successfully", exact=True).wait_for()
    [saved] = [a for a in client.annotations(task) if a["id"] == annotation_id]
    return saved


def assert_in_view_unscrolled(page, locator) -> None:
    """``locator`` lies inside the window and neither the page nor any box around it is scrolled: an annotator
    sees it where it appeared, without scrolling."""
    where = locator.evaluate(
        "el => { const r = el.getBoundingClientRect(); let scrolled = window.scrollY;"
        " for (let e = el.parentElement; e; e = e.parentElement) scrolled += e.scrollTop;"
        " return {top: r.top, bottom: r.bottom, left: r.left, right: r.right, scrolled}; }")
    assert where["scrolled"] == 0, where
    assert 0 <= where["top"] < where["bottom"] <= VIEWPORT["height"], where
    assert 0 <= where["left"] < where["right"] <= VIEWPORT["width"], where
