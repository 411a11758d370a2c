"""The offline demo: a tiny model trained on documents it renders itself (``synthetic_docvqa``), and the
synthetic data of the other task families, in their public schemas, for tests and examples.
"""
