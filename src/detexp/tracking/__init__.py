"""What the user follows a run by: the MLflow store (runs, metrics, artifacts, the model
registry) and the driver's console progress. The only room that imports MLflow; it
imports only data, config and errors of detexp.
"""
