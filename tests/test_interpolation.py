import pytest
import torch

from diffmorpher.interpolation import adain, channel_stats, interpolate_latents, interpolate_lora, lerp, slerp


def _noise(seed: int, shape=(1, 4, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_slerp_endpoints_are_exact():
    z0, z1 = _noise(0), _noise(1)
    out = slerp(z0, z1, torch.tensor([0.0, 1.0]))
    assert torch.allclose(out[0], z0[0], atol=1e-6)
    assert torch.allclose(out[1], z1[0], atol=1e-6)


def test_slerp_keeps_norm_of_equal_norm_endpoints_where_lerp_shrinks_it():
    z0, z1 = _noise(0), _noise(1)
    z1 = z1 / z1.norm() * z0.norm()
    alphas = torch.linspace(0, 1, 9)
    norms = slerp(z0, z1, alphas).flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, float(z0.norm())), rtol=1e-5)
    lerp_mid = lerp(z0, z1, torch.tensor([0.5]))
    assert lerp_mid.norm() < 0.8 * z0.norm()  # two near-orthogonal noises: ~0.71


def test_slerp_of_unit_vectors_stays_on_the_unit_sphere_and_moves_monotonically():
    z0 = torch.tensor([[1.0, 0.0]])
    z1 = torch.tensor([[0.0, 1.0]])
    out = slerp(z0, z1, torch.tensor([0.25, 0.5]))
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-6)
    assert torch.allclose(out[1], torch.tensor([2**-0.5, 2**-0.5]), atol=1e-6)


def test_slerp_parallel_inputs_fall_back_to_lerp():
    z0 = torch.ones(1, 4)
    out = slerp(z0, 2 * z0, torch.tensor([0.5]))
    assert torch.allclose(out, 1.5 * z0)


def test_adain_gives_target_statistics():
    z = _noise(3) * 3 + 2
    target_mean = torch.tensor([0.5, -1.0, 0.0, 2.0]).view(1, 4, 1, 1)
    target_std = torch.tensor([1.0, 0.5, 2.0, 0.1]).view(1, 4, 1, 1)
    mean, std = channel_stats(adain(z, target_mean, target_std))
    assert torch.allclose(mean, target_mean, atol=1e-5)
    assert torch.allclose(std, target_std, atol=1e-4)


def test_interpolated_latents_reproduce_endpoints_and_lerp_statistics():
    z0, z1 = _noise(0) + 1.0, _noise(1) * 0.5
    out = interpolate_latents(z0, z1, torch.tensor([0.0, 0.5, 1.0]), use_adain=True)
    assert torch.allclose(out[0], z0[0], atol=1e-5)
    assert torch.allclose(out[2], z1[0], atol=1e-5)
    mean, std = channel_stats(out[1:2])
    mean0, std0 = channel_stats(z0)
    mean1, std1 = channel_stats(z1)
    assert torch.allclose(mean, (mean0 + mean1) / 2, atol=1e-5)
    assert torch.allclose(std, (std0 + std1) / 2, atol=1e-5)


def test_interpolate_lora_endpoints_and_midpoint():
    lora0 = {"a.lora_A.weight": torch.zeros(2, 3), "a.lora_B.weight": torch.ones(3, 2)}
    lora1 = {"a.lora_A.weight": torch.ones(2, 3), "a.lora_B.weight": torch.zeros(3, 2)}
    assert all(torch.equal(interpolate_lora(lora0, lora1, 0.0)[k], lora0[k]) for k in lora0)
    assert all(torch.equal(interpolate_lora(lora0, lora1, 1.0)[k], lora1[k]) for k in lora0)
    assert torch.allclose(interpolate_lora(lora0, lora1, 0.25)["a.lora_A.weight"], torch.full((2, 3), 0.25))
    with pytest.raises(ValueError):
        interpolate_lora(lora0, {"b.lora_A.weight": torch.zeros(2, 3)}, 0.5)


def _reference_slerp(z0: torch.Tensor, z1: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """The textbook formula (arccos of the normalised dot product) in float64."""
    v0, v1 = z0.reshape(1, -1).double(), z1.reshape(1, -1).double()
    theta = torch.arccos(((v0 * v1).sum() / (v0.norm() * v1.norm())).clamp(-1, 1))
    a = alphas.double().reshape(-1, 1)
    return ((torch.sin((1 - a) * theta) * v0 + torch.sin(a * theta) * v1) / torch.sin(theta)).reshape(-1, *z0.shape[1:])


@pytest.mark.parametrize("precision", [torch.float64, torch.float32], ids=["float64", "float32-mps"])
def test_slerp_in_either_precision_matches_the_float64_reference(precision: torch.dtype):
    """Float64 where the device has it; float32 (Apple MPS) must stay within a few float32
    roundings of the float64 reference: SD-sized noise (4x64x64) at about 90 degrees, and two
    latents 0.06 degrees apart. Measured: float64 2.6e-8 (the float32 output's rounding),
    float32 6.5e-8 and 1.2e-7 relative error."""
    alphas = torch.linspace(0, 1, 7)
    z0 = _noise(0, (1, 4, 64, 64))
    for z1 in (_noise(1, (1, 4, 64, 64)), z0 + 1e-3 * _noise(2, (1, 4, 64, 64))):
        reference = _reference_slerp(z0, z1, alphas)
        out = slerp(z0, z1, alphas, precision).double()
        error = (out - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)
        assert float(error.max()) < (5e-8 if precision == torch.float64 else 3e-7)
        assert torch.equal(out[0], z0[0].double()) and torch.equal(out[-1], z1[0].double())


def test_slerp_takes_one_endpoint_pair_per_sample():
    """Frames of different segments in one batch: row b interpolates its own pair."""
    z = _noise(0, (3, 4, 8, 8))
    alphas = torch.tensor([0.3, 0.8])
    together = slerp(z[:2], z[1:], alphas)
    assert torch.allclose(together[0], slerp(z[0:1], z[1:2], alphas[:1])[0], atol=1e-7)
    assert torch.allclose(together[1], slerp(z[1:2], z[2:3], alphas[1:])[0], atol=1e-7)
