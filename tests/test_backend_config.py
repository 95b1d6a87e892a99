"""Backend settings from the environment (``backend.config``) and the ``serve`` command line (``backend.cli``)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

import backend.config
from backend.cli import add_backend_parsers, config_from_args, gunicorn_options, run_serve
from backend.config import BackendConfig, redact_url
from backend.images import FetchSettings
from backend.state import status_config
from worker.client.defaults import ENV_PREFIX, REDIS_URL, QueueConfig

ROOT = Path(__file__).resolve().parents[1]


def test_defaults() -> None:
    config = BackendConfig.from_env({})
    assert (config.host, config.port, config.workers, config.threads) == ("0.0.0.0", 9090, 1, 64)
    assert config.predict_deadline_s == 60.0 and config.predict_deadline_s < 100  # Label Studio's predict timeout
    assert config.log_level == "INFO" and config.basic_auth is None
    assert config.label_studio_url == "" and config.label_studio_api_key == ""
    assert config.redis_url == REDIS_URL and config.queue == QueueConfig()


def test_every_variable_is_read() -> None:
    env = {
        "LABEL_STUDIO_URL": "http://ls.example:8080/",
        "LABEL_STUDIO_API_KEY": "token123",
        "MODEL_DIR": "/srv/lisa",
        "LOG_LEVEL": "debug",
        "WORKERS": "3",
        "THREADS": "16",
        "BASIC_AUTH_USER": "u",
        "BASIC_AUTH_PASS": "p",
        "REDIS_URL": "redis://redis:6379/2",
        "LISA_LS_HOST": "127.0.0.1",
        "LISA_LS_PORT": "9191",
        "LISA_LS_PREDICT_DEADLINE_S": "45.5",
        "LISA_LS_HEALTH_TIMEOUT_S": "0.3",
        "LISA_LS_BATCH_SIZE": "4",  # a queue setting: lands in config.queue
        "LISA_LS_QUERY_FIELD": "question",
        "LISA_LS_DEFAULT_LABEL": "Target",
        "LISA_LS_SPLIT_INSTANCES": "1",
        "LISA_LS_MIN_SCORE": "0.5",
        "LISA_LS_MIN_AREA": "64",
        "LISA_LS_PHRASE_TEMPLATE": "Where is {}? Please output segmentation mask.",
        "LISA_LS_SENTENCE_TEMPLATE": "{} Please respond with segmentation mask.",
        "LISA_LS_CAPTURE": "0",
        "LISA_LS_DATASET_DIR": "/srv/datasets",
        "LISA_LS_VAL_PERCENT": "20",
        "LISA_LS_CAPTURE_BACKLOG": "500",
        "LISA_LS_CAPTURE_RECLAIM_S": "30",
        "LISA_LS_MAX_BODY_MB": "8",  # request and capture sizes (issue 18)
        "LISA_LS_CAPTURE_BACKLOG_MB": "64",
        "LISA_LS_FETCH_MAX_BYTES": "1000000",
        "LISA_LS_FETCH_MAX_PIXELS": "4000000",
        "LISA_LS_FETCH_CONNECT_TIMEOUT_S": "2",
        "LISA_LS_FETCH_READ_TIMEOUT_S": "3",
        "LISA_LS_FETCH_DEADLINE_S": "12.5",
        "LISA_LS_FETCH_MAX_REDIRECTS": "0",
        "LISA_LS_TLS_VERIFY": "0",
        "LISA_LS_ALLOWED_PRIVATE_HOSTS": "minio.internal:9000, Cache.Local",
        "LISA_LS_FETCH_CONCURRENCY": "6",
        "LISA_LS_FETCH_PER_HOST": "2",
        "LISA_LS_POLYGON_TOLERANCE": "1.5",
    }
    config = BackendConfig.from_env(env)
    assert config.label_studio_url == "http://ls.example:8080"  # trailing slash dropped
    assert config.label_studio_api_key == "token123" and config.model_dir == "/srv/lisa"
    assert config.log_level == "DEBUG" and (config.workers, config.threads) == (3, 16)
    assert config.basic_auth == ("u", "p")
    assert config.redis_url == "redis://redis:6379/2" and config.queue.batch_size == 4
    assert (config.host, config.port) == ("127.0.0.1", 9191)
    assert config.predict_deadline_s == 45.5 and config.health_timeout_s == 0.3
    assert (config.query_field, config.default_label, config.split_instances) == ("question", "Target", 1)
    assert (config.min_score, config.min_area) == (0.5, 64)
    assert config.phrase_template.startswith("Where is")
    assert config.sentence_template.endswith("respond with segmentation mask.")
    assert (config.capture, config.dataset_root, config.val_percent) == (0, "/srv/datasets", 20)
    assert (config.capture_backlog, config.capture_reclaim_s) == (500, 30.0)
    assert (config.max_body_mb, config.capture_backlog_mb) == (8, 64)
    with pytest.raises(ValueError, match="LISA_LS_MAX_BODY_MB=65 must be at least 1 and at most"):
        BackendConfig.from_env({**env, "LISA_LS_MAX_BODY_MB": "65"})
    assert (config.fetch_slots, config.fetch_slots_per_host) == (6, 2)
    fetch = FetchSettings.from_config(config)  # the one way every fetcher is built (server, capture, CLIs)
    assert fetch == FetchSettings(
        label_studio_url="http://ls.example:8080", api_key="token123", max_bytes=1_000_000, max_pixels=4_000_000,
        connect_timeout_s=2.0, read_timeout_s=3.0, deadline_s=12.5, max_redirects=0, tls_verify=False,
        allowed_private_hosts=("minio.internal:9000", "cache.local"))
    assert config.polygon_tolerance == 1.5
    assert set(BackendConfig.variables()) == set(env) - {"REDIS_URL", "LISA_LS_BATCH_SIZE"}


def test_empty_values_keep_defaults_and_overrides_win() -> None:
    config = BackendConfig.from_env({"THREADS": "", "LISA_LS_PORT": " "}, workers=2)
    assert config.threads == 64 and config.port == 9090 and config.workers == 2
    assert BackendConfig.from_env({"WORKERS": "5"}, workers=2).workers == 2


def test_label_studio_host_is_a_fallback() -> None:
    assert BackendConfig.from_env({"LABEL_STUDIO_HOST": "http://old:8080"}).label_studio_url == "http://old:8080"
    both = {"LABEL_STUDIO_HOST": "http://old:8080", "LABEL_STUDIO_URL": "http://new:8080"}
    assert BackendConfig.from_env(both).label_studio_url == "http://new:8080"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"WORKERS": "many"}, "WORKERS"),
        ({"THREADS": "0"}, "THREADS"),
        ({"LISA_LS_PORT": "70000"}, "LISA_LS_PORT"),
        ({"LISA_LS_PREDICT_DEADLINE_S": "soon"}, "LISA_LS_PREDICT_DEADLINE_S"),
        ({"LISA_LS_HEALTH_TIMEOUT_S": "-1"}, "LISA_LS_HEALTH_TIMEOUT_S"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"BASIC_AUTH_USER": "only-the-user"}, "BASIC_AUTH_PASS"),
        ({"LISA_LS_BATCH_SIZE": "x"}, "LISA_LS_BATCH_SIZE"),
        ({"LISA_LS_VAL_PERCENT": "101"}, "LISA_LS_VAL_PERCENT"),
        ({"LISA_LS_FETCH_DEADLINE_S": "0"}, "LISA_LS_FETCH_DEADLINE_S"),
        ({"LISA_LS_FETCH_MAX_BYTES": "lots"}, "LISA_LS_FETCH_MAX_BYTES"),
        ({"LISA_LS_TLS_VERIFY": "/no/such/ca.pem"}, "LISA_LS_TLS_VERIFY"),
        ({"LISA_LS_ALLOWED_PRIVATE_HOSTS": "http://minio/"}, "LISA_LS_ALLOWED_PRIVATE_HOSTS"),
        ({"THREADS": "8", "LISA_LS_FETCH_CONCURRENCY": "8"}, "LISA_LS_FETCH_CONCURRENCY"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        BackendConfig.from_env(env)


def test_fetch_bounds_default_below_the_thread_count(tmp_path: Path) -> None:
    # Auto: half the threads for all fetches, half of that per host, and waiters for a slot only as many as
    # leave an eighth of the threads free, so /health and /webhook always find one.
    envs = [{}, {"THREADS": "8"}, {"THREADS": "2"}, {"THREADS": "8", "LISA_LS_FETCH_PER_HOST": "9"}]
    bounds = [(c.fetch_slots, c.fetch_slots_per_host, c.fetch_waiters) for c in map(BackendConfig.from_env, envs)]
    assert bounds == [(32, 16, 24), (4, 2, 3), (1, 1, 0), (4, 4, 3)]  # fetching + waiting < threads, always
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    assert BackendConfig.from_env({"LISA_LS_TLS_VERIFY": str(bundle)}).tls_verify == str(bundle)
    assert BackendConfig.from_env({"LISA_LS_TLS_VERIFY": "yes"}).tls_verify is True
    assert FetchSettings.from_config(BackendConfig.from_env({})) == FetchSettings()  # the documented defaults


def test_backend_names_do_not_collide_with_queue_names() -> None:
    queue_names = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(QueueConfig)}
    assert not queue_names & set(BackendConfig.variables())


def test_every_variable_is_documented_in_the_module_docstring() -> None:
    documented = set(re.findall(r"``([A-Z][A-Z_]+)``", backend.config.__doc__ or ""))
    assert set(BackendConfig.variables()) | {"REDIS_URL"} <= documented


def test_secrets_stay_out_of_repr_and_urls() -> None:
    config = BackendConfig(label_studio_api_key="tok-SECRET", basic_auth_user="u", basic_auth_pass="pw-SECRET")
    assert "SECRET" not in repr(config)
    assert redact_url("redis://:hunter2@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact_url("rediss://user:hunter2@[::1]:6380/1") == "rediss://user:***@[::1]:6380/1"
    assert redact_url("redis://redis:6379/0") == "redis://redis:6379/0"
    assert "hunter2" not in redact_url("redis://:hunter2@host:notaport/0")


def test_status_timeouts_fit_the_health_budget() -> None:
    fast = status_config(BackendConfig(health_timeout_s=0.4))
    assert fast.connect_timeout_s == fast.socket_timeout_s == 0.2 and fast.redis_down_after_s == 0.4
    assert fast.wait_slice_s < fast.socket_timeout_s


def _serve_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_backend_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", *argv])


def test_serve_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISA_LS_PORT", "9191")
    monkeypatch.setenv("THREADS", "12")
    config = config_from_args(_serve_args(["--port", "9292", "--workers", "2"]))
    assert (config.port, config.workers, config.threads, config.host) == (9292, 2, 12, "0.0.0.0")
    options = gunicorn_options(config)
    assert options["bind"] == "0.0.0.0:9292" and options["worker_class"] == "gthread"
    assert (options["workers"], options["threads"]) == (2, 12)
    assert options["graceful_timeout"] >= config.predict_deadline_s and options["accesslog"] is None
    assert gunicorn_options(dataclasses.replace(config, host="::1"))["bind"] == "[::1]:9292"


def test_serve_reports_a_bad_environment(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("WORKERS", "lots")
    assert run_serve(_serve_args([])) == 2
    assert "WORKERS='lots'" in capsys.readouterr().err


def test_backend_imports_no_model_code() -> None:
    # The backend image has no torch; the same rule the repository's hook enforces.
    forbidden = re.compile(r"^\s*(import|from) (torch|transformers|model)\b", re.MULTILINE)
    for path in (ROOT / "backend").glob("*.py"):
        assert not forbidden.search(path.read_text()), path


def test_backend_loads_without_torch() -> None:
    code = (
        "import sys, backend.app, backend.cli, backend.status, worker.client.metrics; "
        "bad = sorted(m for m in ('torch', 'transformers', 'model') if m in sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
