"""thermosweep model core: pure JAX, no Ray, no Parquet."""
