"""Promotion: the rule, the registry, and running workers switching version without a restart."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import CHECKPOINT, CLIP_TOWER, case_image
from redis_fixtures import ROOT, config_env, wait_for

from model.finetune import FinetuneConfig, finetune
from worker.client import registry
from worker.client.protocol import Job
from worker.gpu.promote import better, promote_run

pytest_plugins = ["redis_fixtures"]


def test_promotion_rule():
    assert better({"giou": 0.61}, {"giou": 0.60})
    assert not better({"giou": 0.60}, {"giou": 0.60})  # a tie keeps the served version
    assert not better({"giou": 0.62}, {"giou": 0.60}, margin=0.05)


def test_running_worker_switches_to_a_promoted_adapter(job_queue, queue_config, tmp_path):
    run = tmp_path / "run"
    finetune(FinetuneConfig(base=str(CHECKPOINT), vision_tower=str(CLIP_TOWER), out=str(run), mode="lora", steps=1,
                            batch_size=1, grad_accum=1, lr=1e-2, warmup_steps=0, eval_every=1, eval_examples=2,
                            device="cpu"))
    env = {**os.environ, **config_env(queue_config), "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", "--model", str(CHECKPOINT),
                             "--vision-tower", str(CLIP_TOWER), "--device", "cpu", "--model-version", "base-v0"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        workers = wait_for(job_queue.live_workers, timeout=60, what="the worker")
        assert workers[0]["model_version"] == "base-v0"
        decision = promote_run(run, ["synthetic"], job_queue, force=True)
        assert decision["promoted"] and registry.current(job_queue)["version"] == decision["candidate"]
        wait_for(lambda: job_queue.live_workers()[0]["model_version"] == decision["candidate"], timeout=60,
                 what="the worker to switch versions")
        key = job_queue.put_image(case_image(1).read_bytes())
        job = Job(image=key, query="the red object", answer="Sure, [SEG].")
        job_queue.submit(job)
        result = job_queue.wait(job, timeout=60)
        assert result.ok and result.model_version == decision["candidate"]
        assert (run / "promotion.json").is_file()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        print((tmp_path / "worker.log").read_text(errors="replace")[-2000:])
