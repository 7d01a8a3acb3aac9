"""§13 similarity-matrix distillation, §14 CyCLIP and §15 score distillation (LOSSES.md)."""
__all__: list = []
