"""The job protocol: lossless, compact encodings of jobs, results and masks (and that they survive real Redis)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import redis

from worker.client.protocol import (
    BAD_INPUT,
    DEAD_LETTER,
    ERROR_CODES,
    Job,
    Result,
    decode_masks,
    encode_masks,
    image_hash,
    pack_fields,
    unpack_fields,
)

pytest_plugins = ["redis_fixtures"]

DIGEST = hashlib.sha256(b"img").hexdigest()


def _disc_masks(n: int, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return np.stack([(yy - height / 2) ** 2 + (xx - width / (i + 2)) ** 2 < (height / 4) ** 2 for i in range(n)])


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 17, 33), (2, 480, 640), (0, 300, 200)])
def test_masks_round_trip_losslessly(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    masks = rng.random(shape) > 0.5
    out = decode_masks(encode_masks(masks))
    assert out.dtype == bool and out.shape == shape
    assert np.array_equal(out, masks)


def test_masks_are_compact() -> None:
    masks = _disc_masks(3, 1024, 1365)
    data = encode_masks(masks)
    # Far below one bit per pixel, let alone a JSON list of pixels.
    assert len(data) < masks.size / 8 / 20
    assert np.array_equal(decode_masks(data), masks)


def test_integer_masks_are_accepted_and_floats_refused() -> None:
    ints = np.array([[[0, 1], [1, 0]]], dtype=np.uint8)
    assert np.array_equal(decode_masks(encode_masks(ints)), ints.astype(bool))
    with pytest.raises(ValueError, match="boolean"):
        encode_masks(np.full((1, 2, 2), 0.7))
    with pytest.raises(ValueError, match="boolean"):
        encode_masks(np.full((1, 2, 2), 3, dtype=np.int32))
    with pytest.raises(ValueError, match="n×H×W"):
        encode_masks(np.zeros((4, 4), dtype=bool))


@pytest.mark.parametrize("data", [b"", b"LSM1", b"XXXX" + bytes(12), encode_masks(np.ones((1, 3, 3), bool))[:-5]])
def test_malformed_mask_bytes_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_masks(data)


def test_image_hash_is_sha256_hex() -> None:
    assert image_hash(b"abc") == hashlib.sha256(b"abc").hexdigest()
    assert len(image_hash(b"")) == 64


def test_job_round_trips_through_fields() -> None:
    job = Job(image=DIGEST, query="the food rich in vitamin C — ünïcode", options={"k": [1, 2]}, deadline=123.5)
    fields = job.to_fields()
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in fields.items())
    back = Job.from_fields({k.encode(): v for k, v in fields.items()}, attempts=2, entry_id="1-0")
    assert back == Job(**{**job.__dict__, "attempts": 2})
    assert back.answer is None and back.entry_id == "1-0"

    forced = Job(image=DIGEST, answer="Sure, [SEG].", deadline=1.0)
    assert Job.from_fields(forced.to_fields()).answer == "Sure, [SEG]."


def test_job_validation() -> None:
    with pytest.raises(ValueError, match="query"):
        Job(image=DIGEST)
    with pytest.raises(ValueError, match="image"):
        Job(image="", query="q")
    with pytest.raises(ValueError, match="deadline"):
        Job(image=DIGEST, query="q").to_fields()
    with pytest.raises(ValueError):
        Job.from_fields({"id": b"x", "image": DIGEST.encode(), "query": b"q"})  # no deadline
    assert Job(image=DIGEST, query="q", deadline=0.0).expired()
    assert not Job(image=DIGEST, query="q").expired()  # no deadline yet: never expired


def test_result_round_trips_through_bytes() -> None:
    masks = _disc_masks(2, 40, 60)
    result = Result.from_masks("j1", masks, [0.9, 0.25], text="Sure, [SEG] and [SEG].", model_version="v3")
    result.timings = {"queue_s": 0.01, "batch_s": 1.5}
    back = Result.from_bytes(result.to_bytes())
    assert back == result and back.ok
    assert np.array_equal(back.mask_array(), masks)

    error = Result.error("j2", DEAD_LETTER, "failed 3 deliveries; last error: boom")
    back = Result.from_bytes(error.to_bytes())
    assert back == error and not back.ok and back.mask_array().shape == (0, 0, 0)


def test_result_validation() -> None:
    assert {"timeout", "busy", "dead_letter", "bad_input", "redis_down", "internal"} == ERROR_CODES
    with pytest.raises(ValueError, match="error_code"):
        Result.error("j", "oops", "?")
    with pytest.raises(ValueError, match="status"):
        Result("j", status="maybe")
    with pytest.raises(ValueError, match="scores"):
        Result.from_masks("j", np.zeros((2, 2, 2), bool), [1.0])
    with pytest.raises(ValueError):
        Result.from_bytes(b"LSF1\x00\x00\x00\x05")  # truncated
    assert unpack_fields(pack_fields({"a": b"", "b": b"\x00\xff"})) == {"a": b"", "b": b"\x00\xff"}


def test_encodings_survive_real_redis(redis_server) -> None:
    """Stream fields and list values come back from Redis byte for byte."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    job = Job(image=DIGEST, query="q", options={"x": 1}, deadline=5.0)
    entry_id = client.xadd("t:jobs", job.to_fields())
    [(_, fields)] = client.xrange("t:jobs")
    assert Job.from_fields(fields, entry_id=entry_id.decode()) == job

    result = Result.from_masks(job.id, _disc_masks(1, 30, 30), [0.5])
    client.rpush("t:res", result.to_bytes())
    assert Result.from_bytes(client.lpop("t:res")) == result
    assert Result.from_bytes(Result.error("x", BAD_INPUT, "bad").to_bytes()).error_code == BAD_INPUT
    client.close()
