"""Claims turned into verdict rows (computed from runs, never typed in): the accuracy-cost, sparsity and
where-it-hurts findings (``findings``), capacity recovery (``capacity``) and the real bAbI benchmark
(``babi``). Every row comes from the rules in :mod:`disentangle.stats`."""
