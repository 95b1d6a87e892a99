"""Reading a Label Studio labeling config: which Image, which TextArea carries the query, which BrushLabels
and/or PolygonLabels the answers go to.

A config the backend cannot serve raises :class:`ConfigError` with a message that names what is missing and how
to add it; ``/setup`` returns it and Label Studio shows it on the model card.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

#: The recommended config (also shipped as ``backend/labeling_config.xml`` and shown in the README).
RECOMMENDED_CONFIG = (Path(__file__).parent / "labeling_config.xml").read_text()
#: Configs larger than this are refused (Label Studio's own are a few kB; this bounds the XML parser's work).
MAX_CONFIG_BYTES = 256_000


#: A KeyPointLabels label naming one of these (any case) makes a negative click; Alt-click also does.
NEGATIVE_WORDS = ("exclude", "negative", "remove", "background", "not")


class ConfigError(ValueError):
    """The labeling config cannot be served; the message says what to change."""


@dataclass(frozen=True)
class LabelingSetup:
    """The parts of a labeling config the backend uses.

    Attributes:
        image_name: ``name`` of the ``<Image>`` (the ``to_name`` of every region we return).
        image_field: the task data key of the image (``$image`` -> ``image``).
        query_name: ``name`` of the ``<TextArea>`` the annotator types queries into (``None``: batch only).
        brush_name: ``name`` of the ``<BrushLabels>`` (the ``from_name`` of our brush regions); ``""`` when the
            config answers with polygons only.
        labels: the label values a mask can get, in config order: the BrushLabels', then the PolygonLabels'.
        click_names: ``name`` of the ``<KeyPointLabels>``/``<RectangleLabels>`` on the image whose regions are
            refinement prompts (clicks and boxes drawn with their smart tools).
        negative_labels: KeyPointLabels values that mark a click as "not this" (see :data:`NEGATIVE_WORDS`).
        message_name: ``name`` of a read-only ``<TextArea>`` where the backend's messages are shown, if any.
        brush_labels: the BrushLabels' label values (a brush region is made for a mask with one of these).
        polygon_name: ``name`` of the ``<PolygonLabels>``, if any: masks are then also answered as polygons
            (:mod:`backend.polygons`).
        polygon_labels: the PolygonLabels' label values (polygons are made for a mask with one of these).
    """

    image_name: str
    image_field: str
    query_name: str | None
    brush_name: str
    labels: tuple[str, ...]
    click_names: tuple[str, ...] = ()
    negative_labels: frozenset[str] = frozenset()
    message_name: str | None = None
    brush_labels: tuple[str, ...] = ()
    polygon_name: str | None = None
    polygon_labels: tuple[str, ...] = ()

    def choose_label(self, query: str, default: str | None = None) -> str:
        """The label of a mask: one named in the query, else the configured default, else the first label."""
        words = query.lower()
        named = [lab for lab in self.labels if re.search(rf"\b{re.escape(lab.lower())}\b", words)]
        if named:
            return max(named, key=len)  # "red car" beats "car" when both are labels
        if default and default in self.labels:
            return default
        return self.labels[0]


def _tag(el: ET.Element) -> str:
    return el.tag.lower()


def _control_labels(control: ET.Element | None) -> tuple[str, ...]:
    """The label values of a BrushLabels/PolygonLabels (none for no control); one without labels is refused."""
    if control is None:
        return ()
    labels = tuple(lab.get("value", "") for lab in control.iter() if _tag(lab) == "label" and lab.get("value"))
    if not labels:
        raise ConfigError(f'the <{control.tag} name="{control.get("name")}"> has no <Label value="..."/>; add one.')
    return labels


def parse_labeling_config(xml: str, require_query: bool = True) -> LabelingSetup:
    """Find the Image, the query TextArea and the BrushLabels of a labeling config.

    Args:
        xml: the config as Label Studio sends it in ``/setup`` (``schema``) and ``/predict`` (``label_config``).
        require_query: refuse a config without a ``<TextArea>`` for the query (interactive use needs one).
    """
    if not isinstance(xml, str) or not xml.strip():
        raise ConfigError("the labeling config is empty; use the recommended config from the lisa-ls README.")
    if len(xml.encode()) > MAX_CONFIG_BYTES:
        raise ConfigError(f"the labeling config is larger than {MAX_CONFIG_BYTES // 1000} kB")
    if "<!DOCTYPE" in xml.upper() or "<!ENTITY" in xml.upper():
        raise ConfigError("the labeling config must not contain DOCTYPE or ENTITY declarations")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise ConfigError(f"the labeling config is not valid XML ({e})") from e
    elements = list(root.iter())
    images = {el.get("name"): el for el in elements if _tag(el) == "image" and el.get("name")}
    if not images:
        raise ConfigError('the labeling config has no <Image name="image" value="$image"/>: LISA segments images.')
    brushes = [el for el in elements if _tag(el) == "brushlabels" and el.get("toName") in images]
    polygons = [el for el in elements if _tag(el) == "polygonlabels" and el.get("toName") in images]
    if not brushes and not polygons:
        raise ConfigError(
            'the labeling config has no <BrushLabels> (or <PolygonLabels>) for its image: add <BrushLabels '
            f'name="mask" toName="{next(iter(images))}"><Label value="Target"/></BrushLabels>.'
        )
    brush = brushes[0] if brushes else None
    polygon = next((el for el in polygons if brush is None or el.get("toName") == brush.get("toName")), None)
    image_name = (brush if brush is not None else polygon).get("toName", "")  # type: ignore[union-attr]
    brush_labels, polygon_labels = _control_labels(brush), _control_labels(polygon)
    labels = tuple(dict.fromkeys(brush_labels + polygon_labels))
    on_image = [el for el in elements if image_name in (el.get("toName") or "").split(",")]
    # A read-only TextArea is where the backend writes messages ("LISA found nothing matching ..."), never a query.
    texts = [el for el in on_image if _tag(el) == "textarea" and el.get("readonly", "").lower() != "true"]
    notes = [el for el in on_image if _tag(el) == "textarea" and el.get("readonly", "").lower() == "true"]
    clicks = [el for el in on_image if _tag(el) in ("keypointlabels", "rectanglelabels")]
    negative = frozenset(
        lab.get("value", "") for el in clicks if _tag(el) == "keypointlabels" for lab in el.iter()
        if _tag(lab) == "label" and any(w in lab.get("value", "").lower().split() for w in NEGATIVE_WORDS))
    if not texts and require_query:
        raise ConfigError(
            "the labeling config has no <TextArea> for the query: add "
            f'<TextArea name="query" toName="{image_name}" rows="1" editable="true" maxSubmissions="1"/>, '
            "where annotators type what to segment."
        )
    value = images[image_name].get("value", "")
    if not value.startswith("$") or len(value) < 2:
        raise ConfigError(f'<Image name="{image_name}"> must take its image from task data, e.g. value="$image".')
    return LabelingSetup(
        image_name=image_name,
        image_field=value[1:],
        query_name=texts[0].get("name") if texts else None,
        brush_name=brush.get("name", "") if brush is not None else "",
        labels=labels,
        click_names=tuple(el.get("name", "") for el in clicks),
        negative_labels=negative,
        message_name=notes[0].get("name") if notes else None,
        brush_labels=brush_labels,
        polygon_name=polygon.get("name", "") if polygon is not None else None,
        polygon_labels=polygon_labels,
    )
