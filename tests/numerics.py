"""Derived float tolerances for comparisons of results computed by two code paths.

Two evaluations of the same float32 quantity by different code (fused vs explicit attention, a loop
over heads vs one batched matmul, a padded vs an unpadded batch, another CPU's vector kernels) differ
only in the order of their roundings. A sum of n terms computed in any order is within
γ_n·Σ|x_i| ≈ n·u·Σ|x_i| of the exact sum (u = eps/2, the unit roundoff; Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., §4.2), so two orders differ by at most n·eps·Σ|x_i|.
A chain of reductions adds its lengths. The tolerances below are that worst-case bound, not a
number tuned until one machine passes: they hold on any CPU, and are still orders of magnitude
below what a real bug (a wrong mask, a missing scale) changes.

Where bit-identity is the claim (same seed, resume, cache, a run repeated in the same process
settings), tests compare exactly instead.
"""

import torch

EPS32 = torch.finfo(torch.float32).eps  # 2**-23 ≈ 1.19e-7
EPS64 = torch.finfo(torch.float64).eps


def tol(n: int, magnitude: float = 1.0, eps: float = EPS32) -> float:
    """Largest |a − b| between two evaluations of a value whose accumulations have n terms in all
    (the lengths of a chain of reductions, added) and Σ|terms| ≤ magnitude: n·eps·magnitude."""
    if n < 1:
        raise ValueError(f"n={n} must be at least 1")
    return n * eps * float(magnitude)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, n: int, magnitude: float | None = None) -> None:
    """``torch.testing.assert_close`` with the absolute bound :func:`tol` and no relative part: errors
    of a sum scale with the size of its terms, not of its result (cancellation). ``magnitude``
    defaults to max |expected|, the scale of the terms for the normalised activations compared here."""
    if magnitude is None:
        magnitude = max(expected.detach().abs().max().item(), 1.0)
    eps = EPS64 if expected.dtype == torch.float64 else EPS32
    torch.testing.assert_close(actual, expected, atol=tol(n, magnitude, eps), rtol=0)
