"""LisaTokenizer: transformers-4.31 slow/legacy ids, both released layouts, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import CASES, CHECKPOINT, case_arrays

from model.errors import CheckpointError
from model.prompts import teacher_forced_labels, teacher_forced_prompt
from model.tokenizer import IMAGE_TOKEN_INDEX, LisaTokenizer


@pytest.fixture(scope="module")
def tok():
    return LisaTokenizer(CHECKPOINT)


def test_7b_layout_detected(tok):
    lay = tok.layout
    assert (lay.name, lay.seg_id, lay.im_start_id, lay.im_end_id, lay.im_patch_id) == ("7b-v1", 703, 701, 702, 700)
    assert (lay.bos_id, lay.eos_id, lay.pad_id, lay.vocab_size) == (1, 2, 0, 704)


def test_13b_layout_detected(tmp_path):
    shutil.copy(CHECKPOINT / "tokenizer.model", tmp_path)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"[SEG]": 700, "<im_start>": 701, "<im_end>": 702}))
    t = LisaTokenizer(tmp_path)
    assert (t.layout.name, t.layout.seg_id, t.layout.im_patch_id, len(t)) == ("13b-llama2-v1", 700, None, 703)
    assert t.encode("Sure, [SEG].", add_bos=False)[2] == 700


def test_not_a_lisa_tokenizer(tmp_path):
    shutil.copy(CHECKPOINT / "tokenizer.model", tmp_path)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<im_start>": 700, "<im_end>": 701}))
    with pytest.raises(CheckpointError, match=r"lacks \[SEG\]"):
        LisaTokenizer(tmp_path)
    with pytest.raises(CheckpointError, match=r"no tokenizer\.model"):
        LisaTokenizer(tmp_path / "nowhere")


@pytest.mark.parametrize("case", sorted(CASES))
def test_ids_and_labels_match_lisa(tok, case):
    ref = case_arrays(case)
    ids = tok.encode_with_image(str(ref["prompt"]))
    assert ids == ref["input_ids"][0].tolist()
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids[0] == tok.bos_id
    conv = teacher_forced_prompt(*CASES[case])
    tf_ids = tok.encode_with_image(conv)
    assert tf_ids == ref["tf_input_ids"][0].tolist()
    assert teacher_forced_labels(tok, conv, tf_ids) == ref["tf_labels"][0].tolist()


def test_whitespace_rules_around_added_tokens(tok):
    # 4.31 strips whitespace on both sides of added tokens, and re-adds SentencePiece's dummy prefix after them.
    assert tok.tokenize("a [SEG] .") == tok.tokenize("a[SEG].")
    assert tok.tokenize("[SEG].")[:2] == ["[SEG]", "▁"]
    # ...but not around special tokens such as </s>.
    assert tok.tokenize("a </s>") != tok.tokenize("a</s>")


def test_decode_round_trip(tok):
    ids = tok.encode("Sure, the segmentation result is [SEG].", add_bos=False)
    assert tok.decode(ids) == "Sure, the segmentation result is [SEG] ."
    assert tok.decode([tok.bos_id, *ids, tok.eos_id], skip_special_tokens=True) == tok.decode(ids)
