"""How many steps ``solver="unrolled"`` needs: the fewest with which its float32 results meet the
float32 tolerance of docs/math.md, Accuracy, against the float64 reference, over the accepted μ and
γ (docs/math.md, The scalar solve, records the result).

    python bench/unrolled_steps.py [--max-steps 64] [--seeds 4]

Cases: every normalize/cost pair; N from 1 to 1031; Gaussian features, and 10%, 50% or all of
them near a prototype; μ from float32's smallest normal to 1 − 1e-12; γ up to the largest that
``contract.check_options`` accepts in float32 for the mode (without normalization, for the data's
largest cost). For each, the float32 reference runs the unrolled solve with 1, 2, ... steps and
its pooled, attr, weights and both gradients are compared with the float64 reference (converged
Newton) on the same rounded inputs. A case *meets* the tolerance at the first count where every
error is within the γ-scaled tolerance, or within the converged float32 Newton's own error where
that is larger (float32 cannot do better there); it has *converged* at the first count from there
on where every output is also within the unscaled float32 tolerance (1e-5) of the converged
float32 Newton. Prints the slowest cases and the counts that suffice for all:
``contract.UNROLLED_STEPS`` is the converged one.
"""

from __future__ import annotations

import argparse
import math

import torch

from gsp_kernels import contract
from gsp_kernels.backends.reference import gsp_backward, gsp_forward
from gsp_kernels.testing import random_inputs, rel_err, tolerance

MODES = (("lipschitz", "euclidean"), ("lipschitz", "sqeuclidean"), ("l2", "euclidean"), ("l2", "sqeuclidean"),
         ("none", "euclidean"), ("none", "sqeuclidean"))
SIZES = (1, 2, 7, 49, 196, 1031)  # N; M = 11, D = 13
LAYOUTS = {"gaussian": 0.0, "sparse": 0.1, "mixed": 0.5, "clustered": 1.0}  # share of features near a prototype
MUS = (1.2e-38, 1e-30, 1e-10, 1e-3, 0.05, 0.3, 0.7, 0.9, 0.99, 0.999, 1 - 1e-6, 1 - 1e-9, 1 - 1e-12)
GAMMAS = (0.01, 1.0, 5.0, 20.0, 100.0, 1e3, 1e4, 1e5)


def largest_gamma(normalize: str, cost: str, c_max: float) -> float:
    """The largest γ check_options accepts in float32 (the logits' resolution bound)."""
    return contract.LOGIT_RESOLUTION / (torch.finfo(torch.float32).eps * c_max) * (1 - 1e-6)


def outputs(x, z, mu, gamma, normalize, cost, cotangents, solver, steps=None):
    """pooled, attr, weights, grad_x, grad_prototypes of the reference math in x's dtype."""
    pooled, attr, weights, u = gsp_forward(x, z, mu, gamma, normalize, cost, solver, steps)
    grads = gsp_backward(*[c.to(x.dtype) for c in cotangents], x, z, u, mu, gamma, normalize, cost)
    return (pooled, attr, weights, *grads)


def largest_error(outs, refs) -> float:
    return max(rel_err(out, ref, zero_ref="absolute") for out, ref in zip(outs, refs))


def steps_needed(x64, z64, mu, gamma, normalize, cost, max_steps, cotangents) -> tuple[float, float, float]:
    """The first step count that meets the tolerance against the float64 reference, the first that
    also matches the converged float32 Newton within the unscaled float32 tolerance (inf where none
    up to max_steps does), and the tolerance used."""
    x32, z32 = x64.float(), z64.float()
    reference = outputs(x32.double(), z32.double(), mu, gamma, normalize, cost, cotangents, "newton")
    newton32 = outputs(x32, z32, mu, gamma, normalize, cost, cotangents, "newton")
    bound = max(tolerance("float32", "auto", gamma), largest_error(newton32, reference))
    meets = math.inf
    for steps in range(1, max_steps + 1):
        unrolled = outputs(x32, z32, mu, gamma, normalize, cost, cotangents, "unrolled", steps)
        if meets == math.inf and largest_error(unrolled, reference) <= bound:
            meets = steps
        if meets <= steps and largest_error(unrolled, newton32) <= tolerance("float32", "auto", 0.0):
            return meets, steps, bound
    return meets, math.inf, bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=4, help="samples per case (one batch)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    worst: list[tuple[float, float, str]] = []
    for normalize, cost in MODES:
        for n in SIZES:
            for layout, near in LAYOUTS.items():
                x64, z64 = random_inputs(args.seeds, n, 11, 13, seed=n, near_fraction=near)
                c_max = contract.largest_cost(normalize, cost) or torch.cdist(
                    x64.reshape(-1, 13), z64).max().item() ** (1 if cost == "euclidean" else 2)
                generator = torch.Generator().manual_seed(n)
                cotangents = [torch.randn(shape, generator=generator, dtype=torch.float64)
                              for shape in ((args.seeds, 13), (args.seeds, 11), (args.seeds, n))]
                for gamma in (*GAMMAS, largest_gamma(normalize, cost, c_max)):
                    if gamma > largest_gamma(normalize, cost, c_max):
                        continue
                    for mu in MUS:
                        meets, converged, bound = steps_needed(x64, z64, mu, gamma, normalize, cost, args.max_steps, cotangents)
                        label = f"{normalize}/{cost} N={n} {layout} gamma={gamma:.4g} mu={mu:.12g} (tolerance {bound:.2g})"
                        worst.append((converged, meets, label))
    worst.sort(reverse=True)
    print("converged  meets  case")
    for converged, meets, label in worst[:20]:
        print(f"{converged:>9}  {meets:>5}  {label}")
    print(f"cases: {len(worst)}; steps that meet the tolerance in all: {max(meets for _, meets, _ in worst)}; "
          f"that also match the converged float32 Newton within {tolerance('float32', 'auto', 0.0):g}: {worst[0][0]}")


if __name__ == "__main__":
    main()
