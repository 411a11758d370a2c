"""florence-kit: fine-tune and evaluate Florence-2 on new tasks."""

__version__ = "0.1.0"
