"""Watch Hugging Face Trainer checkpoints: rank, record, prune and announce them."""

__version__ = "0.1.0"
