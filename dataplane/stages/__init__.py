"""The pipeline's stages, one module per concern, in the order `dataplane.pipeline.PIPELINE` runs them."""
