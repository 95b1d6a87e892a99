"""LISA (arXiv 2308.00692) on current transformers + segment-anything: load a release, encode images,
segment queries. Knows nothing of Redis, HTTP or Label Studio.

Follow a query: ``preprocess.py`` (image -> CLIP and SAM inputs) -> ``inference.py`` (``LisaPredictor``:
``encode`` then ``segment``) -> ``prompts.py``/``tokenizer.py`` (prompt ids) -> ``modeling.py`` (sequence with
image features) -> ``generation.py`` (KV-cached greedy decoding, [SEG] states) -> ``sam.py`` (masks).
"""
