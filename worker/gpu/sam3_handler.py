"""The model side of a SAM 3 worker: a batch of jobs -> SAM 3 calls on cached image encodings.

Job protocol (shared with the backend; see :mod:`worker.client.protocol`):

- a :data:`~worker.client.protocol.SEGMENT` job is a concept query: ``query`` is the noun phrase (``phrasing`` is
  not used: SAM 3 takes the phrase as typed) and ``options["threshold"]`` the score threshold (default
  :data:`model.defaults.SAM3_SCORE_THRESHOLD`). Its result holds every instance scoring above it, with its score,
  ``n = 0`` when nothing matches; ``question`` is the phrase as put to the model.
- a :data:`~worker.client.protocol.REFINE` job carries clicks and/or a box in ``options``
  (:func:`~worker.client.protocol.refine_prompts`) and gets the tracker's one mask and its score; its ``query`` may
  be empty (plain interactive segmentation) and is only echoed in ``question``.

Each image is encoded once (the ViT backbone) and kept in an :class:`~worker.gpu.cache.EncodingCache` keyed by
(image hash, model version); every query and click on it afterwards runs the heads only. A job the model cannot
take (an undecodable or too large image, an over-long phrase, a bad threshold, clicks outside the image, a
teacher-forced answer) is answered alone with ``bad_input`` and a message for the annotator.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from model.defaults import SAM3_SCORE_THRESHOLD
from model.errors import InputError
from model.family import SAM3
from model.sam3.modeling import Sam3Encoding, Sam3Predictor
from worker.client.defaults import CACHE_BYTES, MAX_DECODED_PIXELS
from worker.client.protocol import BAD_INPUT, REFINE, Job, Result
from worker.gpu.cache import EncodingCache
from worker.gpu.inputs import decode_image, prompts_in_image
from worker.gpu.version import model_version

log = logging.getLogger(__name__)

#: Default bytes of encodings kept (the worker's one setting): the release's backbone output is 21 MB per image in
#: fp32 (10.6 MB in bf16), so 1 GiB holds about 50 (100) images.
DEFAULT_CACHE_BYTES = CACHE_BYTES


class Sam3Handler:
    """Batch function for :class:`worker.gpu.loop.WorkerLoop` around a loaded :class:`Sam3Predictor`."""

    family = SAM3

    def __init__(self, predictor: Sam3Predictor, version: str, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 max_decoded_pixels: int = MAX_DECODED_PIXELS) -> None:
        self.predictor = predictor
        self.version = version
        self.cache: EncodingCache[Sam3Encoding] = EncodingCache(cache_bytes)
        #: Largest image decoded (width x height); larger ones are refused from their header.
        self.max_decoded_pixels = max_decoded_pixels

    def stats(self) -> dict[str, Any]:
        """Published with the worker's heartbeat."""
        return self.cache.stats()

    def __call__(self, jobs: list[Job]) -> list[Result]:
        results: dict[str, Result] = {}
        t0 = time.perf_counter()
        encoded = self._encode(jobs, results)
        t1 = time.perf_counter()
        clicks = 0.0
        for job in jobs:
            if job.id in results:
                continue
            start = time.perf_counter()
            try:
                results[job.id] = self._answer(job, encoded[job.image])
            except InputError as e:
                results[job.id] = Result.error(job.id, BAD_INPUT, str(e))
            if job.kind == REFINE:
                clicks += time.perf_counter() - start
        t2 = time.perf_counter()
        timings = {"encode_s": t1 - t0, "model_s": t2 - t1 - clicks, "refine_s": clicks,
                   "batch_jobs": float(len(jobs))}
        for result in results.values():
            result.timings.update(timings)
        return [results[job.id] for job in jobs]

    def _answer(self, job: Job, image: Sam3Encoding) -> Result:
        """One job on its encoded image; raises :class:`InputError` for what the annotator must change."""
        if job.answer is not None:
            raise InputError("SAM 3 takes a noun phrase, not a teacher-forced answer; send the phrase as the query")
        if job.kind == REFINE:
            points, box = prompts_in_image(job.options, *image.original_hw)
            clicked = self.predictor.click(image, points, box)
            return Result.from_masks(job.id, clicked.mask[None], [clicked.score], model_version=self.version,
                                     question=job.query)
        phrase = self.predictor.check_phrase(job.query)
        found = self.predictor.find(image, phrase, _threshold(job.options))
        return Result.from_masks(job.id, found.masks, found.scores.tolist(), model_version=self.version,
                                 question=phrase)

    def _encode(self, jobs: list[Job], results: dict[str, Result]) -> dict[str, Sam3Encoding]:
        """Encodings of the batch's images, cached ones reused; an image that cannot be decoded or encoded answers
        its jobs with ``bad_input`` and leaves the others running. Images are decoded one at a time and only
        their encodings kept."""
        encoded: dict[str, Sam3Encoding] = {}
        failed: dict[str, str] = {}
        for job in jobs:
            key = job.image
            if key in encoded or key in failed:
                continue
            hit = self.cache.get(key, self.version)
            if hit is not None:
                encoded[key] = hit
                continue
            try:
                encoded[key] = self._encode_one(job.image_bytes or b"")
            except InputError as e:
                failed[key] = str(e)
                continue
            except Exception as exc:  # an error of the encoder's own on this image fails its jobs only
                log.exception("encoding image %s failed", key[:12])
                failed[key] = f"the model could not encode the task's image ({type(exc).__name__}: {exc})"
                continue
            self.cache.put(key, self.version, encoded[key])
        for job in jobs:
            if job.image in failed:
                results[job.id] = Result.error(job.id, BAD_INPUT, failed[job.image])
        return encoded

    def _encode_one(self, data: bytes) -> Sam3Encoding:
        image = decode_image(data, self.max_decoded_pixels)
        return self.predictor.encode(image)


def _threshold(options: dict[str, Any]) -> float:
    """A concept query's score threshold: ``options["threshold"]``, a number from 0 to 1 (default SAM 3's own)."""
    value = options.get("threshold", SAM3_SCORE_THRESHOLD)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= 1:
        raise InputError(f"the score threshold must be a number from 0 to 1, got {json.dumps(value)[:40]}")
    return float(value)


def load_sam3_handler(model: str, dtype: str, device: str, version: str | None = None,
                      cache_bytes: int = DEFAULT_CACHE_BYTES,
                      max_decoded_pixels: int = MAX_DECODED_PIXELS) -> Sam3Handler:
    """Load a SAM 3 folder or Hub id once and wrap it; ``device="auto"`` picks CUDA when present."""
    predictor = Sam3Predictor.from_pretrained(model, dtype, device)
    folder = Path(model).expanduser()
    hub_id = None if folder.is_dir() else model
    if hub_id is not None:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    served = model_version(folder, version, hub_id)
    handler = Sam3Handler(predictor, served, cache_bytes, max_decoded_pixels)
    log.info("SAM 3 model %s ready on %s as version %s (%s)", model, predictor.device, served,
             json.dumps({"dtype": dtype, "tracker": predictor.tracker is not None}))
    return handler
