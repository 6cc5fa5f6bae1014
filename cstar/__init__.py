"""cstar: compact, structured and adversarially robust CNNs."""

__version__ = "0.1.0"
