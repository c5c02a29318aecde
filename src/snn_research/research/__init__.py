"""Research track toward a fully spiking transformer: operators measured outside the pipeline."""
