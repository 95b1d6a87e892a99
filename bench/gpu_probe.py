"""What ``bench/bench_gpu.py`` (and ``bench/stage_timers.py``) put around a :class:`~model.inference.LisaPredictor`.

* :func:`install_seg_standin`: random weights never generate ``[SEG]``, so every answer without one gets a stand-in
  ``[SEG]`` state, taken where LISA takes the real one - a final-layer, post-norm hidden state of the LLM: the output
  of the decoding step at which "Sure, [SEG]." would emit ``[SEG]`` (:data:`SEG_STEP`). Generation is unchanged.
* :class:`StageProbe`: seconds and peak GPU memory of each stage of a query - preprocess, CLIP (+ projector), SAM
  encoder, embedding the prompt, LLM prefill, one LLM step per new token, mask decoding - on one loaded predictor.
* :class:`Parts`: a time budget per part of a run, each part run on its own (its first error reported with where it
  happened, the others still run), and a watchdog that prints what was measured and exits if the run overstays.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: Index of the decoding step whose output predicts ``[SEG]`` in "Sure, [SEG].": the prefill's output predicts
#: "Sure" (0), the step fed "Sure" predicts "," (1), the step fed "," predicts "[SEG]" (2).
SEG_STEP = 2


def standin_states(llm_outputs: list, seg_states: list, step: int = SEG_STEP) -> None:
    """Fill the empty rows of ``seg_states`` (``0 x H`` each) in place with ``1 x H`` final-layer states.

    Args:
        llm_outputs: the ``B x H`` last-position outputs of each LLM call of one generation, in order (prefill
            first); ``seg_states``: per row, ``n x H`` (``GenerationOutput.seg_states``).
    """
    if not llm_outputs:
        return
    state = llm_outputs[min(step, len(llm_outputs) - 1)]
    for b, states in enumerate(seg_states):
        if states.shape[0] == 0:
            seg_states[b] = state[b : b + 1].detach().clone()


class SegStandin:
    """``model.inference.greedy_generate`` wrapped so that each answer without ``[SEG]`` gets a stand-in state.

    The states come from a forward hook on the LLM's decoder (``llm.model``), held for the call, recording the last
    position's final-layer output of every decoder call. :meth:`recorded` gives those of the last generation (for
    checks); :meth:`remove` puts the plain function back.
    """

    def __init__(self) -> None:
        import model.inference as inference

        self._inference = inference
        self._generate = getattr(inference.greedy_generate, "standin_of", inference.greedy_generate)
        self._recorded: list = []
        generate = self._generate
        recorded = self._recorded

        def generate_with_seg(llm, embeds, *args, **kwargs):
            recorded.clear()
            handle = llm.model.register_forward_hook(
                lambda _m, _a, out: recorded.append(out.last_hidden_state[:, -1]))
            try:
                out = generate(llm, embeds, *args, **kwargs)
            finally:
                handle.remove()
            standin_states(recorded, out.seg_states)
            return out

        generate_with_seg.standin_of = generate
        inference.greedy_generate = generate_with_seg

    def recorded(self) -> list:
        return list(self._recorded)

    def remove(self) -> None:
        self._inference.greedy_generate = self._generate


def install_seg_standin() -> SegStandin:
    """Give every answer without ``[SEG]`` one stand-in state from now on (see :class:`SegStandin`)."""
    return SegStandin()


class StageProbe:
    """Per-stage wall seconds and peak GPU memory of the queries run on ``predictor`` while installed.

    GPU work is synchronised at each stage's ends, so the seconds are the stage's own. Each stage resets CUDA's
    peak-memory counter when it starts, so a stage's peak is its own; the peak of a whole query is the largest of
    its stages' (every allocation of ``encode``/``segment`` happens inside one of them).
    """

    STAGES = ("preprocess", "clip", "sam", "embed", "prefill", "step", "decode")

    def __init__(self, predictor: Any) -> None:
        import torch

        self.torch = torch
        self.cuda = predictor.device.type == "cuda"
        self.stats: dict[str, dict[str, float]] = {}
        self.prompt_positions = 0
        model = predictor.model
        for owner, attr, stage in ((predictor, "preprocess", "preprocess"), (model, "image_features", "clip"),
                                   (model, "sam_embedding", "sam"), (model, "embed_sequences", "embed"),
                                   (predictor, "_segmentations", "decode")):
            setattr(owner, attr, self._timed(stage, getattr(owner, attr)))
        self._llm_started = 0.0
        self._llm_stage = "step"
        model.llm.model.register_forward_pre_hook(self._llm_pre, with_kwargs=True)
        model.llm.model.register_forward_hook(self._llm_post)

    def reset(self) -> None:
        self.stats = {}

    def _begin(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        return time.perf_counter()

    def _end(self, stage: str, started: float) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
        s = self.stats.setdefault(stage, {"calls": 0, "seconds": 0.0, "peak_gb": 0.0})
        s["calls"] += 1
        s["seconds"] += time.perf_counter() - started
        if self.cuda:
            s["peak_gb"] = max(s["peak_gb"], self.torch.cuda.max_memory_allocated() / 1e9)

    def _timed(self, stage: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            started = self._begin()
            try:
                return fn(*args, **kwargs)
            finally:
                self._end(stage, started)

        return wrapper

    def _llm_pre(self, _module, args, kwargs) -> None:
        embeds = kwargs.get("inputs_embeds")
        length = embeds.shape[1] if embeds is not None else 1
        self._llm_stage = "prefill" if length > 1 else "step"
        if length > 1:
            self.prompt_positions = int(length)
        self._llm_started = self._begin()

    def _llm_post(self, _module, _args, _out) -> None:
        self._end(self._llm_stage, self._llm_started)

    def peak_gb(self) -> float | None:
        """The largest stage peak since :meth:`reset` (``None`` off CUDA)."""
        if not self.cuda:
            return None
        return max((s["peak_gb"] for s in self.stats.values()), default=0.0)

    def summary(self, per: int = 1) -> str:
        """``"clip 12.1 ms (peak 15.6 GB), ..."``: each stage's seconds per query (``per`` queries ran), per call
        for ``step``."""
        parts = []
        for stage in self.STAGES:
            s = self.stats.get(stage)
            if not s:
                continue
            each = s["seconds"] / (s["calls"] if stage == "step" else max(1, per))
            what = f"{stage} {each * 1e3:.1f} ms"
            if stage == "step":
                what += f" x{s['calls'] / max(1, per):.0f}"
            if stage == "prefill":
                what += f" ({self.prompt_positions} pos)"
            if self.cuda:
                what += f" [{s['peak_gb']:.2f} GB]"
            parts.append(what)
        return ", ".join(parts) + (" ([peak GPU memory of the stage])" if self.cuda else "")


def describe(error: BaseException) -> str:
    """An error as one line to act on: type, message, and where in this repository it was raised."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if f.filename.startswith(str(ROOT)) and f.filename != __file__] or frames
    where = "; ".join(f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} in {f.name}" for f in ours[-2:])
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message[:400]}" + (f" (at {where})" if where else "")


class Parts:
    """Runs the parts of a bench, each with its own budget of seconds, within ``total_s`` for the whole run.

    A part gets ``deadline`` (a ``time.perf_counter`` value) to stop repeating by; it is not started when less
    than half its budget is left of the run's. A failure is reported with :func:`describe` and the next part runs.
    If the run is still going ``grace_s`` after ``total_s`` (a part hung), the watchdog prints ``on_overrun()``'s
    report and exits with status 3, so a lent GPU never idles past the run's budget.
    """

    def __init__(self, total_s: float, grace_s: float = 15.0, on_overrun: Callable[[], None] | None = None):
        self.t0 = time.perf_counter()
        self.total_s = total_s
        self.current = "start"
        self.outcomes: dict[str, str] = {}  # part -> "ok" | "FAILED: ..." | "NOT RUN: ..."
        self.errors: dict[str, str] = {}
        self._watchdog = threading.Timer(total_s + grace_s, self._overrun, args=(on_overrun,))
        self._watchdog.daemon = True
        self._watchdog.start()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def run(self, name: str, budget_s: float, fn: Callable[[float], Any]) -> Any:
        """``fn(deadline)``'s result, or ``None`` when it failed or was not started (recorded either way)."""
        if self.left() < budget_s / 2:
            self.outcomes[name] = f"NOT RUN: {self.left():.0f} s of the run's budget left, its own is {budget_s:.0f} s"
            print(f"  {name}: {self.outcomes[name]}", flush=True)
            return None
        self.current = name
        started = time.perf_counter()
        try:
            result = fn(started + min(budget_s, self.left()))
        except Exception as e:  # report and go on: one broken part must not hide the others' figures
            self.errors[name] = describe(e)
            self.outcomes[name] = f"FAILED after {time.perf_counter() - started:.1f} s: {self.errors[name]}"
            print(f"  {name}: {self.outcomes[name]}", flush=True)
            self._free()
            return None
        finally:
            self.current = "between parts"
        spent = time.perf_counter() - started
        self.outcomes[name] = "ok"
        print(f"    [{name}: {spent:.1f} s of its {budget_s:.0f} s; the run at {self.elapsed():.0f} of "
              f"{self.total_s:.0f} s]", flush=True)
        return result

    def stop(self) -> None:
        self._watchdog.cancel()

    @staticmethod
    def _free() -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _overrun(self, on_overrun: Callable[[], None] | None) -> None:
        print(f"\nOVER BUDGET: still in part {self.current!r} {self.elapsed():.0f} s into a {self.total_s:.0f} s run; "
              "stopping here with what was measured", flush=True)
        if on_overrun is not None:
            on_overrun()
        sys.stdout.flush()
        os._exit(3)
