"""Language-model support: tokenised batches, model loading, packing, tracing."""
