"""Files: the one reader and writer of models (:mod:`.serialize`, :mod:`.architecture`), weights
trained elsewhere (:mod:`.weights`), export (:mod:`.export`) and run directories (:mod:`.run_dirs`).
"""
