"""``python -m model_training.gates`` (same as ``python -m model_training fit-gates``)."""

from model_training.gates.cli import main

raise SystemExit(main())
