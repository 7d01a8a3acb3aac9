"""No host→device copy inside the ops (issue 11): a 0-d CPU ``scale`` / ``bias`` (e.g. a
``logit_scale`` parameter kept on the CPU) with features on an accelerator reaches the kernels
as a host-read value — not as a ``.to(device)`` copy, which a CUDA graph cannot capture — and
still receives its gradient on the CPU, in its dtype.

No GPU here: ``meta`` features stand for the accelerator (anything that is not the CPU), and a
``TorchDispatchMode`` records every copy torch is asked to make."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmloss import ops
from mmloss.ops import _args
from mmloss.ops._spec import PairSpec
from mmloss.ops.triton import _launch
from mmloss.ops.triton._modes import BiasMode, ScaleMode

COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten.to.device,
          torch.ops.aten.to.dtype_layout, torch.ops.aten._copy_from.default}


def _devices(args, kwargs):
    found = {a.device for a in args if isinstance(a, torch.Tensor)}
    if isinstance(kwargs.get("device"), (torch.device, str)):
        found.add(torch.device(kwargs["device"]))
    return found


class CrossDeviceCopies(TorchDispatchMode):
    """Records every copy op whose source and destination devices differ."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in COPIES:
            devices = _devices(args, kwargs)
            if isinstance(out, torch.Tensor):
                devices.add(out.device)
            if len(devices) > 1:
                self.copies.append((func, devices))
        return out


def test_the_recorder_sees_a_host_to_device_copy():
    # the check the tests below rely on: a plain .to(device) is recorded
    with CrossDeviceCopies() as mode:
        torch.tensor(2.0).to("meta")
    assert mode.copies


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_split_scalar_reads_a_cpu_scalar_on_the_host(dtype):
    x = torch.empty(5, 3, device="meta")
    scale = torch.tensor(7.25, dtype=dtype, requires_grad=True)
    with CrossDeviceCopies() as mode:
        t, value = _args.split_scalar(scale, x)
    assert mode.copies == []
    assert t.device == x.device and t.dtype == dtype and t.dim() == 0 and value == 0.0
    assert t.requires_grad and t.grad_fn is not None  # the gradient still reaches `scale`


def test_scale_and_bias_on_the_features_device_are_untouched():
    x = torch.randn(5, 3)
    s, b = torch.tensor(3.0, requires_grad=True), torch.tensor(-1.0)
    scale_t, scale_v, bias_t, bias_v = _args.scale_and_bias(x, s, b)
    assert scale_t is s and bias_t is b and (scale_v, bias_v) == (0.0, 0.0)
    assert _args.scale_and_bias(x, 2.5, None) == (None, 2.5, None, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_the_gradient_returns_to_the_cpu_scalar(dtype):
    # the host-read scalar's gradient reaches the CPU tensor with the value, dtype and device the
    # direct use gives (features on the CPU here: the routing is what is under test)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    s_direct = torch.tensor(3.5, dtype=dtype, requires_grad=True)
    s_host = torch.tensor(3.5, dtype=dtype, requires_grad=True)

    def loss(scale):
        row, col = ops.similarity_lse(x, y, scale, backend="torch")
        return row.sum() + 0.5 * col.sum()

    loss(s_direct).backward()
    routed = _args._HostScalar.apply(s_host, torch.device("cpu"))
    assert routed is not s_host and routed.dtype == dtype
    loss(routed).backward()
    assert s_host.grad.device.type == "cpu" and s_host.grad.dtype == dtype and s_host.grad.dim() == 0
    assert torch.equal(s_host.grad, s_direct.grad)


def test_the_backward_of_the_host_scalar_lands_on_its_device():
    ctx = type("Ctx", (), {})()
    ctx.source = torch.device("cpu")
    grad, none = _args._HostScalar.backward(ctx, torch.tensor(2.0, dtype=torch.float64))
    assert none is None and grad.device.type == "cpu" and grad.item() == 2.0


def _meta_spec(scale, bias):
    x = torch.empty(40, 16, device="meta")
    y = torch.empty(30, 16, device="meta")
    return PairSpec(x, y, scale, 0.0, bias, 0.0, "diagonal", 0, None, None)


def test_triton_pair_reads_a_cpu_scalar_as_the_float_argument():
    # an op called directly with a CPU 0-d scale / bias (no split_scalar in front): the launch
    # takes the host-read value as the float argument instead of copying the tensor over
    spec = _meta_spec(torch.tensor(12.5), torch.tensor(-3.0, dtype=torch.float64))
    with CrossDeviceCopies() as mode:
        pair = _launch.make_pair(spec, True)
        swapped = _launch.make_pair(spec, False)
    assert mode.copies == []
    for p in (pair, swapped):
        assert p.scale_mode == ScaleMode.FLOAT and p.scale_value == 12.5
        assert p.bias_mode == BiasMode.FLOAT and p.bias_value == -3.0
        assert p.scale.device.type == "meta" and p.bias.device.type == "meta"


def test_triton_pair_keeps_device_tensors_as_tensors():
    spec = _meta_spec(torch.empty((), device="meta"), torch.empty((), device="meta"))
    pair = _launch.make_pair(spec, True)
    assert pair.scale_mode == ScaleMode.TENSOR and pair.bias_mode == BiasMode.TENSOR
    # a per-row scale is never a host value
    rows = _meta_spec(torch.empty(40, device="meta"), None)
    assert _launch.make_pair(rows, True).scale_mode == ScaleMode.PER_A_ROW
    assert _launch.host_value(torch.tensor(1.0), torch.device("cpu")) is None
    assert _launch.host_value(torch.ones(3), torch.device("meta")) is None
