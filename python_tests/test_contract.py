"""The contract module is the one home of the contract's constants, codes and option checks: the
CUDA header spells them again (read here from csrc/gsp_math.h), the Triton kernels take them as
constexprs, and ``gsp_pool`` and the ``GSP`` layer refuse the same options with the same message."""

import re
from pathlib import Path

import numpy as np
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


def test_triton_kernels_spell_no_constant_of_their_own():
    """The Triton kernels compare NORMALIZE with the contract's codes (constexprs built from
    contract.py) and take L2_EPS from it: no bare code or epsilon in their sources."""
    sources = (Path(__file__).resolve().parent.parent / "gsp_kernels" / "backends" / "triton").glob("*.py")
    for path in sources:
        text = path.read_text()
        assert not re.search(r"NORMALIZE == \d", text), path
        assert "1e-12" not in text, path
    jit_math = pytest.importorskip("gsp_kernels.backends.triton.jit_math")
    assert jit_math.L2_EPS_CONST.value == contract.L2_EPS


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
        ({"backend": 3}, TypeError),
        ({"backend": "fastest"}, ValueError),
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


def test_numpy_scalars_are_real_numbers_alike():
    """np.float32 and np.float64 options give what the Python floats give, in the op and the layer."""
    x, prototypes = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    expected = gsp_pool(x, prototypes, transport_ratio=0.25, gamma=2.5)
    for kind in (np.float32, np.float64):
        got = gsp_pool(x, prototypes, transport_ratio=kind(0.25), gamma=kind(2.5))
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
        layer = GSP(4, 4, num_prototypes=3, transport_ratio=kind(0.25), gamma=kind(2.5))
        assert (layer.transport_ratio, layer.gamma) == (0.25, 2.5)
    with pytest.raises(TypeError, match="real number"):
        gsp_pool(x, prototypes, gamma=np.bool_(True))


def test_options_for_a_call_default_the_tolerance_by_dtype():
    options = contract.check_options(0.3, 5.0)
    assert options.max_iter == contract.default_max_iter("newton") and options.tol is None
    assert contract.check_options(*options, n=10, dtype=torch.float32).tol == contract.default_tol(torch.float32)
    assert contract.check_options(*options, n=10, dtype=torch.float64).tol == contract.default_tol(torch.float64)
    assert contract.check_options(0.3, 5.0, tol=1e-3, n=10, dtype=torch.float32).tol == 1e-3
    with pytest.raises(ValueError, match="overflows"):
        contract.check_options(0.3, 1e39, n=10, dtype=torch.float32)
    with pytest.raises(ValueError, match="too small"):
        contract.check_options(1e-39, 5.0, n=10, dtype=torch.float32)


def test_the_dtype_limits_are_checked_before_tol_and_precision():
    """The order of the checks: what the call's dtype cannot represent comes first."""
    x, prototypes = torch.randn(2, 5, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="overflows"):
        gsp_pool(x, prototypes, gamma=1e39, tol=-1.0)
    with pytest.raises(ValueError, match="too small"):
        gsp_pool(x, prototypes, transport_ratio=1e-40, precision="x")


def test_backward_options_keep_the_fields_of_the_function():
    options = contract.check_options(0.4, 7.0, "l2", "sqeuclidean", "fixed_point", 30, 1e-4, "tf32", n=3,
                                     dtype=torch.float32)
    assert contract.backward_options(options) == contract.GSPOptions(0.4, 7.0, "l2", "sqeuclidean", precision="tf32")
