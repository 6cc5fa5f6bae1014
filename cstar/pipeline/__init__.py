"""The compression pipeline: phases, ADMM, ``compress`` and its report, the compared methods
(:mod:`.compressors`) and ``compare``.
"""
