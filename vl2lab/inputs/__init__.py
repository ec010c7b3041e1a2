"""Inputs: a conversation with images → the batch the model reads. ``tiling`` chooses the canvas and cuts the tiles,
``tokenizer`` builds and loads the tokenizer, ``processor`` puts text, image tokens and pixels together.

Lesson: notebook 01, section "2. What the processor does to a picture".
"""
