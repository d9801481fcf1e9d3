"""disentangle: do disentanglement constraints on attention heads make a Transformer more interpretable,
and what do they cost on reasoning tasks?

Core (flat): ``config`` (run configs), ``arms`` (the study's arms, declared once), ``model`` (the encoder),
``constraints`` (the head losses), ``objective`` (the weighted sum a run trains with), ``train`` (cached
runs and grids), ``study`` (the experiments), ``analysis`` (interpretability measures), ``stats``.
Packages: ``data`` (procedural tasks, bAbI reader), ``verdicts`` (claims to verdict rows), ``report``
(papermill + nbconvert pipeline, recorded results, figures).
"""

__version__ = "0.1.0"
