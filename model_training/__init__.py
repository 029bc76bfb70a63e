"""Training, evaluation and export of the skin-lesion triage model."""

__version__ = "1.0.0"
