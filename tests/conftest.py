"""Shared test settings.

The tests use tiny models, for which torch's thread pool costs more than it
gives; one thread also keeps timings stable when other jobs share the cores.
Real-data tests read ``CSTAR_TEST_DATA`` and ``CSTAR_TEST_CIFAR10`` (README, Tests).
"""

import torch

torch.set_num_threads(1)
