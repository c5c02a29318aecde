"""Benchmarks of the spiking core and the pipeline: `python -m benchmarks.run` (or `make bench`).

Every figure is a ratio against a baseline measured in the same run, on the
same machine, so the verdicts hold on any machine; absolute times are printed
only as context. Rows go to reports/bench/ as CSV.
"""
