"""sa_bench: benchmark sparse-attention methods for LLMs as resumable Hydra sweeps.

Importing the package is deliberately light (no torch, no transformers): the sweeper that
decides which cells are already finished runs in the parent process on every resume.
"""

__version__ = "0.1.0"
