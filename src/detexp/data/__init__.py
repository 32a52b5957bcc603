"""Data: the VOC folder layout (voc), parsing and checks (parsing), problem tables
(problems), the Ray Data pipeline (annotations, pipeline), the generated shapes dataset
(shapes), which folder a config means (source), label statistics (show), and the ``data``
commands (commands)."""
