"""Thin stage entry points: `python -m stages.<name>`; one per dvc.yaml stage."""
