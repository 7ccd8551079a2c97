"""hetero: train one model on a mixed fleet of NVIDIA, Ascend, Kunlun and CPU chips."""

__version__ = "0.1.0"
