"""Training recipe of the built-in small model: procedural data, tokenizer, VAE, DiT + text encoder.

`kinema train` runs every step in order (see `run.run_recipe`); each step can also run alone.
"""
