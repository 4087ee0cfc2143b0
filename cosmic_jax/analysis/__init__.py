"""Analyses answering the paper's questions: variance decomposition, cell type, response, generation.

See notes/analysis.md; the command is `cosmic analyze` (cli.py -> pipeline.py).
"""
