"""The model side of a worker: turns a batch of jobs into one LISA call (the worker loop's ``handler``).

This is where ``model/`` and the queue meet. For a batch it decodes each image once (or finds its encoding in the
LRU cache), refuses the jobs the model cannot take with a ``bad_input`` answer of their own, and runs every
remaining query as one batched generation (teacher-forced jobs as one forward pass).

Every generated answer's projected [SEG] embeddings are kept in a second small LRU cache keyed by (image, question,
model version). A :data:`~worker.client.protocol.REFINE` job reuses them as SAM prompts together with the annotator's
clicks/box and runs SAM's prompt encoder + decoder only; when the answer is no longer cached its query is
generated again first (and the image re-encoded), so a refinement never fails for having been evicted.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import demo_scope, phrasing
from model.defaults import resolve_device
from model.errors import InputError
from model.family import LISA, is_sam3
from model.inference import DEFAULT_MAX_NEW_TOKENS, EncodedImage, LisaPredictor
from model.preprocess import PreprocessedImage
from worker.client.defaults import (
    ANSWER_CACHE_BYTES,
    CACHE_BYTES,
    MAX_DECODED_PIXELS,
    MAX_NEW_TOKENS_LIMIT,
    MODEL_CHECK_INTERVAL_S,
)
from worker.client.protocol import BAD_INPUT, REFINE, Job, Result, refine_prompts
from worker.gpu import switch
from worker.gpu.cache import EncodingCache
from worker.gpu.inputs import decode_image, prompts_in_image
from worker.gpu.version import model_version

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = CACHE_BYTES  # the name worker/gpu/run.py and the benches know


@dataclass
class CachedAnswer:
    """What a refinement needs from an earlier answer: its projected [SEG] prompts (``n x C``) and its text."""

    prompts: torch.Tensor
    text: str

    @property
    def nbytes(self) -> int:
        return self.prompts.numel() * self.prompts.element_size() + len(self.text)


class LisaHandler:
    """Batch function for :class:`worker.gpu.loop.WorkerLoop` around a loaded :class:`LisaPredictor`."""

    family = LISA

    def __init__(self, predictor: LisaPredictor, version: str, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, load_options: dict | None = None,
                 max_decoded_pixels: int = MAX_DECODED_PIXELS, source: dict[str, Any] | None = None,
                 switch_strategy: str = switch.AUTO) -> None:
        self.predictor = predictor
        self.version = version
        self.cache: EncodingCache[EncodedImage] = EncodingCache(cache_bytes)
        #: [SEG] prompts of recent answers, keyed by ("<image hash> <query>", version).
        self.answers: EncodingCache[CachedAnswer] = EncodingCache(ANSWER_CACHE_BYTES)
        self.max_new_tokens = max_new_tokens
        #: Largest image decoded (width x height); larger ones are refused from their header.
        self.max_decoded_pixels = max_decoded_pixels
        #: How to load a promoted model (vision tower, dtype, device, quantization) - as this one was loaded.
        self.load_options = load_options or {}
        #: What is served now, as a registry entry (``version``, ``base``, ``adapter``): reloaded when a
        #: promotion loaded after freeing this model fails.
        self.source = source or {"version": version, "base": None, "adapter": None}
        self.switch_strategy = switch_strategy
        self.switching = False
        self._next_check = 0.0
        #: Serving the offline demo model: pictures unlike its scenes get no answer, every answer a note.
        self.demo = False

    def maybe_switch(self, queue) -> str:
        """Switch to the promoted model version if it changed (called by the worker loop between batches).

        The new model is loaded next to the old one when both fit, else after freeing the old one
        (:mod:`worker.gpu.switch`); a promotion that cannot be loaded leaves the worker serving what it served.
        """
        from worker.client import registry

        if time.monotonic() < self._next_check:
            return self.version
        self._next_check = time.monotonic() + MODEL_CHECK_INTERVAL_S
        entry = registry.current(queue)
        if not entry or entry.get("version") == self.version:
            return self.version
        if switch.free_first(self.switch_strategy, self.predictor.model, self.predictor.device):
            return self._switch_free_first(entry)
        try:
            predictor = self._load(entry)
        except Exception:  # a bad promotion must not take the worker down: keep serving the current model
            log.exception("cannot load promoted model %s; still serving %s", entry.get("version"), self.version)
            return self.version
        self._serve_model(predictor, entry)
        return self.version

    def _switch_free_first(self, entry: dict[str, Any]) -> str:
        """Free the old model, then load the new one (or, failing that, the old one again)."""
        log.info("switching to %s: freeing %s first (both would not fit)", entry.get("version"), self.version)
        self.switching = True
        try:
            self._drop_model()
            try:
                self._serve_model(self._load(entry), entry)
            except Exception:
                log.exception("cannot load promoted model %s; loading %s again", entry.get("version"), self.version)
                self._serve_model(self._load(self.source), self.source)
        finally:
            self.switching = False
        return self.version

    def _load(self, entry: dict[str, Any]) -> LisaPredictor:
        """A predictor for a registry entry (``base`` + optional ``adapter``), loaded like the current one."""
        if not entry.get("base"):
            raise ValueError(f"model {entry.get('version')!r} has no base to load")
        predictor = LisaPredictor.from_pretrained(entry["base"], **self.load_options)
        if entry.get("adapter"):
            from model.adapters import apply_adapter

            predictor = LisaPredictor(apply_adapter(predictor.model, entry["adapter"]), predictor.tokenizer)
        return predictor

    def _drop_model(self) -> None:
        """Release the model and everything computed with it (device memory included)."""
        device = self.predictor.device
        self.predictor = None  # type: ignore[assignment] - only while switching; nothing serves meanwhile
        self.cache = EncodingCache(self.cache.capacity_bytes)
        self.answers = EncodingCache(self.answers.capacity_bytes)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def _serve_model(self, predictor: LisaPredictor, entry: dict[str, Any]) -> None:
        self.predictor, self.version = predictor, str(entry["version"])
        self.source = {"version": self.version, "base": entry.get("base"), "adapter": entry.get("adapter")}
        self.cache = EncodingCache(self.cache.capacity_bytes)  # encodings of the old weights are wrong now
        self.answers = EncodingCache(self.answers.capacity_bytes)
        gc.collect()  # the old model, when it was loaded side by side

    def stats(self) -> dict[str, Any]:
        """Published with the worker's heartbeat."""
        stats: dict[str, Any] = {**self.cache.stats(), "answer_cache_items": len(self.answers)}
        if self.switching:
            stats["state"] = "switching"  # overrides the loop's idle/busy in /health while no model is loaded
        return stats

    def __call__(self, jobs: list[Job]) -> list[Result]:
        results: dict[str, Result] = {}
        t0 = time.perf_counter()
        for job in jobs if self.demo else []:  # model/demo_scope.py: what the demo model can say something about
            problem = demo_scope.picture_problem(job.image, job.image_bytes or b"")
            if problem:
                results[job.id] = Result.error(job.id, BAD_INPUT, problem)
        encoded = self._encode([job for job in jobs if job.id not in results], results)
        t_encode = time.perf_counter() - t0
        generate: dict[int, list[Job]] = defaultdict(list)
        forced: list[Job] = []
        refines: list[Job] = []
        asked: dict[str, str] = {}  # job id -> the question put to the model
        for job in jobs:
            if job.id in results:
                continue
            try:
                asked[job.id] = question = _question(job)
                if job.kind == REFINE:
                    prompts_in_image(job.options, *encoded[job.image].original_hw)
                    refines.append(job)
                    if not question or self.answers.get(self._answer_key(job, question), self.version) is not None:
                        continue  # no query, or its [SEG] prompts are cached: no LLM needed
                limit = self._max_new_tokens(job)
                self.predictor.validate(encoded[job.image], question, job.answer, limit)
            except InputError as e:
                results[job.id] = Result.error(job.id, BAD_INPUT, str(e))
                continue
            (forced if job.answer is not None else generate[limit]).append(job)
        t1 = time.perf_counter()
        for limit, group in generate.items():
            segs = self.predictor.segment([(encoded[j.image], asked[j.id]) for j in group], max_new_tokens=limit)
            self._collect(group, segs, asked, results)
        if forced:
            segs = self.predictor.segment_teacher_forced(
                [(encoded[j.image], asked[j.id], j.answer) for j in forced])
            self._collect(forced, segs, asked, results)
        t2 = time.perf_counter()
        for job in refines:
            if job.id not in results or results[job.id].ok:  # a regenerated answer is replaced by the refinement
                results[job.id] = self._refine(job, asked[job.id], encoded[job.image])
        timings = {"encode_s": t_encode, "model_s": t2 - t1, "refine_s": time.perf_counter() - t2,
                   "batch_jobs": float(len(jobs))}
        for result in results.values():
            result.timings.update(timings)
            if self.demo and result.ok:
                result.note = demo_scope.ANSWER_NOTE
        return [results[job.id] for job in jobs]

    @staticmethod
    def _answer_key(job: Job, question: str) -> str:
        return f"{job.image} {question}"

    def _refine(self, job: Job, question: str, image: EncodedImage) -> Result:
        """SAM's prompt encoder + decoder on the cached image: [SEG] prompts of the last answer to ``question``
        (when given) + clicks/box."""
        points, box = refine_prompts(job.options)  # checked against the image in __call__
        answer = self.answers.get(self._answer_key(job, question), self.version) if question else None
        seg = self.predictor.refine(
            image, None if answer is None else answer.prompts,
            np.array([p[:2] for p in points], dtype=np.float32) if points else None,
            np.array([p[2] for p in points], dtype=np.int64) if points else None,
            None if box is None else np.array(box, dtype=np.float32),
        )
        return Result.from_masks(job.id, seg.masks, seg.scores.tolist(), text="" if answer is None else answer.text,
                                 model_version=self.version, question=question)

    def _max_new_tokens(self, job: Job) -> int:
        value = job.options.get("max_new_tokens", self.max_new_tokens)
        if not isinstance(value, int) or not 1 <= value <= MAX_NEW_TOKENS_LIMIT:
            raise InputError(f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS_LIMIT}, got {value!r}")
        return value

    def _encode(self, jobs: list[Job], results: dict[str, Result]) -> dict[str, EncodedImage]:
        """Encodings of the batch's images: cached ones reused, the others decoded and encoded in one call.

        Any failure of one image - undecodable, over ``max_decoded_pixels``, a shape the model refuses, an error
        of its own in the encoder - answers that image's jobs with ``bad_input`` and leaves the others running.
        Images are decoded one at a time and kept only as their fixed-size model inputs, so a burst of large
        images costs the memory of one (see :data:`worker.client.defaults.MAX_DECODED_PIXELS`).
        """
        encoded: dict[str, EncodedImage] = {}
        todo: dict[str, PreprocessedImage] = {}
        failed: dict[str, str] = {}
        for job in jobs:
            if job.image in encoded or job.image in todo or job.image in failed:
                continue
            hit = self.cache.get(job.image, self.version)
            if hit is not None:
                encoded[job.image] = hit
                continue
            try:
                todo[job.image] = self._preprocess(job.image_bytes or b"")
            except InputError as e:
                failed[job.image] = str(e)
        if todo:
            for key, enc in self._encode_each(todo, failed).items():
                self.cache.put(key, self.version, enc)
                encoded[key] = enc
        for job in jobs:
            if job.image in failed:
                results[job.id] = Result.error(job.id, BAD_INPUT, failed[job.image])
        return encoded

    def _preprocess(self, data: bytes) -> PreprocessedImage:
        """Check an image's size from its header, decode it and make its model inputs (the decoded array is
        dropped on return). Raises :class:`InputError` with a message for the annotator."""
        image = decode_image(data, self.max_decoded_pixels)
        return self.predictor.preprocess(image)

    def _encode_each(self, todo: dict[str, PreprocessedImage], failed: dict[str, str]) -> dict[str, EncodedImage]:
        """One encoder call for all of ``todo``; if it fails, each image alone, so that the image at fault (and
        only it) lands in ``failed``."""
        try:
            return dict(zip(todo, self.predictor.encode_batch(list(todo.values()))))
        except Exception as exc:
            if len(todo) == 1:
                key = next(iter(todo))
                log.exception("encoding image %s failed", key[:12])
                failed[key] = f"the model could not encode the task's image ({type(exc).__name__}: {exc})"
                return {}
            log.warning("encoding %d images failed (%s); encoding each alone", len(todo), exc)
            done: dict[str, EncodedImage] = {}
            for key, pre in todo.items():
                done.update(self._encode_each({key: pre}, failed))
            return done

    def _collect(self, jobs: list[Job], segs: list, asked: dict[str, str], results: dict[str, Result]) -> None:
        for job, seg in zip(jobs, segs):
            if job.answer is None:  # a generated answer: keep its [SEG] prompts for refinements
                self.answers.put(self._answer_key(job, asked[job.id]), self.version,
                                 CachedAnswer(seg.prompt_embeddings, seg.text))
            results[job.id] = Result.from_masks(job.id, seg.masks, seg.scores.tolist(), text=seg.text,
                                                model_version=self.version, question=asked[job.id])


def _question(job: Job) -> str:
    """The question put to the model for ``job``: its ``query`` verbatim, or - a phrased job (an annotator's
    query, :attr:`Job.phrasing`) - the query phrased by the model's one rule (``model/phrasing.py``)."""
    if job.phrasing is None or not job.query:
        return job.query
    return phrasing.question(job.query, job.phrasing.get("phrase"), job.phrasing.get("sentence"))


def load_handler(model: str, vision_tower: str | None, dtype: str, device: str, quantize: str | None,
                 version: str | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 max_decoded_pixels: int = MAX_DECODED_PIXELS, switch_strategy: str = switch.AUTO):
    """Load the model once and wrap it; ``device="auto"`` picks CUDA when present.

    A SAM 3 checkpoint (:mod:`model.family`) gets :class:`worker.gpu.sam3_handler.Sam3Handler` instead of a
    :class:`LisaHandler`; ``vision_tower``, ``quantize`` and ``switch_strategy`` are LISA's alone."""
    if is_sam3(model):
        from worker.gpu.sam3_handler import load_sam3_handler

        if vision_tower or quantize:
            from model.errors import CheckpointError

            raise CheckpointError(f"{model} is a SAM 3 checkpoint: --vision-tower and --quantize are LISA options")
        return load_sam3_handler(model, dtype, device, version, cache_bytes, max_decoded_pixels)
    device = resolve_device(device)
    predictor = LisaPredictor.from_pretrained(model, vision_tower, dtype, device, quantize)
    from model.checkpoint import resolve_model_dir

    hub_id = None if Path(model).expanduser().is_dir() else model
    options = {"vision_tower": vision_tower, "dtype": dtype, "device": device, "quantize": quantize}
    served = model_version(resolve_model_dir(model), version, hub_id)
    handler = LisaHandler(predictor, served, cache_bytes, load_options=options, max_decoded_pixels=max_decoded_pixels,
                          source={"version": served, "base": model, "adapter": None}, switch_strategy=switch_strategy)
    handler.demo = demo_scope.is_demo_model(resolve_model_dir(model))
    log.info("model %s ready on %s as version %s (%s)", model, device, handler.version,
             json.dumps({"dtype": dtype, "quantize": quantize}))
    return handler
