"""selora: Self-Expanding Low-Rank Adaptation (Mao et al. 2024, arXiv 2408.07196)."""
from selora.profile import device, profile, seed_everything, set_threads, setup

__version__ = "0.1.0"

__all__ = ["device", "profile", "seed_everything", "set_threads", "setup", "__version__"]
