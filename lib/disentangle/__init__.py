"""disentangle: do disentanglement constraints on attention heads make a Transformer more interpretable,
and what do they cost on reasoning tasks?

Modules: ``config`` (run configs), ``data``/``tasks``/``babi`` (reasoning data), ``model`` (the encoder),
``constraints`` (the four head losses), ``train`` (cached runs and grids), ``analysis`` and ``plots``
(interpretability metrics and figures), ``report`` (papermill + nbconvert pipeline).
"""

__version__ = "0.1.0"
