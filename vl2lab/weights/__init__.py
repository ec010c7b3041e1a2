"""Weights: unmodified Hugging Face snapshot folders. ``keys`` maps the official tensor names to vl2lab's modules,
``reader`` reads tensors (or only a slice of one) lazily from the safetensors files, ``pretrained`` loads and
saves whole snapshots.

Lesson: notebook 01, section "1. Load the model"; notebook 04 (each rank reads only its slice).
"""
