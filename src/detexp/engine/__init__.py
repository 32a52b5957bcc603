"""Plain-torch training: the epoch and inference loops, the optimizer and its schedule, early
stopping. No Ray, Hydra or MLflow; imports only config and errors of detexp.
"""
