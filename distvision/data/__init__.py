"""Data: sources -> prepared cache -> shards -> augmented batches."""
