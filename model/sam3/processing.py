"""SAM 3's CPU side: the processor (image resize/normalise + CLIP tokenizer), the phrase rule, a local tokenizer.

``Sam3Processor`` (transformers) resizes every image to the model's square input (1008 px in the release) and
tokenizes a phrase padded to 32 tokens (``max_length=32`` there, the CLIP text encoder's
``max_position_embeddings``). It does not truncate: a longer phrase would fail inside the text encoder, so
:func:`check_phrase` refuses it first with a message for people.
"""

from __future__ import annotations

from model.errors import InputError

#: Start and end tokens of the CLIP tokenizer.
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def check_phrase(phrase: str, tokenizer, limit: int) -> str:
    """``phrase`` stripped, or :class:`InputError`: empty, or longer than ``limit`` tokens (start/end included)."""
    text = " ".join(str(phrase).split())
    if not text:
        raise InputError("the query is empty: type a short noun phrase, e.g. 'yellow school bus'")
    n = len(tokenizer(text)["input_ids"])
    if n > limit:
        raise InputError(
            f"the query is {n - 2} tokens long; SAM 3 reads at most {limit - 2} (a short noun phrase such as "
            "'yellow school bus', not a sentence): shorten it"
        )
    return text


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2 / CLIP), in its usual order (which fixes
    the token ids): the printable Latin-1 bytes stand for themselves and come first; the others follow, moved past
    U+0100 so that every byte has a visible, non-space character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    for shifted, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + shifted)
    return table


def tiny_clip_tokenizer(merge_words: tuple[str, ...] = ("cat", "dog", "car", "person", "the")):
    """A real ``CLIPTokenizer`` (byte-level BPE, lower-casing, ``</w>`` word ends) with a tiny vocabulary made
    here: every byte alone and word-final, the start/end tokens, and the merges that spell ``merge_words``.
    Deterministic; no download."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab[token] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in merge_words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: "c a t</w>" -> "ca t</w>" -> "cat</w>"
            merged = pieces[0] + pieces[1]
            rule = (pieces[0], pieces[1])
            if rule not in merges:
                merges.append(rule)
                vocab.setdefault(merged, len(vocab))
            pieces = [merged, *pieces[2:]]
    for special in (BOS, EOS):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)
