"""Evaluation: mAP metrics (COCO-style and VOC07/VOC12), diagnostics (confusion matrix,
threshold curves, worst images), the figures and tables people read, and the prediction
record schema. Plain numpy/torch/PIL: imports only data, config and errors of detexp.
"""
