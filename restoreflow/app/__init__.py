"""What users run: the Python API (:func:`restoreflow.restore`), the command line, batch and bench, metrics
and figures. The top layer below the package facade."""
