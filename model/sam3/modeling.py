"""SAM 3 on one image embedding: encode once, then concept queries (``find``) and clicks (``click``) on it.

>>> predictor = Sam3Predictor.from_pretrained("facebook/sam3", dtype="bf16", device="cuda")
>>> encoded = predictor.encode(rgb)                      # the ViT backbone: the expensive part, once per image
>>> found = predictor.find(encoded, "yellow school bus")  # text encoder + DETR + mask decoder: every instance
>>> found.masks.shape                                    # n x H x W bool at the image size, n = 0: none
>>> clicked = predictor.click(encoded, [(120, 80, 1)])    # tracker prompt encoder + mask decoder: one mask

Both heads read the same ViT backbone output (``Sam3Encoding.hidden``). The detector and the tracker each put
their own FPN neck on it (``detector_model.vision_encoder.neck`` and ``tracker_neck`` in the release; see
:mod:`model.sam3.configuration`), so the encoding kept per image is the backbone output alone (1 x 5184 x 1024,
21 MB in fp32 for the release) and each call runs its head's neck again - a few convolutions, against the 32 ViT
layers of the backbone - rather than caching both necks' four levels (about ten times the bytes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.defaults import SAM3_MASK_THRESHOLD, SAM3_SCORE_THRESHOLD, resolve_device, resolve_dtype
from model.errors import CheckpointError, InputError
from model.family import SAM3, family_of_config, read_config
from model.sam3.configuration import FULL_MODEL_TYPE
from model.sam3.processing import check_phrase

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Sam3Encoding:
    """One image, encoded: what every query and click on it needs. Cache it (``nbytes``) and reuse it.

    Attributes:
        hidden: ``1 x (g*g) x C`` ViT backbone output (g = 72, C = 1024 in the release).
        grid: ``(g, g)``, the patch grid of the model input.
        original_hw: ``(H, W)`` of the image as given.
    """

    hidden: torch.Tensor
    grid: tuple[int, int]
    original_hw: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.hidden.numel() * self.hidden.element_size()


@dataclass
class Instances:
    """Every instance of a concept: ``masks`` ``n x H x W`` bool, ``scores`` ``n`` (float), ``boxes`` ``n x 4``
    (x0, y0, x1, y1 in pixels of the image), in the detector's query order; ``n = 0`` when nothing matches."""

    masks: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray


@dataclass
class Clicked:
    """The tracker's one mask for clicks/a box: ``mask`` ``H x W`` bool and its predicted IoU ``score``."""

    mask: np.ndarray
    score: float


def _resolve_folder(model: str | os.PathLike) -> Path:
    """A local folder as is; a Hub id downloaded (config, weights, processor and tokenizer files only)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        raise CheckpointError(f"cannot download {model} from the Hugging Face Hub ({type(e).__name__}: {e})") from e


class Sam3Predictor:
    """A loaded SAM 3: the detector (``Sam3Model``), the tracker head (``Sam3TrackerModel``, ``None`` for a
    detector-only folder) sharing the detector's ViT backbone, and the processors."""

    def __init__(self, detector, tracker, processor, tracker_processor, device: torch.device | str,
                 dtype: torch.dtype = torch.float32) -> None:
        self.detector, self.tracker = detector.eval(), None if tracker is None else tracker.eval()
        self.processor, self.tracker_processor = processor, tracker_processor
        self.device, self.dtype = torch.device(device), dtype
        #: Tokens of a phrase, start/end included: the CLIP text encoder's position table (32 in the release).
        self.phrase_token_limit = int(detector.config.text_config.max_position_embeddings)
        self.patch_size = int(detector.config.vision_config.backbone_config.patch_size)

    @property
    def model(self) -> torch.nn.Module:
        """The detector (it holds the shared backbone): what device-memory checks look at."""
        return self.detector

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, dtype: str = "fp32", device: str = "auto") -> Sam3Predictor:
        """Load a folder or Hub id in the released transformers layout (:mod:`model.sam3.configuration`).

        A checkpoint of another family (a LISA release, say) raises :class:`CheckpointError` naming what it is.
        The tracker's copy of the ViT backbone is dropped after loading and the detector's used in its place (the
        release stores one backbone; transformers loads it into both models).
        """
        from transformers import Sam3Model, Sam3Processor, Sam3TrackerModel, Sam3TrackerProcessor
        from transformers.utils import logging as hf_logging

        config, where = read_config(model)
        found = family_of_config(config, where)
        if found != SAM3:
            raise CheckpointError(
                f"{model}: this is a {found.upper()} checkpoint (model_type {config.get('model_type')!r}), not SAM 3; "
                "serve it with the LISA family, or pass a SAM 3 release such as facebook/sam3"
            )
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if dtype not in DTYPES:
            raise CheckpointError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        folder = _resolve_folder(model)
        torch_dtype = DTYPES[dtype]
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the load reports list the other model's weights as unexpected
        try:
            detector = Sam3Model.from_pretrained(folder, dtype=torch_dtype)
            tracker = None
            if config.get("model_type") == FULL_MODEL_TYPE:
                tracker = Sam3TrackerModel.from_pretrained(folder, dtype=torch_dtype)
                tracker.vision_encoder.backbone = detector.vision_encoder.backbone  # one backbone, not two
            processor = Sam3Processor.from_pretrained(folder)
        except Exception as e:
            raise CheckpointError(f"{folder}: cannot load as SAM 3 ({type(e).__name__}: {e})") from e
        finally:
            hf_logging.set_verbosity(verbosity)
        tracker_processor = Sam3TrackerProcessor(image_processor=processor.image_processor)
        detector.to(device)
        if tracker is not None:
            tracker.to(device)
        return cls(detector, tracker, processor, tracker_processor, device, torch_dtype)

    # ---- the image ----

    def pixel_values(self, image: np.ndarray) -> torch.Tensor:
        """``1 x 3 x S x S`` model input of an RGB ``H x W x 3`` uint8 image (the processor's resize/normalise)."""
        _check_image(image)
        inputs = self.processor(images=Image.fromarray(image), return_tensors="pt")
        return inputs["pixel_values"].to(self.device, self.dtype)

    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> Sam3Encoding:
        """Run the ViT backbone on an RGB ``H x W x 3`` uint8 image: the one expensive step per image."""
        pixels = self.pixel_values(image)
        hidden = self.detector.vision_encoder.backbone(pixels).last_hidden_state
        grid = (pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size)
        return Sam3Encoding(hidden, grid, (int(image.shape[0]), int(image.shape[1])))

    def _spatial(self, encoded: Sam3Encoding) -> torch.Tensor:
        """The backbone output as ``1 x C x g x g``, the necks' input."""
        return encoded.hidden.view(encoded.hidden.shape[0], *encoded.grid, -1).permute(0, 3, 1, 2)

    def detector_features(self, encoded: Sam3Encoding):
        """What ``Sam3Model.get_vision_features`` returns for the image (its neck on the cached backbone output),
        to pass as ``vision_embeds``."""
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        fpn, positions = self.detector.vision_encoder.neck(self._spatial(encoded))
        return Sam3VisionEncoderOutput(last_hidden_state=encoded.hidden, fpn_hidden_states=fpn,
                                       fpn_position_encoding=positions)

    def tracker_embeddings(self, encoded: Sam3Encoding) -> list[torch.Tensor]:
        """What ``Sam3TrackerModel.get_image_embeddings`` returns for the image, from the cached backbone output:
        ``[1 x C/8 x 4g x 4g, 1 x C/4 x 2g x 2g, 1 x C x g x g]`` (C = fpn width).

        The same steps in the same order as the tracker's own ``get_image_features`` + ``get_image_embeddings``:
        its neck, the mask decoder's projections of the two fine levels, the "no memory" embedding added to the
        last level, then as many levels as ``backbone_feature_sizes`` names (three). Note that with the release's
        four-level neck that last level is the coarsest (scale 0.5), which is then left out: transformers' image
        tracker effectively adds no "no memory" embedding, and this follows it, to give its exact output."""
        tracker = self._need_tracker()
        fpn, _ = tracker.vision_encoder.neck(self._spatial(encoded))
        maps = list(fpn)
        maps[0] = tracker.mask_decoder.conv_s0(maps[0])
        maps[1] = tracker.mask_decoder.conv_s1(maps[1])
        flat = [m.flatten(2).permute(2, 0, 1) for m in maps]  # HW x 1 x C, as the tracker keeps them
        flat[-1] = flat[-1] + tracker.no_memory_embedding
        return [f.permute(1, 2, 0).view(1, -1, *size) for f, size in zip(flat, tracker.backbone_feature_sizes)]

    # ---- concept queries ----

    def check_phrase(self, phrase: str) -> str:
        """``phrase`` with its whitespace collapsed, or :class:`InputError` (empty, or too many tokens)."""
        return check_phrase(phrase, self.processor.tokenizer, self.phrase_token_limit)

    @torch.inference_mode()
    def find(self, encoded: Sam3Encoding, phrase: str, threshold: float = SAM3_SCORE_THRESHOLD,
             mask_threshold: float = SAM3_MASK_THRESHOLD) -> Instances:
        """Every instance of the noun phrase ``phrase`` scoring above ``threshold``: what ``Sam3Processor`` +
        ``Sam3Model`` + ``post_process_instance_segmentation`` give on the image, without re-encoding it."""
        text = self.processor(text=self.check_phrase(phrase), return_tensors="pt").to(self.device)
        outputs = self.detector(vision_embeds=self.detector_features(encoded), input_ids=text["input_ids"],
                                attention_mask=text["attention_mask"])
        [found] = self.processor.post_process_instance_segmentation(
            outputs, threshold=threshold, mask_threshold=mask_threshold, target_sizes=[encoded.original_hw])
        masks = found["masks"].bool().cpu().numpy()
        if not len(masks):  # post-processing leaves an empty set at the model's mask size
            masks = np.zeros((0, *encoded.original_hw), dtype=bool)
        return Instances(masks, found["scores"].float().cpu().numpy(), found["boxes"].float().cpu().numpy())

    # ---- clicks and boxes ----

    def _need_tracker(self):
        if self.tracker is None:
            raise InputError("this SAM 3 checkpoint has the detector only (model_type 'sam3'), no tracker for "
                             "clicks or boxes; serve a full release (model_type 'sam3_video', as facebook/sam3)")
        return self.tracker

    def prompt_inputs(self, points: list[tuple[float, float, int]], box: list[float] | None,
                      original_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        """``Sam3TrackerProcessor``'s prompt tensors for one object: ``input_points`` ``1 x 1 x n x 2``,
        ``input_labels`` ``1 x 1 x n`` (1 adds, 0 removes), ``input_boxes`` ``1 x 1 x 4``, in model pixels."""
        kwargs: dict = {}
        if points:
            kwargs["input_points"] = [[[[float(x), float(y)] for x, y, _ in points]]]
            kwargs["input_labels"] = [[[int(label) for _, _, label in points]]]
        if box is not None:
            kwargs["input_boxes"] = [[[float(v) for v in box]]]
        inputs = self.tracker_processor(original_sizes=[list(original_hw)], return_tensors="pt", **kwargs)
        return {k: v.to(self.device) for k, v in inputs.items() if k != "original_sizes"}

    @torch.inference_mode()
    def click(self, encoded: Sam3Encoding, points: list[tuple[float, float, int]],
              box: list[float] | None = None) -> Clicked:
        """The tracker's one mask for ``points`` (``(x, y, label)`` in image pixels) and/or ``box``
        (``[x0, y0, x1, y1]``), on the cached image: prompt encoder + mask decoder only.

        ``multimask_output=False``: the single-mask output, which the tracker itself replaces by the best of its
        three candidates when that mask is unstable (``dynamic_multimask_via_stability``) - SAM 3's click rule."""
        if not points and box is None:
            raise InputError("a click needs at least one point or a box")
        tracker = self._need_tracker()
        prompts = self.prompt_inputs(points, box, encoded.original_hw)
        if "input_points" in prompts:
            prompts["input_points"] = prompts["input_points"].to(self.dtype)
        if "input_boxes" in prompts:
            prompts["input_boxes"] = prompts["input_boxes"].to(self.dtype)
        outputs = tracker(image_embeddings=self.tracker_embeddings(encoded), multimask_output=False, **prompts)
        [masks] = self.tracker_processor.post_process_masks(outputs.pred_masks.float().cpu(),
                                                            [list(encoded.original_hw)])
        return Clicked(masks[0, 0].bool().numpy(), float(outputs.iou_scores[0, 0, 0]))


def _check_image(image: np.ndarray) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        raise InputError("SAM 3 takes an RGB image as an H x W x 3 uint8 array")
    if min(image.shape[:2]) < 1:
        raise InputError(f"the image is empty ({image.shape[1]}x{image.shape[0]} pixels)")
