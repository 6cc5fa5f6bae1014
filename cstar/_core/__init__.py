"""Plumbing every layer uses: errors, checks, atomic files, logging, signals, precision, memory
format, renamed settings, the machine's description, the documentation-example budget.
"""
