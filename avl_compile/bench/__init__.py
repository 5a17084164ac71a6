"""Evaluation bench helpers: synthetic tasks and the small models trained on them.

Kept import-light on purpose: submodules pull in Pillow / transformers only when used.
"""
