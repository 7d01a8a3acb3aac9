"""torch.library.opcheck of the custom ops with backend="triton" (schema, fake kernels, autograd
registration and the backend's outputs agree)."""
import torch



def test_opcheck_triton_backend():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 5, generator=g).requires_grad_()
    y = torch.randn(17, 5, generator=g).requires_grad_()
    s = torch.tensor(2.0, requires_grad=True)
    b = torch.tensor(-0.5, requires_grad=True)
    lse = (x, y, s, 0.0, b, 0.0, "diagonal", 1, None, None, True, True, "triton", 0, True, 0)
    torch.library.opcheck(torch.ops.mmloss.similarity_lse.default, lse)
    sig = (x, y, s, 0.0, b, 0.0, "diagonal", 0, None, None, "triton", 0, True)
    torch.library.opcheck(torch.ops.mmloss.pairwise_sigmoid.default, sig)
    torch.library.opcheck(torch.ops.mmloss.pairwise_sigmoid_sum.default, sig + (True, True, True, True))
