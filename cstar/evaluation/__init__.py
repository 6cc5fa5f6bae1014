"""Evaluation: clean and robust accuracy (:mod:`.evaluate`, its batches :mod:`.batches`) and
counting parameters and MACs (:mod:`.counting`).
"""
