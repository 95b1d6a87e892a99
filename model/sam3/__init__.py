"""SAM 3 (transformers' ``Sam3Model`` + ``Sam3TrackerModel``) as this project's second model family.

- :mod:`model.sam3.configuration` - the released layout, tiny geometries for tests;
- :mod:`model.sam3.processing` - phrase rule, a locally made CLIP tokenizer;
- :mod:`model.sam3.modeling` - :class:`Sam3Predictor`: encode once, ``find`` concepts, ``click``;
- :mod:`model.sam3.tiny` - tiny random checkpoints in the released layout.

Import the submodules directly (this package imports nothing, so that ``model.family`` stays torch-free).
"""
