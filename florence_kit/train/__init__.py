"""Stage 5, train: the recipe (setup -> train -> save) and what a run leaves behind.

``recipe`` is the loop a reader can follow whole; ``config`` (options, config.yaml), ``checkpoints``
(resumable state), ``runfolder``, ``progress``, ``trackers``, ``feature_cache`` and ``card`` serve it.
"""
