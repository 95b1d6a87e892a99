"""The offline demo model says what it is, and gives no answer about a picture unlike its training scenes
(model/demo_scope.py): in its version, in the note of each answer, and through the backend in the ``lisa`` TextArea.

The "photographs" here are made locally: a rocket on a sky (gradient, sensor noise, JPEG), smooth colour fields
with noise, and a greyscale texture - the kinds of picture a new user tries first."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import requests
from backend_fixtures import BackendProcess
from conftest import CHECKPOINT, CLIP_TOWER
from PIL import Image
from redis_fixtures import ROOT, RedisServer, config_env, make_config, wait_for

from backend.labeling import RECOMMENDED_CONFIG, parse_labeling_config
from backend.regions import message_region, with_note
from model.demo import DEMO_DIR
from model.demo_scope import (
    ANSWER_NOTE,
    MIN_STRONG_SHARE,
    MIN_TOP_SHARE,
    REAL_LISA_COMMAND,
    is_demo_model,
    mark_demo_model,
    picture_problem,
    scene_likeness,
)
from model.finetune import SYNTHETIC_VAL_SEED
from model.synthetic import make_scene
from worker.client.protocol import BAD_INPUT, Job, Result

pytest_plugins = ["redis_fixtures", "backend_fixtures"]
EXAMPLES = sorted((DEMO_DIR / "examples").glob("*.png"))


def _jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, "JPEG", quality=quality)
    return out.getvalue()


def _png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, "PNG")
    return out.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def rocket_photo(seed: int = 0, hw: tuple[int, int] = (427, 640)) -> bytes:
    """A rocket on its pad against a blue sky, as a camera gives it: smooth gradients, noise, JPEG."""
    rng = np.random.default_rng(seed)
    h, w = hw
    ramp = np.linspace(0, 1, h)[:, None, None]
    image = np.broadcast_to(np.array([90, 140, 210]) * (1 - ramp) + np.array([170, 200, 235]) * ramp, (h, w, 3))
    image = image.copy()
    yy, xx = np.mgrid[:h, :w]
    body = (np.abs(xx - w / 2) < 30) & (yy > 70) & (yy < 380)
    shade = 150 + 60 * np.cos((xx - w / 2) / 30 * np.pi / 2)
    image[body] = np.stack([shade, shade, 0.95 * shade], -1)[body]
    image[((xx - w / 2) ** 2 / 900 + (yy - 395) ** 2 / 1600) < 1] = [250, 170, 60]
    ground = yy > 390 + 10 * np.sin(xx / 40)
    image[ground] = (np.array([90, 80, 60]) + rng.normal(0, 25, (h, w, 1)))[ground]
    image += rng.normal(0, 4, image.shape)
    return _jpeg(image.clip(0, 255).astype(np.uint8))


def colour_field(seed: int) -> bytes:
    """Smooth random colours with noise (a blurry snapshot)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize((640, 480), Image.BICUBIC)).astype(float)
    return _jpeg((image + rng.normal(0, 6, image.shape)).clip(0, 255).astype(np.uint8))


def grey_texture(seed: int) -> bytes:
    """A greyscale photo-like texture (few shades, no colour: the case the colour count alone misses)."""
    rng = np.random.default_rng(seed)
    small = rng.normal(128, 8, size=(60, 80))
    grey = np.asarray(Image.fromarray(small.clip(0, 255).astype(np.uint8)).resize((640, 480), Image.BICUBIC))
    return _png(np.repeat(grey[..., None], 3, axis=2))


def test_scenes_are_told_from_photographs():
    scenes = [np.asarray(Image.open(p).convert("RGB")) for p in EXAMPLES]
    scenes += [make_scene(SYNTHETIC_VAL_SEED + i).image for i in range(60)]  # held out, training size
    scenes += [make_scene(2 * SYNTHETIC_VAL_SEED + 10 + i, size=256).image for i in range(10)]  # as users import
    for image in scenes:
        likeness = scene_likeness(image)
        assert likeness.like_scenes, likeness
    photos = {"rocket": rocket_photo(), **{f"colour field {i}": colour_field(i) for i in range(3)},
              "grey texture": grey_texture(0)}
    for name, data in photos.items():
        likeness = scene_likeness(_decode(data))
        assert not likeness.like_scenes, (name, likeness)
    grey = scene_likeness(_decode(photos["grey texture"]))
    assert grey.top_share >= MIN_TOP_SHARE and grey.strong_share < MIN_STRONG_SHARE, grey  # caught by colour


def test_the_message_says_why_and_what_serves_real_lisa():
    data = rocket_photo(1)
    message = picture_problem(hashlib.sha256(data).hexdigest(), data)
    assert message and "offline DEMO model knows only pictures of flat coloured shapes" in message
    assert "of its pixels are in its 8 main colours (the demo's scenes: at least 90%)" in message
    assert message.endswith(REAL_LISA_COMMAND) and "none is shown" in message
    scene = EXAMPLES[0].read_bytes()
    assert picture_problem("scene", scene) is None
    assert picture_problem("broken", b"not an image") is None  # the handler's own decoding refuses it


def test_the_demo_model_is_recognised_and_its_version_says_so(tmp_path):
    from worker.gpu.handler import model_version

    assert is_demo_model(DEMO_DIR) and not is_demo_model(CHECKPOINT) and not is_demo_model(tmp_path)
    (tmp_path / "config.json").write_text((CHECKPOINT / "config.json").read_text())
    mark_demo_model(tmp_path)  # what model.demo.build does to the folder it writes
    assert is_demo_model(tmp_path)
    version = model_version(DEMO_DIR)
    assert version.startswith("models/demo@") and "DEMO: coloured shapes only" in version
    assert version.endswith(f"real LISA: {REAL_LISA_COMMAND})")
    assert "DEMO" not in model_version(CHECKPOINT)


def _job(data: bytes, query: str) -> Job:
    job = Job(image=hashlib.sha256(data).hexdigest(), query=query)
    job.image_bytes = data
    return job


def test_a_demo_worker_notes_every_answer_and_refuses_photographs():
    from worker.gpu.handler import load_handler

    handler = load_handler(str(DEMO_DIR), None, "fp32", "cpu", None)
    assert handler.demo
    scene, photo = EXAMPLES[0].read_bytes(), rocket_photo(2)
    question = "What is the leftmost shape in this image? Please output segmentation mask."
    answered, refused = handler([_job(scene, question), _job(photo, "What is the rocket in this image?")])
    assert answered.ok and answered.mask_array().shape[0] == 1 and answered.note == ANSWER_NOTE
    assert refused.status == "error" and refused.error_code == BAD_INPUT and "none is shown" in refused.error_message
    assert handler.cache.misses == 1  # the photograph was not even encoded
    tiny = load_handler(str(CHECKPOINT), str(CLIP_TOWER), "fp32", "cpu", None)
    [plain] = tiny([_job(photo, "What is the red object in this image? Please output segmentation mask.")])
    assert not tiny.demo and plain.ok and plain.note == ""  # other models answer as before, without a note


def test_a_note_goes_into_the_message_textarea():
    setup = parse_labeling_config(RECOMMENDED_CONFIG)
    masks = {"result": [{"id": "m1", "type": "brushlabels"}], "score": 0.5, "model_version": "v"}
    with_note(masks, setup, "a note")
    assert masks["result"][1] == message_region(setup, "a note")
    nothing = {"result": [message_region(setup, "LISA found nothing matching 'x'")], "score": 0, "model_version": "v"}
    assert with_note(nothing, setup, "a note")["result"][0]["value"]["text"] == [
        "LISA found nothing matching 'x' - a note"]
    quiet = {"result": [], "score": 0, "model_version": "v"}
    assert with_note(quiet, setup, "")["result"] == []
    no_textarea = parse_labeling_config(RECOMMENDED_CONFIG.replace('<TextArea name="lisa"', '<Header name="lisa"'))
    assert with_note(quiet, no_textarea, "a note")["result"] == []
    assert Result.from_fields(Result(job_id="j", note="a note").to_fields()).note == "a note"


@pytest.fixture(scope="module")
def demo_backend(tmp_path_factory):
    """Redis, a `lisa-ls worker` serving models/demo, a loopback file server standing in for Label Studio's
    uploads (an example scene and a rocket photograph), and the backend."""
    tmp = tmp_path_factory.mktemp("demo-backend")
    files = {"scene.png": EXAMPLES[0].read_bytes(), "rocket.jpg": rocket_photo(3)}
    server = RedisServer(tmp)
    server.start()
    config = make_config(server.url, job_deadline_s=60.0, result_ttl_s=300, visibility_timeout_s=30.0)
    env = {**os.environ, **config_env(config), "PYTHONPATH": str(ROOT)}
    log = open(tmp / "worker.log", "wb")  # noqa: SIM115 - closed at teardown
    worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", "--model", str(DEMO_DIR), "--device",
                               "cpu"], env=env, stdout=log, stderr=subprocess.STDOUT)

    class Uploads(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = files.get(self.path.rsplit("/", 1)[-1])
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg" if self.path.endswith(".jpg") else "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Uploads))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    backend = BackendProcess(config, tmp, {"LABEL_STUDIO_URL": f"http://127.0.0.1:{httpd.server_address[1]}",
                                           "LABEL_STUDIO_API_KEY": "0" * 40, "MODEL_DIR": str(tmp)})
    try:
        backend.wait_ready()
        from worker.client.connection import connect
        from worker.client.queue import JobQueue

        queue = JobQueue(connect(config=config), config)
        wait_for(queue.live_workers, timeout=90, what="the demo worker")
        yield backend
    finally:
        backend.stop()
        worker.terminate()
        worker.wait(timeout=30)
        log.close()
        httpd.shutdown()
        server.stop()
        print((tmp / "worker.log").read_text(errors="replace")[-3000:])


def _ask(backend, image: str, query: str) -> list[dict]:
    context = {"result": [{"id": "q1", "from_name": "query", "to_name": "image", "type": "textarea",
                           "origin": "manual", "value": {"text": [query]}}]}
    body = {"tasks": [{"id": 1, "data": {"image": f"/data/upload/1/{image}"}}], "project": "1.1700000000",
            "label_config": RECOMMENDED_CONFIG, "params": {"login": None, "password": None, "context": context}}
    r = requests.post(backend.url + "/predict", json=body, timeout=90)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["result"]


@pytest.mark.slow
def test_through_the_backend_the_lisa_textarea_says_it_is_the_demo(demo_backend):
    setup = requests.post(demo_backend.url + "/setup", json={"schema": RECOMMENDED_CONFIG, "project": "1"},
                          timeout=10).json()
    assert "DEMO: coloured shapes only" in setup["model_version"] and REAL_LISA_COMMAND in setup["model_version"]
    scene = _ask(demo_backend, "scene.png", "the leftmost shape")
    assert [r["type"] for r in scene] == ["brushlabels", "textarea"], scene
    assert scene[1]["from_name"] == "lisa" and scene[1]["value"]["text"] == [ANSWER_NOTE]
    photo = _ask(demo_backend, "rocket.jpg", "the rocket")
    assert [r["type"] for r in photo] == ["textarea"], photo  # no mask painted on the photograph
    [text] = photo[0]["value"]["text"]
    assert text.startswith("bad_input: The offline DEMO model knows only pictures of flat coloured shapes"), text
    assert REAL_LISA_COMMAND in text
