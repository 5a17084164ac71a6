"""FX passes of the ``avl`` backend, one job per module (importable as ``avl_compile.passes``)."""
