"""Dataset builders (tensorflow-datasets, array_record format: readable without tensorflow).

Import the builder module (`srum_jax.data.t2i_compbench`) to register it with tfds; this package
itself imports nothing heavy.
"""
