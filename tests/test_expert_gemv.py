"""The decode-shaped expert kernels (vl2lab.model.expert_gemv) against the dense expert computation, and the
fallback where they cannot run.

The kernels run where Triton does: a CUDA device, or Triton's CPU interpreter (``TRITON_INTERPRET=1`` set before
Python starts, Triton installed). CI installs no Triton: there the kernel tests skip and the fallback tests run."""
import pytest
import torch

from vl2lab.model import expert_gemv
from vl2lab.model.config import get_config
from vl2lab.model.moe import IMPLS, MLP, Experts, MoE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = expert_gemv.available(torch.empty(0, device=DEVICE))
needs_kernels = pytest.mark.skipif(not KERNELS, reason="no Triton here (CUDA, or TRITON_INTERPRET=1 with Triton)")


def experts(E, H, I, start=0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ex = Experts(E, H, I)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ex.expert_start = start
    return ex.to(DEVICE, dtype)


def routed(N, k, H, n_ids, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g).to(DEVICE, dtype)
    idx = torch.randint(0, n_ids, (N, k), generator=g).to(DEVICE)
    return x, idx, torch.rand(N, k, generator=g).to(DEVICE)


@torch.no_grad()
def both(ex, x, idx, w):
    ex.impl = "dense"
    ref = ex(x, idx, w)
    ex.impl = "gemv"
    return ex(x, idx, w), ref


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@needs_kernels
@pytest.mark.parametrize("E,H,I,N,k", [(8, 72, 40, 1, 3), (8, 70, 33, 3, 2), (6, 300, 260, 2, 6),
                                            (4, 512, 24, 2, 2)],
                         ids=["decode", "uneven-blocks", "several-k-blocks", "even-k-blocks"])
def test_kernels_equal_the_dense_experts_fp32(E, H, I, N, k):
    """Row counts that are no multiple of BLOCK_N, widths past one BLOCK_K, and a width of whole BLOCK_Ks (the
    gate/up loop without a column mask): the fp32 sums differ in order only."""
    ex = experts(E, H, I)
    got, ref = both(ex, *routed(N, k, H, E))
    assert got.shape == ref.shape == (N, H) and got.dtype == ref.dtype
    assert rel(got, ref) < 1e-6, rel(got, ref)


@needs_kernels
def test_experts_held_elsewhere_give_zero():
    """Expert parallelism: this module holds experts [2, 8) of 10; pairs routed to 0, 1, 8, 9 contribute nothing
    (and read nothing), as in the dense computation."""
    ex = experts(6, 64, 48, start=2)
    x, idx, w = routed(4, 3, 64, 10)
    got, ref = both(ex, x, idx, w)
    assert rel(got, ref) < 1e-6, rel(got, ref)
    none_here = torch.tensor([[0, 1, 9]], device=DEVICE)
    with torch.no_grad():
        assert torch.count_nonzero(ex(x[:1], none_here, w[:1])) == 0


@needs_kernels
@pytest.mark.parametrize("I,Is", [(33, 50), (40, 24)], ids=["shared-wider", "shared-narrower"])
@torch.no_grad()
def test_the_shared_experts_ride_in_the_same_launches(I, Is):
    """with_shared = the routed sum + the shared MLP, whichever of the two is wider (the h rows are as wide as the
    wider; each program reads only its own width)."""
    ex = experts(8, 72, I)
    shared = MLP(72, Is).to(DEVICE)
    for p in shared.parameters():
        p.normal_(0, 0.1)
    x, idx, w = routed(3, 2, 72, 8)
    ex.impl = "dense"
    ref = ex(x, idx, w) + shared(x)
    ex.impl = "gemv"
    got = ex.with_shared(x, idx, w, shared)
    assert got is not None and rel(got, ref) < 1e-6, rel(got, ref)
    ex.impl = "grouped"
    assert ex.with_shared(x, idx, w, shared) is None                   # only impl="gemv" fuses


@needs_kernels
@torch.no_grad()
def test_a_moe_layer_decodes_the_same_with_the_kernels():
    """A whole MoE layer of random-tiny (router, routed and shared experts) at one decode token: gemv = dense."""
    cfg = get_config("random-tiny").language_config
    moe = MoE(cfg).to(DEVICE)
    for p in moe.parameters():
        p.normal_(0, 0.1)
    x = torch.randn(2, 1, cfg.hidden_size, device=DEVICE)
    moe.experts.impl = "dense"
    ref = moe(x)
    moe.experts.impl = "gemv"
    assert rel(moe(x), ref) < 1e-6


@needs_kernels
@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 at the real sizes: a GPU's work")
def test_kernels_in_bf16_at_deepseek_vl2_small_sizes():
    """64 experts of I = 1408 over H = 2048, one token and its 6 experts: within bf16 rounding of the dense path
    (the kernels keep the gate and up sums in fp32 and round h once)."""
    ex = experts(64, 2048, 1408, dtype=torch.bfloat16)
    x, idx, w = routed(1, 6, 2048, 64, dtype=torch.bfloat16)
    got, ref = both(ex, x, idx, w)
    assert rel(got, ref) < 1e-2, rel(got, ref)


@torch.no_grad()
def test_large_forwards_and_kernel_less_devices_use_the_grouped_matmul():
    """Past MAX_PAIRS (a prefill) — and everywhere without Triton — ``gemv`` computes what ``grouped`` does."""
    cfg = get_config("random-tiny").language_config
    moe = MoE(cfg).to(DEVICE)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(1, expert_gemv.MAX_PAIRS // cfg.num_experts_per_tok + 1, cfg.hidden_size, device=DEVICE)
    moe.experts.impl = "grouped"
    ref = moe(x)
    moe.experts.impl = "gemv"
    assert torch.equal(moe(x), ref)
    if not KERNELS:                                   # no Triton: a decode-sized forward falls back too
        one = moe(x[:, :1])
        moe.experts.impl = "grouped"
        assert torch.equal(one, moe(x[:, :1]))


def test_an_unknown_impl_is_one_clear_error():
    ex = experts(4, 16, 8)
    ex.impl = "triton"
    with pytest.raises(ValueError, match="'grouped', 'dense', 'loop', 'gemv', got 'triton'"):
        ex(*routed(1, 2, 16, 4))
    assert "gemv" in IMPLS
