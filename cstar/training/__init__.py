"""Adversarial training: :func:`cstar.training.fit.fit` with its config, epoch loop, losses and
resumable state.
"""
