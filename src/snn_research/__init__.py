"""Hybrid ANN/SNN conversion of open language models: spiking FFNs, analog attention."""

__version__ = "0.1.0"
