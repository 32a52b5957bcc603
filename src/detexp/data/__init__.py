"""Data: the VOC folder layout (voc), parsing and checks (parsing), problem tables
(problems), the Ray Data pipeline (annotations, pipeline), the generated shapes dataset
(shapes), which folder a config means (source) and label statistics (label_stats).

The bottom of detexp but for config and errors, the only parts of detexp it imports.
Read tasks and decoding run in Ray Data's worker processes, so ``annotations`` and
``pipeline`` import no torch at module level."""
