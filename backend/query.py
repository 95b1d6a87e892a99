"""The checks an annotator's query passes in the backend, before it is sent to a worker.

Empty queries are "no query"; over-long ones and ones with control characters are refused with a message the
annotator sees. The query then travels as typed (whitespace collapsed), with the project's templates, and the
worker phrases it for LISA with the model's one rule (``model/phrasing.py``), the rule training uses too.
"""

from __future__ import annotations

import unicodedata

from worker.client.defaults import FAMILY_NAMES
from worker.client.protocol import check_phrasing

#: Longest query accepted, in characters: LISA's prompts are a sentence or two; 1000 leaves room for detail.
MAX_QUERY_CHARS = 1000

#: Longest query, in words, of the families with a short text encoder: SAM 3 reads 32 CLIP tokens, 30 of them the
#: phrase's, and every word is at least one token, so a longer phrase can never fit. The worker counts the tokens
#: exactly and refuses the rest (``bad_input``, shown in the same message area).
MAX_QUERY_WORDS = {"sam3": 30}


class QueryError(ValueError):
    """A query the backend refuses; the message is shown to the annotator."""


def clean_query(query: object) -> str:
    """Collapse whitespace; refuse non-text, control characters and over-long queries. May return ``""``."""
    if query is None:
        return ""
    if not isinstance(query, str):
        raise QueryError(f"the query must be text, not {type(query).__name__}")
    if len(query) > MAX_QUERY_CHARS:
        raise QueryError(f"the query is {len(query)} characters long; the limit is {MAX_QUERY_CHARS}. Shorten it.")
    bad = sorted({c for c in query if unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs") and c not in "\t\n\r"})
    if bad:
        codes = ", ".join(f"U+{ord(c):04X}" for c in bad[:5])
        raise QueryError(f"the query contains control characters ({codes}); retype it as plain text.")
    return " ".join(query.split())


def phrasing(phrase_template: str, sentence_template: str) -> dict[str, str]:
    """A job's ``phrasing`` for a project's templates: the ones set (an empty one is the model's own), checked
    (exactly one ``{}`` each; ``ValueError`` otherwise)."""
    return check_phrasing({k: v for k, v in (("phrase", phrase_template), ("sentence", sentence_template)) if v})


def checked_query(query: object, family: str | None = None) -> str:
    """:func:`clean_query`, refusing a query that is empty once cleaned, or longer than ``family``'s model reads
    (:data:`MAX_QUERY_WORDS`)."""
    text = clean_query(query)
    if not text:
        raise QueryError("the query is empty")
    limit = MAX_QUERY_WORDS.get(family or "")
    if limit is not None and len(text.split()) > limit:
        name = FAMILY_NAMES[family or ""]
        raise QueryError(f"the query has {len(text.split())} words; this project's model ({name}) reads a short "
                         f"noun phrase of at most {limit} words (e.g. 'yellow school bus'). Shorten it.")
    return text
