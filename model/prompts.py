"""LISA's conversation template (LLaVA ``llava_v1``) and the teacher-forced labels of its training code."""

from __future__ import annotations

from model.errors import InputError
from model.tokenizer import (
    IGNORE_INDEX,
    IM_END_TOKEN,
    IM_PATCH_TOKEN,
    IM_START_TOKEN,
    IMAGE_PLACEHOLDER,
    SEG_TOKEN,
    LisaTokenizer,
)

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
USER, ASSISTANT = "USER", "ASSISTANT"
SEP, SEP2 = " ", "</s>"
IMAGE_BLOCK = f"{IM_START_TOKEN}{IMAGE_PLACEHOLDER}{IM_END_TOKEN}"
#: Text a user may not type: these strings are control tokens of the model.
RESERVED = (IMAGE_PLACEHOLDER, SEG_TOKEN, IM_START_TOKEN, IM_END_TOKEN, IM_PATCH_TOKEN, "<s>", "</s>", "<unk>")


def check_query(query: str) -> str:
    """Refuse queries the model cannot take; returns the query unchanged otherwise."""
    if not isinstance(query, str) or not query.strip():
        raise InputError("the query is empty: type what to segment, e.g. 'the food rich in vitamin C'.")
    found = [t for t in RESERVED if t in query]
    if found:
        raise InputError(f"the query contains {', '.join(found)}, reserved for the model's own use; remove it.")
    return query


def chat_prompt(query: str) -> str:
    """The inference prompt of LISA's ``chat.py``: image first, then the user's text after a newline."""
    return f"{SYSTEM} {USER}: {IMAGE_BLOCK}\n{check_query(query)} {ASSISTANT}:"


def teacher_forced_prompt(query: str, answer: str) -> str:
    """The training/validation conversation: the chat prompt followed by the answer and ``</s>``."""
    return f"{chat_prompt(query)} {answer}{SEP2}"


def teacher_forced_labels(tokenizer: LisaTokenizer, conversation: str, ids: list[int]) -> list[int]:
    """Labels of LISA's ``collate_fn`` (llava_v1 round masking): only the answer tokens and ``</s>`` count.

    Reproduced literally, including its ``- 2`` correction for the instruction length, because the released
    weights were trained on exactly these labels.
    """
    labels = list(ids)
    sep = SEP + ASSISTANT + ": "
    cur = 1
    labels[:cur] = [IGNORE_INDEX] * cur
    for rnd in conversation.split(SEP2):
        if rnd == "":
            break
        parts = rnd.split(sep)
        if len(parts) != 2:
            break
        instruction = parts[0] + sep
        round_len = len(tokenizer.encode_with_image(rnd))
        instruction_len = len(tokenizer.encode_with_image(instruction)) - 2
        labels[cur : cur + instruction_len] = [IGNORE_INDEX] * len(labels[cur : cur + instruction_len])
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
    return labels
