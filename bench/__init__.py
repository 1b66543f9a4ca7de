"""Benchmarks, run on demand from the repository root as `python -m bench.<name>`; each writes
its rows and a markdown summary under bench/results/ (`bench.results_io.save`)."""
