"""Checkpoints: the files ``train`` writes and ``eval``/``predict`` read, where Ray Train
stores a run's checkpoints (and which one a resumed run continues from), and the config
a checkpoint is evaluated with.

May import engine, evaluation, modeling, tracking, data, config and errors; no Ray Train
worker code, no command.
"""
