"""Reusable Flax NNX layers. Importing this package never imports TensorFlow or gin."""
