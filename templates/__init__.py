"""Templates installed as the package `grail_pipeline.templates` (see pyproject), read with importlib.resources."""
