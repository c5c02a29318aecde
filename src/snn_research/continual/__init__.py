"""Continual learning of the spiking parts: ``snn-research adapt`` and the continual pipeline."""
