"""Stage 1, tasks: a task is data. ``spec`` reads task files into frozen TaskSpecs, ``regions`` checks
their ``regions:`` block, ``registry`` finds them (the top-level tasks/ folder, user folders, entry points).
"""
