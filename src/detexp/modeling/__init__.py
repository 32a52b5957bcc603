"""The detector: torchvision's Faster R-CNN builders with detexp's options (anchors, FPN
levels, box head), a faster CPU RoIAlign, weight loading, BatchNorm folding, and the export
to TorchScript and ONNX (onnx and onnxruntime imported only there). Plain torch/torchvision:
imports only config and errors of detexp.
"""
