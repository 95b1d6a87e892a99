"""Two-stage inference, SamPredictor style: encode an image once, then segment any number of queries on it.

>>> predictor = LisaPredictor.from_pretrained("xinlai/LISA-7B-v1", dtype="bf16", device="cuda")
>>> image = predictor.encode(load_image("kitchen.jpg"))          # CLIP + SAM ViT-H: the expensive part
>>> [seg] = predictor.segment([(image, "What is the food rich in vitamin C in this image? "
...                                    "Please output segmentation mask.")])
>>> seg.masks.shape                                             # n_seg x H x W, bool, original size

Several (image, query) pairs - on the same or on different images - run as one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from model.defaults import DEFAULT_MAX_NEW_TOKENS
from model.errors import InputError
from model.generation import greedy_generate
from model.modeling import LisaModel
from model.positions import seg_positions
from model.preprocess import PreprocessedImage, preprocess
from model.prompts import chat_prompt, teacher_forced_prompt
from model.sam import decode_masks, decode_prompted, sparse_prompts, upscale_masks
from model.tokenizer import LisaTokenizer


@dataclass
class EncodedImage:
    """What a query needs from an image; cache it and reuse it for every query on that image.

    Attributes:
        image_features: ``P x H`` projected CLIP patch features (P = 256 for LISA v1).
        sam_embedding: ``1 x C x g x g`` SAM image embedding (C = 256, g = 64).
        original_hw: (H, W) of the EXIF-applied image.
        resized_hw: (h', w') of the un-padded SAM input.
    """

    image_features: torch.Tensor
    sam_embedding: torch.Tensor
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]

    @property
    def nbytes(self) -> int:
        """Memory held by the two tensors (what a byte-bounded cache counts)."""
        return sum(t.numel() * t.element_size() for t in (self.image_features, self.sam_embedding))


@dataclass
class Segmentation:
    """The answer to one query.

    Attributes:
        output_ids: generated ids (empty in teacher-forced mode), int64.
        text: the decoded answer (generated, or the given answer).
        mask_logits: ``n x H x W`` float32 at the original image size, one per ``[SEG]``.
        masks: ``n x H x W`` bool, ``mask_logits > 0``.
        scores: ``n`` float32, SAM's predicted IoU for each mask.
        seg_hidden: ``n x H`` LLM states that became the prompts; prompt_embeddings: ``n x C``;
        low_res_masks: ``n x 1 x 256 x 256`` decoder logits. Kept for checks and fine-tuning.
    """

    output_ids: np.ndarray
    text: str
    mask_logits: np.ndarray
    masks: np.ndarray
    scores: np.ndarray
    seg_hidden: torch.Tensor | None = field(default=None, repr=False)
    prompt_embeddings: torch.Tensor | None = field(default=None, repr=False)
    low_res_masks: torch.Tensor | None = field(default=None, repr=False)


class LisaPredictor:
    """LISA inference on a loaded model: ``encode`` images, then ``segment`` queries against them."""

    def __init__(self, model: LisaModel, tokenizer: LisaTokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.mm_projector.weight.device

    @classmethod
    def from_pretrained(cls, model: str, vision_tower: str | None = None, dtype: str = "fp32",
                        device: str = "cpu", quantize: str | None = None) -> LisaPredictor:
        """Load a LISA release (see :func:`model.checkpoint.load_lisa`)."""
        from model.checkpoint import load_lisa

        return cls(*load_lisa(model, vision_tower=vision_tower, dtype=dtype, device=device, quantize=quantize))

    # --------------------------------------------------------------------------------------------- images
    @torch.inference_mode()
    def encode_batch(self, images: Sequence[np.ndarray | PreprocessedImage]) -> list[EncodedImage]:
        """Encode images (``H x W x 3`` uint8 RGB arrays or :class:`PreprocessedImage`) in one CLIP/SAM call."""
        pre = [im if isinstance(im, PreprocessedImage) else self.preprocess(im) for im in images]
        if not pre:
            return []
        clip = torch.cat([p.clip_pixels for p in pre]).to(self.device)
        sam = torch.cat([p.sam_pixels for p in pre]).to(self.device)
        feats = self.model.image_features(clip)
        embs = self.model.sam_embedding(sam)
        return [
            EncodedImage(feats[i].clone(), embs[i : i + 1].clone(), p.original_hw, p.resized_hw)
            for i, p in enumerate(pre)
        ]

    def preprocess(self, image: np.ndarray) -> PreprocessedImage:
        """Both model inputs of an RGB image, at this model's CLIP and SAM input sizes."""
        return preprocess(image, self.model.clip_size, self.model.lisa_config.sam_image_size)

    def encode(self, image: np.ndarray | PreprocessedImage) -> EncodedImage:
        """Encode one image; see :meth:`encode_batch`."""
        return self.encode_batch([image])[0]

    # -------------------------------------------------------------------------------------------- queries
    def prompt_ids(self, prompts: Sequence[str], images: Sequence[EncodedImage], extra: int) -> list[torch.Tensor]:
        """Token ids (with the image sentinel) of each prompt; refuses prompts that leave no room for ``extra``
        new tokens in the context window."""
        window = self.model.lisa_config.max_position_embeddings
        ids_list = []
        for prompt, image in zip(prompts, images):
            ids = self.tokenizer.encode_with_image(prompt)
            length = len(ids) - 1 + image.image_features.shape[0]
            if length + extra > window:
                raise InputError(
                    f"the query is too long: with the image it takes {length} of the model's {window} positions, "
                    f"and {extra} more are reserved for the answer. Shorten the query."
                )
            ids_list.append(torch.tensor(ids, dtype=torch.long))
        return ids_list

    def _segmentations(self, images: Sequence[EncodedImage], states: Sequence[torch.Tensor],
                       tokens: Sequence[list[int]], texts: Sequence[str]) -> list[Segmentation]:
        """Masks for every [SEG] state of a batch: one projection and one decoder call for all of them."""
        counts = [s.shape[0] for s in states]
        all_states = torch.cat(list(states))
        prompts = self.model.project_seg(all_states)
        embeddings = torch.cat([im.sam_embedding.expand(n, -1, -1, -1) for im, n in zip(images, counts)])
        low_res, iou = decode_masks(self.model.sam, embeddings.to(self.model.sam_dtype), prompts)
        results, start = [], 0
        for image, n, toks, text in zip(images, counts, tokens, texts):
            part = slice(start, start + n)
            start += n
            logits = upscale_masks(self.model.sam, low_res[part], image.resized_hw, image.original_hw)
            results.append(self._result(toks, text, logits, iou[part], all_states[part], prompts[part],
                                        low_res[part].float()))
        return results

    def validate(self, image: EncodedImage, query: str, answer: str | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
        """Raise :class:`InputError` for a query the model would refuse, without running it (so that one bad
        query can be answered alone instead of failing a whole batch)."""
        if answer is None:
            if max_new_tokens < 1:
                raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
            self.prompt_ids([chat_prompt(query)], [image], max_new_tokens)
        else:
            self.prompt_ids([teacher_forced_prompt(query, answer)], [image], 0)

    @torch.inference_mode()
    def segment(self, items: Sequence[tuple[EncodedImage, str]],
                max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[Segmentation]:
        """Generate an answer for each (image, query) pair and decode one mask per generated ``[SEG]``.

        All pairs run as one left-padded batch: one prefill, then one single-token step per new token.
        """
        if not items:
            return []
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        images = [im for im, _ in items]
        ids_list = self.prompt_ids([chat_prompt(q) for _, q in items], images, max_new_tokens)
        embeds, mask, positions, _ = self.model.embed_sequences(ids_list, [im.image_features for im in images])
        layout = self.tokenizer.layout
        gen = greedy_generate(self.model.llm, embeds, mask, positions, max_new_tokens, layout.eos_id, layout.seg_id)
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in gen.tokens]
        return self._segmentations(images, gen.seg_states, gen.tokens, texts)

    @torch.inference_mode()
    def segment_teacher_forced(self, items: Sequence[tuple[EncodedImage, str, str]]) -> list[Segmentation]:
        """Masks for given answers (each containing ``[SEG]``), without generating: one forward pass.

        This is LISA's validation path; the state before each ``[SEG]`` of the answer becomes a mask prompt.
        """
        if not items:
            return []
        images = [im for im, _, _ in items]
        ids_list = self.prompt_ids([teacher_forced_prompt(q, a) for _, q, a in items], images, 0)
        hidden, pads = self.teacher_forced_hidden(ids_list, [im.image_features for im in images])
        states = [
            hidden[b, [pads[b] + p for p in self.seg_positions(ids, image.image_features.shape[0])]]
            for b, (image, ids) in enumerate(zip(images, ids_list))
        ]
        return self._segmentations(images, states, [[] for _ in items], [a for _, _, a in items])

    @torch.inference_mode()
    def refine(self, image: EncodedImage, seg_prompts: torch.Tensor | None = None,
               points: np.ndarray | None = None, labels: np.ndarray | None = None, box: np.ndarray | None = None,
               multimask: bool | None = None) -> Segmentation:
        """Masks from SAM's prompt encoder + decoder alone, on a cached image embedding: no CLIP, no LLM.

        The annotator's clicks and box are added to the [SEG] prompts of an earlier answer (LISA's token order:
        points, box corners, [SEG]); without [SEG] prompts this is plain SAM on LISA's SAM weights.

        Args:
            seg_prompts: ``n x C`` projected [SEG] embeddings (``Segmentation.prompt_embeddings``), or ``None``.
            points: ``P x 2`` (x, y) in pixels of the EXIF-applied original image; labels: ``P``, 1 keep, 0 remove.
            box: ``4`` (x0, y0, x1, y1) in original pixels.
            multimask: SAM's 3-mask output, best kept; default: only for a single click without [SEG] or box.
        Returns:
            A :class:`Segmentation` with ``n`` masks (1 without [SEG] prompts); ``text`` and ``output_ids`` empty.
        """
        has_seg = seg_prompts is not None and seg_prompts.shape[0] > 0
        n_points = 0 if points is None else len(points)
        if not has_seg and n_points == 0 and box is None:
            raise InputError("a refinement needs [SEG] prompts, points or a box")
        scale = torch.tensor([image.resized_hw[1] / image.original_hw[1], image.resized_hw[0] / image.original_hw[0]])
        sam = self.model.sam
        device = self.device
        point_arg = None
        if n_points:
            coords = torch.as_tensor(np.asarray(points, dtype=np.float32)).reshape(1, -1, 2) * scale
            lab = torch.as_tensor(np.asarray(labels, dtype=np.int64)).reshape(1, -1)
            point_arg = (coords.to(device), lab.to(device))
        box_arg = None
        if box is not None:
            box_arg = (torch.as_tensor(np.asarray(box, dtype=np.float32)).reshape(1, 2, 2) * scale).reshape(1, 4)
            box_arg = box_arg.to(device)
        prompts = seg_prompts.to(device) if has_seg else None
        sparse = sparse_prompts(sam, prompts, point_arg, box_arg)
        if multimask is None:
            multimask = not has_seg and box is None and n_points == 1
        low_res, iou = decode_prompted(sam, image.sam_embedding, sparse, multimask)
        if multimask:  # SAM's advice for an ambiguous click: keep the mask it is most sure of
            best = iou.argmax(dim=1)
            rows = torch.arange(low_res.shape[0])
            low_res, iou = low_res[rows, best][:, None], iou[rows, best]
        else:
            iou = iou[:, 0]
        logits = upscale_masks(sam, low_res, image.resized_hw, image.original_hw)
        used = prompts if has_seg else sparse.new_zeros((0, sparse.shape[-1]))
        return self._result([], "", logits, iou, used.new_zeros((0,)), used, low_res.float())

    def teacher_forced_hidden(self, ids_list: list[torch.Tensor], feats: list[torch.Tensor]):
        """Final-layer post-norm hidden states of a left-padded batch: ``(B x T x H, pad lengths)``."""
        embeds, mask, positions, pads = self.model.embed_sequences(ids_list, feats)
        out = self.model.llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
        return out.last_hidden_state, pads

    def seg_positions(self, ids: torch.Tensor, num_patches: int) -> list[int]:
        """Positions, in the image-expanded sequence, of the state *before* each ``[SEG]`` of ``ids``."""
        return seg_positions(ids, self.tokenizer.layout.seg_id, num_patches)

    def _result(self, tokens, text, logits, iou, states, prompts, low_res) -> Segmentation:
        logits_np = logits.float().cpu().numpy()
        return Segmentation(
            output_ids=np.asarray(tokens, dtype=np.int64),
            text=text,
            mask_logits=logits_np,
            masks=logits_np > 0,
            scores=iou.float().cpu().numpy(),
            seg_hidden=states.float().cpu(),
            prompt_embeddings=prompts.float().cpu(),
            low_res_masks=low_res.cpu(),
        )
