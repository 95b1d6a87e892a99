"""The differentiable teacher-forced forward pass that fine-tuning and evaluation share.

It is LISA's ``model_forward`` on our modules: a batch of (image, query, answer with ``[SEG]``, ground-truth masks)
goes through CLIP and the SAM image encoder (frozen, as LISA's recipe has it, unless asked otherwise), the LLM
over the left-padded image-expanded sequences, the [SEG] projection and the SAM mask decoder, and ends in
:func:`model.losses.lisa_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.losses import DEFAULT_WEIGHTS, LossWeights, lisa_loss
from model.modeling import LisaModel
from model.positions import expand_labels, seg_positions
from model.preprocess import PreprocessedImage
from model.prompts import teacher_forced_labels, teacher_forced_prompt
from model.sam import decode_masks, decode_prompted, sparse_prompts, upscale_masks
from model.tokenizer import IGNORE_INDEX, LisaTokenizer


@dataclass
class TrainExample:
    """One conversation: an image, a question, an answer holding one ``[SEG]`` per ground-truth mask.

    Attributes:
        image: both preprocessed inputs of the image.
        masks: ``n x H x W`` 0/1 (uint8 or bool) at the image's original size; pixels equal to 255 count as
            background, as in LISA's training.
    """

    image: PreprocessedImage
    query: str
    answer: str
    masks: torch.Tensor
    #: Annotator prompts added to the (single) [SEG] prompt, SAM style: ``P x 3`` (x, y, label) and ``4``
    #: (x0, y0, x1, y1), in pixels of the original image; ``use_seg=False`` leaves the [SEG] prompt out.
    points: torch.Tensor | None = None
    box: torch.Tensor | None = None
    use_seg: bool = True

    @property
    def prompted(self) -> bool:
        return self.points is not None or self.box is not None or not self.use_seg


def forward_losses(
    model: LisaModel,
    tokenizer: LisaTokenizer,
    examples: Sequence[TrainExample],
    weights: LossWeights = DEFAULT_WEIGHTS,
    train_vision: bool = False,
) -> dict[str, torch.Tensor]:
    """LISA's losses on a batch. ``train_vision`` lets gradients reach CLIP and the SAM image encoder (only for
    models trained from scratch; LISA keeps both frozen)."""
    logits, labels, pred_masks = teacher_forced_forward(model, tokenizer, examples, train_vision)
    device = logits.device
    targets = [(ex.masks == 1).to(device) for ex in examples]
    return lisa_loss(logits, labels, pred_masks, targets, weights)


def teacher_forced_forward(
    model: LisaModel, tokenizer: LisaTokenizer, examples: Sequence[TrainExample], train_vision: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One forward pass: ``(logits B x T x V, labels B x T, per example n x H x W mask logits)``."""
    device = model.mm_projector.weight.device
    # Several queries about one image share its encodings (SAM's "embed once, prompt many times"): each distinct
    # image goes through CLIP and the SAM encoder once, and indexing hands the result (and gradients) to every
    # example that asked about it.
    slot: dict[int, int] = {}
    index = [slot.setdefault(id(ex.image), len(slot)) for ex in examples]
    images = list({id(ex.image): ex.image for ex in examples}.values())
    clip = torch.cat([image.clip_pixels for image in images]).to(device)
    sam = torch.cat([image.sam_pixels for image in images]).to(device)
    with torch.set_grad_enabled(train_vision and torch.is_grad_enabled()):
        clip_feats = model.clip_features(clip)[index]
        embeddings = model.sam_embedding(sam)[index]
    feats = model.mm_projector(clip_feats.to(model.mm_projector.weight.dtype))
    num_patches = feats.shape[1]
    ids_list, labels_list = [], []
    for ex in examples:
        conversation = teacher_forced_prompt(ex.query, ex.answer)
        ids = tokenizer.encode_with_image(conversation)
        ids_list.append(torch.tensor(ids))
        labels_list.append(torch.tensor(teacher_forced_labels(tokenizer, conversation, ids)))
    embeds, mask, positions, pads = model.embed_sequences(ids_list, list(feats))
    hidden = model.llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                             use_cache=False).last_hidden_state
    logits = model.llm.lm_head(hidden)
    labels = torch.full(mask.shape, IGNORE_INDEX, dtype=torch.long, device=device)
    for b, (ids, lab) in enumerate(zip(ids_list, labels_list)):
        labels[b, pads[b]:] = expand_labels(lab, ids, num_patches).to(device)
    seg_id = tokenizer.layout.seg_id
    states, owners = [], []
    for b, ids in enumerate(ids_list):
        positions_b = seg_positions(ids, seg_id, num_patches)
        if len(positions_b) != examples[b].masks.shape[0]:
            raise ValueError(f"the answer {examples[b].answer!r} has {len(positions_b)} [SEG] but the example has "
                             f"{examples[b].masks.shape[0]} masks; they must match")
        states.extend(hidden[b, pads[b] + p] for p in positions_b)
        owners.extend([b] * len(positions_b))
    pred_masks: list[torch.Tensor] = []
    prompts = None
    if states:
        prompts = model.project_seg(torch.stack(states))
        low_res, _ = decode_masks(model.sam, embeddings[owners], prompts)
    start = 0
    for b, ex in enumerate(examples):
        n = ex.masks.shape[0]
        part = low_res[start : start + n] if n else embeddings.new_zeros((0, 1, 4, 4))
        if ex.prompted:  # the annotator's clicks/box with (or instead of) the [SEG] prompt
            seg = None if prompts is None else prompts[start : start + n]
            part = _decode_with_clicks(model, ex, embeddings[b : b + 1], seg)
        pred_masks.append(upscale_masks(model.sam, part, ex.image.resized_hw, ex.image.original_hw))
        start += n
    return logits, labels, pred_masks


def _decode_with_clicks(model: LisaModel, ex: TrainExample, embedding: torch.Tensor,
                        seg_prompts: torch.Tensor) -> torch.Tensor:
    """``1 x 1 x 4g x 4g`` mask logits of one example from its clicks/box (+ its [SEG] prompt), as at inference
    (:meth:`model.inference.LisaPredictor.refine`): pixel coordinates scaled to the SAM input."""
    (oh, ow), (rh, rw) = ex.image.original_hw, ex.image.resized_hw
    scale = embedding.new_tensor([rw / ow, rh / oh]).float()
    points = None
    if ex.points is not None and len(ex.points):
        pts = ex.points.to(embedding.device).float()
        points = ((pts[None, :, :2] * scale), pts[None, :, 2].long())
    box = None if ex.box is None else (ex.box.to(embedding.device).float().view(1, 2, 2) * scale).view(1, 4)
    sparse = sparse_prompts(model.sam, seg_prompts if ex.use_seg else None, points, box)
    low_res, _ = decode_prompted(model.sam, embedding, sparse)
    return low_res
