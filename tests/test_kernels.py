"""Triton kernels against their PyTorch twins, on CPU through the Triton interpreter.

The interpreter is selected by TRITON_INTERPRET=1, set by tests/conftest.py before any test
file is collected (triton reads it when it is imported).
Casts must be bit-exact; NaN positions are compared by NaN-ness, because PyTorch's own
CPU cast writes 0xFFFF (vectorised) or 0x7FC0 (scalar) while the kernels always write the
canonical quiet NaN 0x7FC0.
"""
import os
import subprocess
import sys

import pytest
import torch

try:
    import triton  # noqa: E402,F401
except ImportError as exc:  # pragma: no cover - depends on the install
    pytest.skip(f"triton is not importable ({exc}); Triton-vs-twin tests need it", allow_module_level=True)

import sap_ds_kernels  # noqa: E402
from sap_ds_kernels.perturb import perturb_from_master_torch, perturb_from_master_triton  # noqa: E402
from sap_ds_kernels.restore import restore_from_master_torch, restore_from_master_triton  # noqa: E402
from sap_ds_kernels.sumsq import sumsq_torch, sumsq_triton  # noqa: E402

# The interpreter computes with numpy, which warns on overflow to inf and on inf - inf:
# those are the values under test here, not problems.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SIZES = [1, 1023, 4096, 1_000_003]
OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_ties(n: int, seed: int) -> torch.Tensor:
    """Random fp32 values over many magnitudes; a quarter of them sit exactly on a bf16
    rounding tie (low 16 bits 0x8000) and others one ulp either side of it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-20, 20, (n,), generator=g).float())
    bits = x.view(torch.int32)
    low = torch.tensor([0x8000, 0x7FFF, 0x8001], dtype=torch.int32)[torch.randint(0, 3, (n,), generator=g)]
    pick = torch.rand(n, generator=g) < 0.5
    bits[pick] = (bits[pick] & ~0xFFFF) | low[pick]
    return x


def assert_same_cast(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-exact outside NaNs; NaN exactly where the reference has NaN."""
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaN positions differ"
    got_bits, want_bits = got.view(BITS[got.dtype]), want.view(BITS[want.dtype])
    diff = (got_bits != want_bits) & ~nan
    assert not diff.any(), f"{int(diff.sum())} elements differ, first at {int(diff.nonzero()[0])}"


def dtype_id(d):
    return str(d).removeprefix("torch.")


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", SIZES)
def test_perturb_triton_matches_twin_bit_exact(n, dtype):
    master, direction = with_ties(n, 1), torch.randn(n, generator=torch.Generator().manual_seed(2))
    scale = torch.tensor(-0.0123)
    got, want = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    perturb_from_master_triton(master, direction, scale, got)
    perturb_from_master_torch(master, direction, scale, want)
    assert_same_cast(got, want)
    assert_same_cast(want, (master + scale * direction).to(dtype))


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", SIZES)
def test_restore_triton_matches_twin_bit_exact(n, dtype):
    master = with_ties(n, 3)
    got, want = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    restore_from_master_triton(master, got)
    restore_from_master_torch(master, want)
    assert_same_cast(got, want)
    assert_same_cast(want, master.to(dtype))


def test_bf16_cast_rounds_half_to_even():
    # (fp32 bits, expected bf16 bits): exact ties go to the even neighbour, either sign,
    # subnormals included; a tie above the largest finite bf16 rounds to inf.
    cases = [
        (0x3F808000, 0x3F80), (0x3F818000, 0x3F82), (0x3F807FFF, 0x3F80), (0x3F808001, 0x3F81),
        (0xBF808000, 0xBF80), (0xBF818000, 0xBF82), (0x00008000, 0x0000), (0x00018000, 0x0002),
        (0x7F7F8000, 0x7F80), (0x7F7F7FFF, 0x7F7F), (0x7F800000, 0x7F80), (0xFF800000, 0xFF80),
    ]
    master = torch.tensor([c[0] for c in cases], dtype=torch.int64).to(torch.int32).view(torch.float32)
    want = torch.tensor([c[1] for c in cases], dtype=torch.int32).to(torch.int16)
    for write in (
        lambda out: restore_from_master_triton(master, out),
        lambda out: restore_from_master_torch(master, out),
        # master + 1 * 0 is exact, so the perturb kernel sees the same ties.
        lambda out: perturb_from_master_triton(master, torch.zeros_like(master), torch.tensor(1.0), out),
    ):
        out = torch.empty(len(cases), dtype=torch.bfloat16)
        write(out)
        assert torch.equal(out.view(torch.int16), want)


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=dtype_id)
def test_zero_scale_or_direction_equals_restore(dtype):
    n = 40_000  # three blocks, the last partial; randn never yields -0.0, where 0 + -0 differs
    master = with_ties(n, 4)
    restored = torch.empty(n, dtype=dtype)
    restore_from_master_triton(master, restored)
    for direction, scale in ((torch.randn(n), torch.tensor(0.0)), (torch.zeros(n), torch.tensor(3.5))):
        for perturb in (perturb_from_master_triton, perturb_from_master_torch):
            out = torch.empty(n, dtype=dtype)
            perturb(master, direction, scale, out)
            assert_same_cast(out, restored)


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=dtype_id)
def test_nonfinite_values_propagate(dtype):
    n = 20_000
    master, direction = torch.randn(n), torch.randn(n)
    inf, nan = float("inf"), float("nan")
    master[[3, 5, 7, n - 1]] = torch.tensor([nan, inf, -inf, inf])
    direction[[11, 13, 7]] = torch.tensor([nan, -inf, inf])  # position 7: -inf + inf = NaN
    master[13] = 1.0
    scale = torch.tensor(0.5)
    expect_nan, expect_inf, expect_ninf = [3, 7, 11], [5, n - 1], [13]
    for perturb in (perturb_from_master_triton, perturb_from_master_torch):
        out = torch.empty(n, dtype=dtype)
        perturb(master, direction, scale, out)
        assert torch.isnan(out).nonzero().flatten().tolist() == expect_nan
        assert (out == inf).nonzero().flatten().tolist() == expect_inf
        assert (out == -inf).nonzero().flatten().tolist() == expect_ninf
    for restore in (restore_from_master_triton, restore_from_master_torch):
        out = torch.empty(n, dtype=dtype)
        restore(master, out)
        assert torch.isnan(out).nonzero().flatten().tolist() == [3]
        assert (out == inf).nonzero().flatten().tolist() == [5, n - 1]
        assert (out == -inf).nonzero().flatten().tolist() == [7]


def test_bf16_nan_is_canonical_quiet_nan():
    # Payloads that would carry into inf or the sign bit with the bare rounding trick.
    master = torch.tensor([0x7FFFFFFF, 0xFFFFFFFF, 0x7F80FFFF, 0x7FC00000], dtype=torch.int64)
    master = master.to(torch.int32).view(torch.float32)
    out = torch.empty(4, dtype=torch.bfloat16)
    restore_from_master_triton(master, out)
    assert out.view(torch.int16).tolist() == [0x7FC0] * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dtype_id)
def test_writes_land_in_the_viewed_storage(dtype):
    # `out` is a view into a bigger engine buffer: writes must land there, and only there.
    n, pad = 20_000, 7
    master, direction = torch.randn(n), torch.randn(n)
    buffer = torch.full((n + 2 * pad,), 42.0, dtype=dtype)
    view = buffer[pad:pad + n]
    perturb_from_master_triton(master, direction, torch.tensor(0.25), view)
    assert_same_cast(buffer[pad:pad + n], (master + 0.25 * direction).to(dtype))
    restore_from_master_triton(master, view)
    assert_same_cast(buffer[pad:pad + n], master.to(dtype))
    assert bool((buffer[:pad] == 42).all()) and bool((buffer[pad + n:] == 42).all())


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", SIZES)
def test_sumsq_matches_fp64_reference_and_twin(n, dtype):
    # fp32 accumulation (block tree sums, then a sum of partials): relative error stays
    # far below 1e-5 up to 1M elements; the inputs are first rounded to `dtype`.
    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(n, generator=g).to(dtype), (3 * torch.randn(n, generator=g)).to(dtype)
    got = sumsq_triton(a, b)
    want64 = torch.stack([a.double().pow(2).sum(), b.double().pow(2).sum()])
    assert got.dtype == torch.float32 and got.shape == (2,)
    torch.testing.assert_close(got.double(), want64, rtol=1e-5, atol=0)
    torch.testing.assert_close(got, sumsq_torch(a, b), rtol=1e-5, atol=0)


def test_sumsq_nonfinite_values_propagate():
    a, b = torch.randn(50_000), torch.randn(50_000)
    a[17], b[40_000] = float("nan"), -float("inf")
    for impl in (sumsq_triton, sumsq_torch):
        got = impl(a, b)
        assert torch.isnan(got[0]) and got[1] == float("inf")


def test_sumsq_mismatched_sizes_names_both_shapes():
    with pytest.raises(ValueError, match=r"a has shape \(10,\).*b has shape \(2, 3\)"):
        sap_ds_kernels.sumsq(torch.zeros(10), torch.zeros(2, 3))


def test_empty_shards_are_fine():
    empty = torch.empty(0)
    assert sap_ds_kernels.sumsq(empty, empty, backend="triton").tolist() == [0.0, 0.0]
    sap_ds_kernels.perturb_from_master(empty, empty, torch.tensor(1.0), empty.bfloat16(), backend="triton")
    sap_ds_kernels.restore_from_master(empty, empty.bfloat16(), backend="triton")


def test_auto_on_cpu_picks_the_twin_and_says_why():
    backend, reason = sap_ds_kernels.choose_backend(torch.zeros(3))
    assert backend == "torch"
    assert "cpu" in reason and "TRITON_INTERPRET=1" in reason
    assert sap_ds_kernels.choose_backend(torch.zeros(3), "torch")[0] == "torch"


def test_forced_triton_runs_the_interpreter_on_cpu():
    backend, reason = sap_ds_kernels.choose_backend(torch.zeros(3), "triton")
    assert backend == "triton" and "interpreter" in reason
    master, direction, scale = torch.randn(5000), torch.randn(5000), torch.tensor(2.0)
    got, want = torch.empty(5000, dtype=torch.bfloat16), torch.empty(5000, dtype=torch.bfloat16)
    sap_ds_kernels.perturb_from_master(master, direction, scale, got, backend="triton")
    sap_ds_kernels.perturb_from_master(master, direction, scale, want)
    assert_same_cast(got, want)
    sap_ds_kernels.restore_from_master(master, got, backend="triton")
    assert_same_cast(got, master.bfloat16())
    torch.testing.assert_close(sap_ds_kernels.sumsq(master, direction, backend="triton"),
                               sap_ds_kernels.sumsq(master, direction))


def test_forced_triton_on_cpu_without_interpreter_explains(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        sap_ds_kernels.choose_backend(torch.zeros(3), "triton")


def test_invalid_backend_lists_valid_values():
    with pytest.raises(ValueError, match="'auto', 'triton', 'torch'.*'cuda'"):
        sap_ds_kernels.restore_from_master(torch.zeros(3), torch.zeros(3), backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_invalid_inputs_are_rejected_with_clear_messages(backend):
    master, out, scale = torch.zeros(8), torch.zeros(8, dtype=torch.bfloat16), torch.tensor(1.0)
    perturb = sap_ds_kernels.perturb_from_master
    with pytest.raises(ValueError, match=r"master and out must have the same number.*\(8,\).*\(7,\)"):
        perturb(master, master, scale, out[:7], backend=backend)
    with pytest.raises(ValueError, match="master has dtype torch.bfloat16; allowed: float32"):
        perturb(master.bfloat16(), master, scale, out, backend=backend)
    with pytest.raises(ValueError, match="out must be contiguous"):
        sap_ds_kernels.restore_from_master(master, torch.zeros(16, dtype=torch.bfloat16)[::2], backend=backend)
    with pytest.raises(ValueError, match="scale must be a 0-dim or 1-element"):
        perturb(master, master, torch.ones(2), out, backend=backend)
    with pytest.raises(ValueError, match="out has dtype torch.int32"):
        sap_ds_kernels.restore_from_master(master, torch.zeros(8, dtype=torch.int32), backend=backend)


def test_import_needs_no_triton():
    # Block triton in a fresh interpreter: the package imports, the twins run, and a
    # forced Triton backend says why it cannot run.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, sap_ds_kernels\n"
        "m = torch.randn(4); o = torch.empty(4, dtype=torch.bfloat16)\n"
        "sap_ds_kernels.restore_from_master(m, o); assert torch.equal(o, m.bfloat16())\n"
        "try:\n    sap_ds_kernels.choose_backend(m, 'triton')\n"
        "except RuntimeError as e:\n    assert 'does not import' in str(e), e\n"
        "else:\n    raise SystemExit('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=60)


# --------------------------------------------------------------------------- realised-perturbation statistics


def _reference_stats(master, direction, scale, dtype):
    """Independent float64 computation of [sum r^2, sum d^2, sum r.d, count(r != 0)]."""
    d = direction * scale  # the same fp32 product the kernels form
    r = ((master + d).to(dtype).double() - master.to(dtype).double())
    d = d.double()
    return torch.stack([r.square().sum(), d.square().sum(), (r * d).sum(), (r != 0).sum().double()])


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", [1, 40_000])  # 40,000: three interpreter blocks, the last one partial
@pytest.mark.parametrize("rel", [2e-5, 1e-2])
def test_perturb_stats_match_fp64_reference_and_twin(n, dtype, rel):
    """The sums taken alongside the store: Triton (interpreted) against the twin against an
    independent fp64 computation; the count of changed elements exactly, the sums to 1e-5;
    and the values written are unchanged by asking for them."""
    g = torch.Generator().manual_seed(n)
    master = 0.02 * torch.randn(n, generator=g)
    direction = torch.randn(n, generator=g)
    scale = torch.tensor(rel * master.norm().item() / direction.norm().item())
    want = _reference_stats(master, direction, scale, dtype)
    plain = torch.empty(n, dtype=dtype)
    perturb_from_master_torch(master, direction, scale, plain)
    for perturb in (perturb_from_master_triton, perturb_from_master_torch):
        out, stats = torch.empty(n, dtype=dtype), torch.zeros(4, dtype=torch.float64)
        perturb(master, direction, scale, out, stats=stats)
        assert_same_cast(out, plain)
        assert stats[3] == want[3]
        torch.testing.assert_close(stats, want, rtol=1e-5, atol=1e-30)
        perturb(master, direction, scale, out, stats=stats)  # adds to what is there
        torch.testing.assert_close(stats, 2 * want, rtol=1e-5, atol=1e-30)
    for backend in ("triton", "torch"):
        dry = sap_ds_kernels.perturbation_stats(master, direction, scale, dtype, backend=backend)
        assert dry[3] == want[3]
        torch.testing.assert_close(dry, want, rtol=1e-5, atol=1e-30)


def test_perturb_stats_see_bf16_rounding():
    """A perturbation far under bf16's half-ulp changes nothing; in fp32 it is held."""
    master = torch.full((1000,), 1.0)
    direction = torch.ones(1000)
    tiny = torch.tensor(1e-4)  # bf16 half-ulp at 1.0 is 2**-8 ~ 3.9e-3
    bf16 = sap_ds_kernels.perturbation_stats(master, direction, tiny, torch.bfloat16, backend="triton")
    fp32 = sap_ds_kernels.perturbation_stats(master, direction, tiny, torch.float32, backend="triton")
    assert bf16[0] == 0 and bf16[3] == 0 and bf16[1] > 0
    assert fp32[3] == 1000 and fp32[0] == pytest.approx(float(bf16[1]), rel=1e-3)


def test_perturb_stats_reject_a_wrong_buffer():
    master = torch.zeros(8)
    with pytest.raises(ValueError, match="stats must be a float64 tensor of 4 elements"):
        sap_ds_kernels.perturb_from_master(master, master, torch.tensor(1.0), torch.zeros(8),
                                           stats=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="stats has dtype torch.float32"):
        sap_ds_kernels.perturb_from_master(master, master, torch.tensor(1.0), torch.zeros(8), stats=torch.zeros(4))
