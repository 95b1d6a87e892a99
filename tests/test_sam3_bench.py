"""bench/bench_sam3.py and bench_gpu.py --family sam3 on the CPU at the tiny geometry: every part runs and
reports (no timing is asserted)."""

from __future__ import annotations

from bench import bench_gpu, bench_sam3


def test_bench_sam3_reports_every_stage_and_the_ratios(capsys):
    res = bench_sam3.run("tiny", "cpu", "fp32", images=1, queries=1, clicks=2, threshold=0.0, hw=(48, 64))
    out = capsys.readouterr().out
    assert {"encode_s", "query_s", "click_s", "query_per_encode", "click_per_encode"} <= set(res)
    assert "SAM 3 tiny geometry" in out and "ratios: query/encode" in out and "10 instances" in out


def test_bench_gpu_sam3_parts_run_on_the_cpu(capsys):
    code = bench_gpu.main(["--family", "sam3", "--geometry", "tiny", "--device", "cpu", "--allow-cpu", "--modes",
                           "fp32,4bit", "--repeats", "2", "--cold", "1", "--batches", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "modes ['4bit'] skipped" in out
    for line in ("(a) SAM 3 warm (fp32): concept query p50", "(b) SAM 3 cold (fp32):",
                 "(c) SAM 3 pre-label (fp32):", "images/GPU-hour", "SAM 3 (d) weights / peak GB"):
        assert line in out, (line, out)
