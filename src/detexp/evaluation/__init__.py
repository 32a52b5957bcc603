"""Evaluation: mAP metrics (COCO-style and VOC07/VOC12), diagnostics (confusion matrix,
threshold curves, worst images), the figures and tables people read, the prediction record
schema, and the parity of two detectors (an export against its PyTorch model). Plain numpy/torch/PIL: imports only data, config and errors of detexp.
"""
