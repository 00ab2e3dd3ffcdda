"""fusionloader's benchmarks, installed as ``fusionloader.benchmarks``; ``fusionloader bench`` runs them all.

Each ``bench_*.py`` has ``run(quick: bool = False, **kw) -> dict`` (figures from one run, medians) and a
``__main__`` that writes the dict as JSON. Speed targets live here, never in the unit tests.
"""
