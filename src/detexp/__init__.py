"""detexp: fine-tune torchvision Faster R-CNN detectors on Pascal VOC-format data with
Hydra configs, Ray Data/Train and MLflow. Start with ``python -m detexp --help``."""

__version__ = "0.1.0"
