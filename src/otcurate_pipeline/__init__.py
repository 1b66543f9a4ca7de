"""otcurate's application: what knows the pipeline (dvc.yaml, params.yaml) around the library.

The library, `otcurate`, takes arrays and returns records; it never imports this package.
"""
