"""Dense references of the self-supervised family: LOSSES.md §4–§8 and §12."""
__all__: list = []
