"""The report: the papermill runner (``run``; ``python -m disentangle.report``), the recorded results
(``results``: :class:`Recorder`, used by every notebook), the figures (``plots``) and the page templates.

``from disentangle.report import Recorder`` keeps working for notebooks written before the split.
"""

from .results import Recorder, read_results, results_dir

__all__ = ["Recorder", "read_results", "results_dir"]
