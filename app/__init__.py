"""Skin-lesion triage web service: a thin FastAPI layer over the exported model artifact."""

__version__ = "1.0.0"
