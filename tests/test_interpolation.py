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
