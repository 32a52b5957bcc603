"""The commands a user runs (``train``, ``tune``, ``eval``, ``predict``, ``export``, ``serve``,
``data ...``), each a
plain function of a composed config, plus what they share: Hydra multirun as one MLflow
parent run and Ray Tune's search space.

The top of the package: it may import every room below it (distributed, checkpoint,
engine, evaluation, modeling, tracking, data, config, errors); only ``__main__`` imports it.
"""
