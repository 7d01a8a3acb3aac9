"""Dense references of §9 Symile, §10 TCL and §11 iSogCLR (LOSSES.md)."""
__all__: list = []
