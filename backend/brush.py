"""Label Studio brush RLE: a vectorised encoder and decoder.

Label Studio stores a brush region as ``value.rle``: a list of byte values (0-255) holding a bit stream in the
``@thi.ng/rle-pack`` format, whose payload is the image's RGBA pixels flattened row-major (H × W × 4 words).

Bit stream (MSB first):

* header, 53 bits: 32-bit word count N (= H·W·4), 5 bits word size − 1 (always 7 here), then four 4-bit fields
  holding (bits − 1) of the four count classes; Label Studio uses 3, 4, 8 and 16 bits;
* tokens until N words are produced: 1 flag bit (1 = a run of one repeated word, 0 = literal words), a 2-bit
  class index, the count − 1 in that class's number of bits, then the word once (run) or count times (literal);
* zero padding up to a whole byte.

``mask_to_rle`` is byte-identical to ``label_studio_sdk.converter.brush.mask2rle`` (SDK 2.1.2) applied to the same
mask as 0/255 ``uint8``. That encoder has quirks that the output depends on, so we reproduce them:

* each run of equal bytes gets its own run token (a lone byte would be a literal token of one word, but a mask's
  runs are whole pixels of 4 equal bytes);
* a run takes the smallest class that holds it (≤8, ≤16, ≤256 words); a longer run uses the 16-bit class and is
  cut into tokens of 65536 words, the last one holding the rest (which may be short but stays in the 16-bit class);
* the padding is 1-8 zero bits: a stream that already ends on a byte boundary still gets a zero byte.

Mask convention: any value > 0 is foreground and is written as 255 in all four channels, because the browser
paints a pixel with its label colour in proportion to its alpha (the SDK would write a 0/1 mask's 1 as alpha 1,
which is nearly invisible). So bool, 0/1 and 0/255 masks of the same shape all give the same RLE, equal to
``mask2rle(mask.astype(bool).astype(np.uint8) * 255)``.

The decoder reads any stream of that format with 8-bit words (Label Studio's browser writes literal tokens too, when
neighbouring channels differ), keeps the alpha channel and thresholds it: brush strokes exported by the browser have
anti-aliased edges (see ``shared/ref/labelstudio.md`` §3.2).

No Python loop runs per pixel or per bit. The one Python loop left follows the token chain in the decoder (each
token's start depends on the previous token's length); it does one list append and one array read per token.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

__all__ = ["BrushRLEError", "band_to_rle", "mask_to_rle", "rle_to_mask"]

_HEADER_BITS = 53
_WORD_BITS = 8
_CLASS_BITS = (3, 4, 8, 16)  # Label Studio's count classes: up to 8, 16, 256 and 65536 words
_MAX_RUN = 1 << _CLASS_BITS[-1]
_MAX_WORDS = (1 << 32) - 1  # the header's count field is 32 bits wide
_CHUNK_BYTES = 1 << 19  # the decoder scans the stream 512 KiB at a time, to bound its memory


class BrushRLEError(ValueError):
    """A brush RLE that cannot be decoded, or does not fit the image. The message is meant for annotators."""


# ---------------------------------------------------------------------------------------------------- encoder


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Encode a 2-D mask (H × W, bool or integer; > 0 is foreground) as Label Studio brush RLE.

    Returns the list of byte values for ``value.rle``, identical to the SDK's ``mask2rle`` on the 0/255 mask.
    Raises ``ValueError`` for a mask that is not 2-D, is empty, has a non-integer dtype, or is too large for the
    format's 32-bit word count.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a brush mask must be 2-D (height × width), got shape {mask.shape}")
    if mask.dtype != np.bool_ and not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"a brush mask must be bool or integer, got {mask.dtype} (threshold it first)")
    if mask.size == 0:
        raise ValueError(f"a brush mask must not be empty, got shape {mask.shape}")
    if mask.size * 4 > _MAX_WORDS:
        raise ValueError(f"a {mask.shape[1]}×{mask.shape[0]} mask is too large for brush RLE (at most 2^30 pixels)")

    flat = mask.ravel() if mask.dtype == np.bool_ else (mask > 0).ravel()
    run_len, run_val = _runs(flat)
    return _encode_runs(run_len, run_val, flat.size)


def band_to_rle(band: np.ndarray, top: int, height: int) -> list[int]:
    """The RLE of a ``height × W`` mask that is empty outside the rows ``top .. top + len(band)``, given those rows.

    Equal to ``mask_to_rle`` of the whole mask, without allocating it: an instance of a large answer is encoded
    from the rows its bounding box spans (``band``, ``rows × W``, bool or integer; > 0 is foreground).
    """
    band = np.asarray(band)
    if band.ndim != 2 or band.size == 0:
        raise ValueError(f"a mask band must be 2-D and non-empty, got shape {band.shape}")
    if not 0 <= top <= height - band.shape[0]:
        raise ValueError(f"rows {top}..{top + band.shape[0]} do not fit in a mask of {height} rows")
    width = band.shape[1]
    if height * width * 4 > _MAX_WORDS:
        raise ValueError(f"a {width}×{height} mask is too large for brush RLE (at most 2^30 pixels)")
    flat = band.ravel() if band.dtype == np.bool_ else (band > 0).ravel()
    run_len, run_val = _runs(flat)
    above, below = top * width * 4, (height - top - band.shape[0]) * width * 4
    # The rows outside the band are background: they lengthen the band's first / last run when it is background
    # too, else they are runs of their own.
    if above:
        if run_val[0] == 0:
            run_len[0] += above
        else:
            run_len, run_val = np.concatenate(([above], run_len)), np.concatenate(([0], run_val)).astype(np.uint64)
    if below:
        if run_val[-1] == 0:
            run_len[-1] += below
        else:
            run_len, run_val = np.concatenate((run_len, [below])), np.concatenate((run_val, [0])).astype(np.uint64)
    return _encode_runs(run_len, run_val, height * width)


def _runs(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of equal pixels of a flat bool mask: their lengths in words (4 per pixel, int64) and byte values."""
    cuts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], cuts))
    run_len = np.diff(np.concatenate((starts, [flat.size]))).astype(np.int64) * 4
    run_val = np.where(flat[starts], 255, 0).astype(np.uint64)
    return run_len, run_val


def _encode_runs(run_len: np.ndarray, run_val: np.ndarray, pixels: int) -> list[int]:
    """The token stream of a mask of ``pixels`` pixels given as runs (lengths in words, byte values)."""
    # Runs longer than 65536 words become several tokens (see the module docstring).
    pieces = np.where(run_len > _MAX_RUN, -(-run_len // _MAX_RUN), 1)
    if np.any(pieces > 1):
        run_of_token = np.repeat(np.arange(run_len.size), pieces)
        last = np.cumsum(pieces) - 1
        count = np.full(run_of_token.size, _MAX_RUN, dtype=np.int64)
        count[last] = run_len - (pieces - 1) * _MAX_RUN
        value = run_val[run_of_token]
        long_run = (run_len > 256)[run_of_token]  # the rest of a long run keeps the 16-bit class
    else:
        count, value, long_run = run_len, run_val, run_len > 256

    # Every run is a multiple of 4 words, so the SDK's literal token for a lone word never occurs: all are runs.
    cls = np.where(long_run, 3, np.where(count <= 8, 0, np.where(count <= 16, 1, 2)))
    nbits = np.asarray(_CLASS_BITS, dtype=np.uint64)[cls]
    token = (
        (np.uint64(1) << (nbits + np.uint64(10)))
        | (cls.astype(np.uint64) << (nbits + np.uint64(8)))
        | ((count - 1).astype(np.uint64) << np.uint64(8))
        | value
    )
    header = (pixels * 4) << 21 | (_WORD_BITS - 1) << 16 | 2 << 12 | 3 << 8 | 7 << 4 | 15
    fields = np.concatenate(([np.uint64(header)], token))
    widths = np.concatenate(([_HEADER_BITS], nbits.astype(np.int64) + 11))
    return _pack_fields(fields, widths).tolist()


def _pack_fields(fields: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Concatenate bit fields (uint64 values, each ≤ 64 bits wide) MSB-first, pad with 1-8 zero bits, as bytes.

    Each field lands in the big-endian 64-bit word holding its first bit, and the part that crosses into the next
    word spills there. Fields are sorted by offset, so the fields sharing a word are contiguous and one
    ``bitwise_or.reduceat`` merges them; at most one field crosses each word boundary, so the spills never collide.
    """
    ends = np.cumsum(widths)
    offsets = ends - widths
    total_bits = int(ends[-1])
    nbytes = total_bits // 8 + 1  # the SDK always pads, even when the stream ends on a byte boundary
    words = np.zeros(-(-nbytes // 8), dtype=np.uint64)

    word = offsets >> 6
    shift = 64 - (offsets & 63) - widths  # where the field's last bit lands in its first word; < 0 if it crosses
    left = np.maximum(shift, 0).astype(np.uint64)
    right = np.maximum(-shift, 0).astype(np.uint64)
    head = np.where(shift >= 0, fields << left, fields >> right)
    first = np.flatnonzero(np.concatenate(([True], word[1:] != word[:-1])))
    words[word[first]] = np.bitwise_or.reduceat(head, first)
    spill = np.flatnonzero(shift < 0)
    words[word[spill] + 1] |= fields[spill] << (64 + shift[spill]).astype(np.uint64)
    return words.astype(">u8").view(np.uint8)[:nbytes]


# ---------------------------------------------------------------------------------------------------- decoder


def rle_to_mask(
    rle: Sequence[int] | bytes | np.ndarray, height: int, width: int, *, threshold: int = 128
) -> np.ndarray:
    """Decode Label Studio brush RLE to a ``height × width`` bool mask: alpha ≥ ``threshold`` is foreground.

    The default 128 keeps the inside of anti-aliased browser strokes; use 1 to keep every visible pixel.
    Raises ``BrushRLEError`` (a ``ValueError``) with a message fit for Label Studio's UI when the RLE is not a list
    of bytes, is truncated or corrupt, or holds a different number of pixels than ``height × width`` (the stream
    records only that number, so a transposed size cannot be detected). Bytes after the last token are ignored:
    they are padding.
    """
    if not (isinstance(height, int | np.integer) and isinstance(width, int | np.integer) and height > 0 and width > 0):
        raise BrushRLEError(f"image size must be positive integers, got {width!r}×{height!r}")
    if not 1 <= threshold <= 255:
        raise ValueError(f"threshold must be 1-255, got {threshold}")
    data = _as_bytes(rle)
    if data.size * 8 < _HEADER_BITS:
        raise BrushRLEError(f"brush RLE is truncated: {data.size} bytes, its header alone needs 7")

    head = int.from_bytes(data[:7].tobytes(), "big")
    num, word_bits = head >> 24, ((head >> 19) & 31) + 1
    class_bits = tuple(((head >> (15 - 4 * k)) & 15) + 1 for k in range(4))
    if word_bits != _WORD_BITS:
        raise BrushRLEError(f"brush RLE uses {word_bits}-bit words; Label Studio brushes use 8-bit words")
    expected = int(height) * int(width) * 4
    if num != expected:
        hint = f" ({num // 4} pixels)" if num % 4 == 0 else ""
        raise BrushRLEError(
            f"brush RLE holds {num} RGBA values{hint}, but a {width}×{height} image needs {expected} "
            f"({height * width} pixels): the brush was drawn on an image of another size"
        )

    # windows[i]: the 32 bits starting at byte i, so any field of ≤ 25 bits is one gather and one shift away.
    padded = np.concatenate((data, np.zeros(3, dtype=np.uint8))).astype(np.uint32)
    windows = padded[:-3] << 24 | padded[1:-2] << 16 | padded[2:-1] << 8 | padded[3:]
    total_bits = data.size * 8
    starts = _chain(windows, total_bits, _length_table(class_bits))

    # Fields of every token the chain visited; keep those up to the one that completes the `num` words.
    top = _peek(windows, starts)
    is_run = (top >> 31).astype(bool)
    cbits = np.asarray(class_bits, dtype=np.uint32)[(top >> 29) & 3]
    count = ((top << 3) >> (32 - cbits)).astype(np.int64) + 1
    length = 3 + cbits.astype(np.int64) + _WORD_BITS * np.where(is_run, 1, count)
    produced = np.cumsum(count)
    last = int(np.searchsorted(produced, num))  # the token that completes the image; produced strictly increases
    if last == produced.size or starts[last] + length[last] > total_bits:
        raise BrushRLEError(
            f"brush RLE is truncated: its {data.size} bytes end before the {num} values its header declares"
        )
    if produced[last] != num:
        raise BrushRLEError(f"brush RLE is corrupt: it decodes to more than the {num} values its header declares")
    keep = slice(0, last + 1)
    starts, is_run, count = starts[keep], is_run[keep], count[keep]
    first_word = starts + 3 + cbits[keep].astype(np.int64)

    # One segment per run token and one per word of a literal token; segment i covers seg_len[i] values.
    seg_per_token = np.where(is_run, 1, count)
    seg_token = np.repeat(np.arange(starts.size), seg_per_token)
    seg_index = np.arange(seg_token.size) - np.repeat(np.cumsum(seg_per_token) - seg_per_token, seg_per_token)
    seg_word = _peek(windows, first_word[seg_token] + seg_index * _WORD_BITS) >> 24
    seg_len = np.where(is_run[seg_token], count[seg_token], 1)
    values = np.repeat(seg_word >= threshold, seg_len)
    return values[3::4].reshape(int(height), int(width))  # the alpha channel


def _as_bytes(rle: object) -> np.ndarray:
    """The RLE as a uint8 array, or a BrushRLEError saying why it is not a list of byte values."""
    if isinstance(rle, bytes | bytearray):
        return np.frombuffer(bytes(rle), dtype=np.uint8)
    if isinstance(rle, np.ndarray):
        if (
            rle.ndim == 1
            and np.issubdtype(rle.dtype, np.integer)
            and (rle.size == 0 or 0 <= rle.min() <= rle.max() <= 255)
        ):
            return rle.astype(np.uint8)
        raise BrushRLEError("brush RLE must be a list of integers 0-255")
    if isinstance(rle, list | tuple):
        try:
            # bytes() checks every item in C: ints 0-255 only (bools pass as 0/1, which is harmless).
            return np.frombuffer(bytes(rle), dtype=np.uint8)
        except (TypeError, ValueError):
            raise BrushRLEError("brush RLE must be a list of integers 0-255") from None
    raise BrushRLEError(f"brush RLE must be a list of integers 0-255, got {type(rle).__name__}")


def _peek(windows: np.ndarray, bit_pos: np.ndarray) -> np.ndarray:
    """The 32 bits from each bit position, as uint32 with the first bit at the top (bits past the end are 0)."""
    return windows[bit_pos >> 3] << (bit_pos & 7).astype(np.uint32)


@functools.lru_cache(maxsize=4)
def _length_table(class_bits: tuple[int, ...]) -> np.ndarray:
    """Length in bits of a token, indexed by its first 19 bits (flag, class, and a count field of up to 16 bits)."""
    key = np.arange(1 << 19, dtype=np.uint32)
    cbits = np.asarray(class_bits, dtype=np.uint32)[(key >> 16) & 3]
    count = ((key & 0xFFFF) >> (16 - cbits)).astype(np.int32) + 1
    return (3 + cbits.astype(np.int32) + _WORD_BITS * np.where(key >> 18, 1, count)).astype(np.int32)


def _chain(windows: np.ndarray, total_bits: int, lengths: np.ndarray) -> np.ndarray:
    """Bit offsets of the tokens from the first one to the end of the stream.

    Tokens read from the padding or from trailing bytes are bogus; the caller keeps those up to the image's end.

    Where a token starts depends on the length of the one before, so this is a chain. For a block of the stream we
    look up, vectorised, where the next token would start if one started at each bit, then follow the chain in a
    tight Python loop: one step per token, never per bit.
    """
    found: list[np.ndarray] = []
    pos = _HEADER_BITS
    phases = np.arange(8, dtype=np.uint32)
    while pos < total_bits:
        block = pos >> 3
        nbytes = min(_CHUNK_BYTES, total_bits // 8 - block)
        first19 = ((windows[block : block + nbytes, None] << phases) >> 13).ravel()
        nxt = memoryview(lengths[first19] + np.arange(nbytes * 8, dtype=np.int32))
        limit, k = nbytes * 8, pos - block * 8
        rel: list[int] = []
        append = rel.append
        while k < limit:
            append(k)
            k = nxt[k]
        found.append(np.asarray(rel, dtype=np.int64) + block * 8)
        pos = block * 8 + k
    return np.concatenate(found)
