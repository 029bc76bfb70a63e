"""Fit an artifact's gates on real data and report them (``python -m model_training fit-gates``).

Split by concern: ``photos`` (non-skin photos), ``augment`` (varied lesion copies),
``features`` (the artifact's serve outputs, cached), ``collect`` (which images),
``quality_fit`` (the photo-quality gate), ``skin_fit`` (the skin gate and the artefact notes),
``loso`` (leave-one-source-out), ``report`` (figures and summary) and ``cli``. The server
needs none of these: it reads the fitted parameters with ``model_training.skin`` and
``model_training.quality`` (NumPy and Pillow only).
"""
