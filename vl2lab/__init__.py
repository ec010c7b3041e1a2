"""vl2lab: deploy DeepSeek-VL2 across several GPUs, one measured notebook at a time."""

__version__ = "0.1.0"
