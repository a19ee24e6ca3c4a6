"""cast-lightning: Conflict-Aware Sparse Tuning (CAST) for LLM safety alignment with PyTorch Lightning."""

__version__ = "0.1.0"
