"""Language-model support: tokenised batches, model loading, and the built-in demo world."""
