"""Dense references of §13–§15 and the ``similarity_kl`` / ``similarity_topk`` primitives."""
__all__: list = []
