"""The contract module is the one home of the contract's constants, codes and option checks: the
CUDA header spells them again (read here from csrc/gsp_math.h), the Triton kernels take them as
constexprs, and ``gsp_pool`` and the ``GSP`` layer refuse the same options with the same message."""

import re
from pathlib import Path

import pytest
import torch

from gsp_kernels import GSP, contract, gsp_pool

HEADER = Path(__file__).resolve().parent.parent / "csrc" / "gsp_math.h"


def header_constants() -> dict[str, float]:
    """``constexpr float kName = value;`` of the header, by name."""
    text = HEADER.read_text()
    return {name: float(value) for name, value in re.findall(r"constexpr float (\w+) = ([0-9.eE+-]+)f;", text)}


def header_enum(name: str) -> dict[str, int]:
    """The members of ``enum name : int { kA = 0, ... }`` in the header."""
    body = re.search(rf"enum {name} : int \{{([^}}]*)\}}", HEADER.read_text()).group(1)
    return {member: int(value) for member, value in re.findall(r"(\w+) = (\d+)", body)}


def test_cuda_header_constants_are_the_contract():
    constants = header_constants()
    assert constants == {"kCostSnap": contract.COST_SNAP, "kL2Eps": contract.L2_EPS}


def test_cuda_header_codes_are_the_contract():
    assert header_enum("Normalize") == {
        "kLipschitz": contract.NORMALIZE_CODES["lipschitz"],
        "kL2": contract.NORMALIZE_CODES["l2"],
        "kNone": contract.NORMALIZE_CODES["none"],
    }
    assert header_enum("Cost") == {
        "kEuclidean": contract.COST_CODES["euclidean"],
        "kSqEuclidean": contract.COST_CODES["sqeuclidean"],
    }
    assert set(contract.NORMALIZE_CODES) == set(contract.NORMALIZE_MODES)
    assert set(contract.COST_CODES) == set(contract.COST_MODES)


def test_triton_constexprs_are_the_contract():
    jit_math = pytest.importorskip("gsp_kernels.backends.triton.jit_math")
    assert jit_math.L2_EPS_CONST.value == contract.L2_EPS
    assert (jit_math.LIPSCHITZ.value, jit_math.L2.value, jit_math.NO_NORMALIZE.value) == (
        contract.NORMALIZE_CODES["lipschitz"], contract.NORMALIZE_CODES["l2"], contract.NORMALIZE_CODES["none"])


@pytest.mark.parametrize(
    "options, error",
    [
        ({"gamma": float("inf")}, ValueError),
        ({"gamma": 0.0}, ValueError),
        ({"transport_ratio": True}, TypeError),
        ({"transport_ratio": 1.5}, ValueError),
        ({"transport_ratio": "0.3"}, TypeError),
        ({"normalize": "max"}, ValueError),
        ({"cost": "cosine"}, ValueError),
        ({"solver": "sinkhorn"}, ValueError),
        ({"max_iter": 0}, ValueError),
        ({"max_iter": True}, ValueError),
    ],
)
def test_layer_and_op_refuse_an_option_alike(options, error):
    """The layer refuses at construction what the op refuses at the call, with its message."""
    x, prototypes = torch.randn(2, 5, 4), torch.randn(3, 4)
    with pytest.raises(error) as from_op:
        gsp_pool(x, prototypes, **options)
    with pytest.raises(error) as from_layer:
        GSP(4, 4, num_prototypes=3, **options)
    assert str(from_layer.value) == str(from_op.value)


def test_layer_refuses_an_unknown_backend_at_construction():
    with pytest.raises(ValueError, match="backend must be one of"):
        GSP(4, 4, backend="fastest")


def test_options_for_call_defaults_the_tolerance_by_dtype():
    options = contract.check_options(0.3, 5.0)
    assert options.max_iter == contract.default_max_iter("newton") and options.tol is None
    assert contract.options_for_call(options, 10, torch.float32).tol == contract.default_tol(torch.float32)
    assert contract.options_for_call(options, 10, torch.float64).tol == contract.default_tol(torch.float64)
    given = contract.check_options(0.3, 5.0, tol=1e-3)
    assert contract.options_for_call(given, 10, torch.float32).tol == 1e-3
    with pytest.raises(ValueError, match="overflows"):
        contract.options_for_call(contract.check_options(0.3, 1e39), 10, torch.float32)
    with pytest.raises(ValueError, match="too small"):
        contract.options_for_call(contract.check_options(1e-39, 5.0), 10, torch.float32)
