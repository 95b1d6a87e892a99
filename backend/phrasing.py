"""Turning what an annotator types into the question forms LISA was trained on.

LISA's training data asked for masks in a few fixed ways (``utils/utils.py`` of the LISA repository): a short
phrase went into "What is {phrase} in this image? Please output segmentation mask.", a full sentence got
"{sentence} Please output segmentation mask." appended. Annotators type both ("the orange", "the food rich in
vitamin C", "Which object would you use to cut bread?"), so:

* a query that already asks for a mask ("segment", "segmentation", "mask") passes through unchanged;
* a sentence - it ends with ``.``, ``?`` or ``!``, or starts with a question or command word - gets the sentence
  template;
* anything else is a phrase and gets the phrase template.

Both templates are settings (``LISA_LS_PHRASE_TEMPLATE``, ``LISA_LS_SENTENCE_TEMPLATE``, or the connection's
``extra_params``); ``{}`` marks where the query goes.

Queries are checked first: empty ones are "no query", over-long ones and ones with control characters are
refused with a message the annotator sees.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

PHRASE_TEMPLATE = "What is {} in this image? Please output segmentation mask."
SENTENCE_TEMPLATE = "{} Please output segmentation mask."
#: Longest query accepted, in characters: LISA's prompts are a sentence or two; 1000 leaves room for detail.
MAX_QUERY_CHARS = 1000

_ASKS_FOR_MASK = re.compile(r"\b(segment|segmentation|mask)\b", re.IGNORECASE)
_SENTENCE_START = re.compile(
    r"^(what|which|who|whom|whose|where|when|why|how|is|are|can|could|would|will|do|does|did|please|find|show|"
    r"identify|locate|highlight|point|select|give|tell)\b",
    re.IGNORECASE,
)


class QueryError(ValueError):
    """A query the backend refuses; the message is shown to the annotator."""


@dataclass(frozen=True)
class Phrasing:
    """The two templates; ``{}`` is replaced by the (cleaned) query."""

    phrase_template: str = PHRASE_TEMPLATE
    sentence_template: str = SENTENCE_TEMPLATE

    def __post_init__(self) -> None:
        for name, template in (("phrase", self.phrase_template), ("sentence", self.sentence_template)):
            if template.count("{}") != 1:
                raise ValueError(f"the {name} template must contain exactly one {{}}: {template!r}")

    def question(self, query: str) -> str:
        """The question put to LISA for an annotator's query (see the module docstring)."""
        text = clean_query(query)
        if not text:
            raise QueryError("the query is empty")
        if _ASKS_FOR_MASK.search(text):
            return text
        if text[-1] in ".?!" or _SENTENCE_START.match(text):
            if text[-1] not in ".?!":
                text += "?" if _SENTENCE_START.match(text) and not text.lower().startswith("please") else "."
            return self.sentence_template.replace("{}", text)
        return self.phrase_template.replace("{}", text)


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
