"""A local web app to personalize and sample without the command line: ``python -m app``.

Three pages over the project's own entry points, nothing re-implemented:

- **Train** starts ``main.py --config-name <recipe>`` with Hydra overrides in a background process
  (the recipes listed in ``app/methods.yaml`` whose ``configs/<recipe>.yaml`` exists), follows its
  progress file (``progress.py``), shows the logged sample grids and cancels it gracefully.
- **Sample** loads the base (the toy-world model, or SD v1 weights when given), applies zero or
  more deltas (one directly, several merged in closed form by ``custom.compose``), samples with
  ``ldm.generate`` and optionally the Attend-and-Excite step hook, and exports deltas with
  ``custom.formats``.
- **Compare** runs ``evaluate.py`` on one or several runs and shows its HTML report.

``server.py`` is a standard-library HTTP server (no web framework: see the README for why);
``static/`` holds the one page of plain HTML/JS/CSS.
"""
