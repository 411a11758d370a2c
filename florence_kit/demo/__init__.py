"""The offline demo: a tiny model trained on documents it renders itself (``synthetic_docvqa``), by the
``recipe`` that ``florence-kit demo`` runs end to end on a CPU.
"""
