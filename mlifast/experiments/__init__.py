"""Experiments of the MLI study built on the library: training runs, the demo, reports."""
