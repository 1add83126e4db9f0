"""Evaluation of trained runs, comparable across methods (``python evaluate.py``).

- :mod:`evaluation.runs`: find runs (a run folder, a sweep), read their config, rebuild the model
  (base + the run's delta or weights).
- :mod:`evaluation.prompts`: prompt files, the toy world's prompt families, CustomConcept101.
- :mod:`evaluation.pipeline`: prompts x seeds -> images with fixed names (resumable) -> scores ->
  ``metrics.json``.
- :mod:`evaluation.scorers`: the scorer interface, the reference formulas, the toy judge;
  :mod:`evaluation.clip` (CLIP text/image alignment), :mod:`evaluation.dino` (DINO image
  alignment).
- :mod:`evaluation.report` (``report.html``), :mod:`evaluation.compare` (tables and plots over
  runs).
"""
