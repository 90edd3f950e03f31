"""The engine's CPU matmuls through oneDNN with packed weights: same products as F.linear, and the
model stays an ordinary model (autograd, dtype changes, in-place updates, copies, pickles)."""

import copy
import pickle

import pytest
import torch
from torch import nn

from vocabtrim.engine import make_engine
from vocabtrim.engine.cpu_gemm import PackedLinear, linear_fn, pack_linears, packable, unpack_linears
from vocabtrim.engine.sampling import SamplingParams

from tiny import make_model

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


@pytest.fixture(autouse=True)
def _packing_on(monkeypatch):
    """The switch left at its default (on), whatever the environment says."""
    monkeypatch.delenv("VOCABTRIM_PACKED_GEMM", raising=False)


def test_float32_cpu_weights_are_packable():
    assert packable(torch.zeros(2, 2)) and not packable(torch.zeros(2, 2, 2))


@pytest.mark.parametrize("shape", [(5, 64), (8, 64), (2, 5, 64), (40, 64)])
def test_packed_products_equal_f_linear(shape):
    torch.manual_seed(0)
    w, b, x = torch.randn(96, 64), torch.randn(96), torch.randn(*shape)
    lin = linear_fn(w, b)
    assert isinstance(lin, PackedLinear)
    with torch.inference_mode():
        got = lin(x)
    assert lin.packed is not None  # the packed path ran
    torch.testing.assert_close(got, nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_float64_and_the_switch_use_f_linear(monkeypatch):
    assert not packable(torch.zeros(4, 4, dtype=torch.float64))
    monkeypatch.setenv("VOCABTRIM_PACKED_GEMM", "0")
    assert not packable(torch.zeros(4, 4))
    assert pack_linears(nn.Linear(4, 4)) == 0


def test_a_routed_module_follows_its_weights_and_stays_trainable():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    ref = copy.deepcopy(m)
    assert pack_linears(m) == 2 and pack_linears(m) == 0  # a second call routes nothing again
    x = torch.randn(8, 16)  # rows enough for the packed path (fewer go to F.linear: plain_is_faster)
    with torch.inference_mode():
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    assert all(m[i].forward.linear.packed is not None for i in (0, 2))  # the packed weights served it
    with torch.no_grad():  # an in-place update is packed again
        m[0].weight.mul_(2)
        ref[0].weight.mul_(2)
    with torch.inference_mode():
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    m[2].weight = nn.Parameter(torch.randn(8, 32))  # a replaced parameter is used
    ref[2].weight = nn.Parameter(m[2].weight.detach().clone())
    with torch.inference_mode():
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    copied = copy.deepcopy(m).double()  # copies work, and a dtype change is followed
    with torch.inference_mode():
        torch.testing.assert_close(copied(x.double()), copy.deepcopy(ref).double()(x.double()))
    with torch.inference_mode():
        torch.testing.assert_close(pickle.loads(pickle.dumps(m))(x), ref(x), rtol=1e-5, atol=1e-5)
    m(x).sum().backward()  # with autograd on, F.linear: gradients flow
    ref(x).sum().backward()
    for i in (0, 2):
        torch.testing.assert_close(m[i].weight.grad, ref[i].weight.grad, rtol=1e-5, atol=1e-5)
    unpack_linears(m)
    assert "forward" not in m[0].__dict__


def test_the_engine_runs_its_float32_models_through_the_packed_weights():
    target = make_model(300)
    engine = make_engine(target, sampling=SamplingParams(temperature=0), batch_size=5, max_new_tokens=4)
    engine.generate([[1, 5, 7], [1, 9], [2, 3], [4], [6, 8]], [0, 1, 2, 3, 4])
    routed = [m.__dict__["forward"] for m in target.model.modules() if "forward" in m.__dict__]
    assert routed and all(f.linear.packed is not None for f in routed)
    assert engine.target.head._linear.packed is not None


def test_one_row_runs_f_linear_on_small_weights_and_packed_on_large_ones():
    torch.manual_seed(0)
    small, large = linear_fn(torch.randn(96, 64), None), linear_fn(torch.randn(1 << 15, 128), None)
    with torch.inference_mode():
        x = torch.randn(1, 1, 64)
        assert torch.equal(small(x), nn.functional.linear(x, small.weight))
        assert small.packed is None  # nothing packed for a batch-1 step's small layers
        y = torch.randn(1, 128)
        torch.testing.assert_close(large(y), nn.functional.linear(y, large.weight), rtol=1e-5, atol=1e-4)
        assert large.packed is not None


def test_two_rows_run_f_linear_below_the_head_and_four_rows_only_on_small_weights():
    """A batch-1 verify of one draft (two rows) runs like a decode step; at four rows only the small
    (attention-sized) weights stay on F.linear."""
    torch.manual_seed(0)
    small, mlp = linear_fn(torch.randn(96, 64), None), linear_fn(torch.randn(1536, 576), None)
    with torch.inference_mode():
        for rows in (2, 4):
            x = torch.randn(1, rows, 64)
            assert torch.equal(small(x), nn.functional.linear(x, small.weight)) and small.packed is None
        y2, y4 = torch.randn(2, 576), torch.randn(4, 576)
        assert torch.equal(mlp(y2), nn.functional.linear(y2, mlp.weight)) and mlp.packed is None
        torch.testing.assert_close(mlp(y4), nn.functional.linear(y4, mlp.weight), rtol=1e-5, atol=1e-4)
        assert mlp.packed is not None
