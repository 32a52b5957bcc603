"""Data: VOC-format parsing and checks (voc), the Ray Data pipeline (pipeline), the
generated shapes dataset (shapes), and where a config's images come from (source)."""
