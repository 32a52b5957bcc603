"""The detector: torchvision's Faster R-CNN builders with detexp's options (anchors, FPN
levels, box head), a faster CPU RoIAlign, weight loading and BatchNorm folding. Plain
torch/torchvision: imports only config and errors of detexp.
"""
