"""LISA's tokenizer, reproduced exactly: slow SentencePiece LLaMA tokenizer in transformers-4.31 legacy mode.

The released LISA weights were trained on the ids that transformers 4.31's *slow* ``LlamaTokenizer``
(``legacy=True``) produced. Current transformers tokenizes differently around added tokens, so this module
re-implements the few rules that matter, on top of the same SentencePiece model file:

* Added tokens (``[SEG]``, ``<im_start>``, ``<im_end>``, ``<im_patch>``) and the special tokens (``<s>``,
  ``</s>``, ``<unk>``) are never split. Added tokens were registered as plain strings, so 4.31 strips the
  whitespace on *both* sides of them (``"USER: <im_start>"`` loses its space, ``"<im_end>\\n"`` its newline).
  The special tokens were ``AddedToken(lstrip=False, rstrip=False)``: nothing is stripped around them.
* Every text chunk between them is encoded by SentencePiece on its own, dummy prefix included, so
  ``"[SEG]."`` becomes ``[SEG] ▁ .``.
* ``BOS`` is prepended once; no ``EOS`` is appended.

Decoding follows 4.31's ``_decode`` with ``spaces_between_special_tokens=True``: added tokens are emitted
verbatim and joined to the SentencePiece-decoded text around them with single spaces.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from model.errors import CheckpointError

SEG_TOKEN = "[SEG]"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"
IM_PATCH_TOKEN = "<im_patch>"
IMAGE_PLACEHOLDER = "<image>"
#: Sentinel LISA puts in ``input_ids`` where the 256 projected CLIP patch features go (not a vocabulary id).
IMAGE_TOKEN_INDEX = -200
#: Label value ignored by the cross-entropy loss.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenLayout:
    """Which of the two released tokenizer layouts a checkpoint uses, and its special ids.

    ``"7b-v1"``: ``<im_patch>`` present, ``[SEG]`` added last (LISA-7B-v1: 32000..32003).
    ``"13b-llama2-v1"``: no ``<im_patch>``, ``[SEG]`` added first (LISA-13B-llama2-v1: 32000..32002).
    """

    name: str
    seg_id: int
    im_start_id: int
    im_end_id: int
    im_patch_id: int | None
    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int


class LisaTokenizer:
    """Tokenizes exactly as LISA's ``AutoTokenizer(..., use_fast=False)`` under transformers 4.31.

    Args:
        folder: a checkpoint folder holding ``tokenizer.model`` and ``added_tokens.json``.
    """

    def __init__(self, folder: str | Path) -> None:
        import sentencepiece as spm

        folder = Path(folder)
        model_file = folder / "tokenizer.model"
        if not model_file.is_file():
            raise CheckpointError(
                f"{folder}: no tokenizer.model. A LISA release ships its SentencePiece model next to config.json; "
                "download the whole checkpoint folder."
            )
        self.sp = spm.SentencePieceProcessor()
        self.sp.Load(str(model_file))
        added_file = folder / "added_tokens.json"
        self.added: dict[str, int] = json.loads(added_file.read_text()) if added_file.is_file() else {}
        self.added_by_id = {i: t for t, i in self.added.items()}
        self.base_vocab = self.sp.GetPieceSize()
        for tok, idx in self.added.items():
            if idx < self.base_vocab and self.sp.IdToPiece(idx) != tok:
                raise CheckpointError(f"{added_file}: added token {tok!r} has id {idx}, which is a SentencePiece piece")
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        # LISA sets pad_token = unk_token.
        self.pad_id = self.unk_id
        self.special_tokens = {self.sp.IdToPiece(i) for i in (self.bos_id, self.eos_id, self.unk_id) if i >= 0}
        no_split = sorted(set(self.added) | self.special_tokens, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in no_split) + ")")
        self.layout = self._detect_layout(folder)

    def __len__(self) -> int:
        return max([self.base_vocab - 1, *self.added.values()]) + 1

    def _detect_layout(self, folder: Path) -> TokenLayout:
        missing = [t for t in (SEG_TOKEN, IM_START_TOKEN, IM_END_TOKEN) if t not in self.added]
        if missing:
            raise CheckpointError(
                f"{folder}/added_tokens.json lacks {', '.join(missing)}: this is not a LISA checkpoint "
                "(a LISA release adds [SEG], <im_start> and <im_end> to the LLaVA vocabulary)."
            )
        has_patch = IM_PATCH_TOKEN in self.added
        seg_first = self.added[SEG_TOKEN] == min(self.added.values())
        name = "7b-v1" if has_patch and not seg_first else "13b-llama2-v1" if seg_first and not has_patch else "custom"
        return TokenLayout(
            name=name,
            seg_id=self.added[SEG_TOKEN],
            im_start_id=self.added[IM_START_TOKEN],
            im_end_id=self.added[IM_END_TOKEN],
            im_patch_id=self.added.get(IM_PATCH_TOKEN),
            bos_id=self.bos_id,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            vocab_size=len(self),
        )

    # ----------------------------------------------------------------------------------------------- encoding
    def tokenize(self, text: str) -> list[str]:
        """Split ``text`` into pieces the way transformers 4.31's slow tokenizer does (no BOS)."""
        chunks = self._split_re.split(text)
        # Strip whitespace on both sides of *added* tokens (not of <s>, </s>, <unk>).
        for i, chunk in enumerate(chunks):
            if chunk in self.added:
                if i + 1 < len(chunks):
                    chunks[i + 1] = chunks[i + 1].lstrip()
                if i > 0:
                    chunks[i - 1] = chunks[i - 1].rstrip()
        pieces: list[str] = []
        for i, chunk in enumerate(chunks):
            if not chunk:
                continue
            if i % 2 == 1:  # re.split puts the matched separators at odd indices
                pieces.append(chunk)
            else:
                pieces.extend(self.sp.EncodeAsPieces(chunk))
        return pieces

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [self.added[t] if t in self.added else self.sp.PieceToId(t) for t in tokens]

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``, with BOS first (as ``tokenizer(text).input_ids``)."""
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        return [self.bos_id, *ids] if add_bos else ids

    def encode_with_image(self, prompt: str) -> list[int]:
        """LISA's ``tokenizer_image_token``: ``<image>`` becomes the sentinel ``IMAGE_TOKEN_INDEX``.

        Each chunk between placeholders is tokenized with BOS; only the first chunk keeps it.
        """
        chunks = [self.encode(c) for c in prompt.split(IMAGE_PLACEHOLDER)]
        ids: list[int] = []
        offset = 0
        if chunks and chunks[0] and chunks[0][0] == self.bos_id:
            offset = 1
            ids.append(self.bos_id)
        for k, chunk in enumerate(chunks):
            if k > 0:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(chunk[offset:])
        return ids

    # ----------------------------------------------------------------------------------------------- decoding
    def _pieces_to_string(self, pieces: list[str]) -> str:
        """4.31 ``LlamaTokenizer.convert_tokens_to_string``: special pieces are not decoded by SentencePiece."""
        out, current, prev_special = "", [], False
        for i, piece in enumerate(pieces):
            if piece in self.special_tokens:
                if not prev_special and i != 0:
                    out += " "
                out += self.sp.DecodePieces(current) + piece
                prev_special, current = True, []
            else:
                current.append(piece)
                prev_special = False
        return out + self.sp.DecodePieces(current)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` as 4.31's ``tokenizer.decode`` gives it (sentinels must be removed first)."""
        specials = {self.bos_id, self.eos_id, self.unk_id}
        sub_texts: list[str] = []
        current: list[str] = []
        for i in ids:
            if skip_special_tokens and i in specials:
                continue
            if i in self.added_by_id:
                if current:
                    sub_texts.append(self._pieces_to_string(current))
                    current = []
                sub_texts.append(self.added_by_id[i])
            else:
                current.append(self.sp.IdToPiece(i))
        if current:
            sub_texts.append(self._pieces_to_string(current))
        return " ".join(sub_texts)
