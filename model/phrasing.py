"""The one phrasing rule: what an annotator types -> the question put to LISA (serving, training, evaluation).

LISA's training data asked for masks in a few fixed ways (``utils/utils.py`` of the LISA repository): a short
phrase went into "What is {phrase} in this image? Please output segmentation mask.", a full sentence got
"{sentence} Please output segmentation mask." appended. Annotators type both ("the orange", "the food rich in
vitamin C", "Which object would you use to cut bread?"), so:

* a query that already asks for a mask ("segment", "segmentation", "mask") passes through unchanged;
* a sentence - it ends with ``.``, ``?`` or ``!``, or starts with a question or command word - gets the sentence
  template (a question word without a final mark gets ``?``, anything else ``.``);
* anything else is a phrase and gets the phrase template.

Whitespace is collapsed first. The worker phrases every annotator's query with this module (the backend sends
the query as typed, with the project's templates, see ``worker.client.protocol.Job.phrasing``), and fine-tuning
and evaluation phrase the queries of captured samples with it too, so that a model is trained on the questions
it is asked. ``{}`` in a template marks where the query goes; templates are checked where they enter (the job
protocol), not here. Torch-free: the standard library only.
"""

from __future__ import annotations

import re

from model.errors import InputError

PHRASE_TEMPLATE = "What is {} in this image? Please output segmentation mask."
SENTENCE_TEMPLATE = "{} Please output segmentation mask."

_ASKS_FOR_MASK = re.compile(r"\b(segment|segmentation|mask)\b", re.IGNORECASE)
_SENTENCE_START = re.compile(
    r"^(what|which|who|whom|whose|where|when|why|how|is|are|can|could|would|will|do|does|did|please|find|show|"
    r"identify|locate|highlight|point|select|give|tell)\b",
    re.IGNORECASE,
)


def question(query: str, phrase_template: str | None = None, sentence_template: str | None = None) -> str:
    """The question put to LISA for an annotator's ``query`` (see the module docstring); a template left
    ``None`` (or empty) is LISA's own. Raises :class:`InputError` for a query that is empty once collapsed."""
    text = " ".join(query.split())
    if not text:
        raise InputError("the query is empty")
    if _ASKS_FOR_MASK.search(text):
        return text
    if text[-1] in ".?!" or _SENTENCE_START.match(text):
        if text[-1] not in ".?!":
            text += "?" if not text.lower().startswith("please") else "."
        return (sentence_template or SENTENCE_TEMPLATE).replace("{}", text)
    return (phrase_template or PHRASE_TEMPLATE).replace("{}", text)
