import pytest
import torch
from diffusers import DDIMScheduler

from diffmorpher.ddim import ddim_invert, ddim_sample, ddim_timesteps, split_prediction


def _scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


def _recording_predictor(log: list):
    """A model whose output depends on the timestep only: DDIM inversion is then exact."""

    def predict(latents, timestep, step_index):
        log.append((int(timestep), step_index))
        generator = torch.Generator().manual_seed(int(timestep))
        return torch.randn(latents.shape, generator=generator, dtype=torch.float64)

    return predict


def test_inversion_walks_the_samplers_timesteps_backwards_and_is_exactly_undone():
    scheduler = _scheduler()
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    inverted_log, sampled_log = [], []
    noise = ddim_invert(scheduler, _recording_predictor(inverted_log), x0, 50)
    back = ddim_sample(scheduler, _recording_predictor(sampled_log), noise, 50)
    assert inverted_log == sampled_log[::-1]  # same (timestep, step index) pairs, reversed
    assert [t for t, _ in sampled_log] == ddim_timesteps(scheduler, 50).tolist()
    assert (back - x0).abs().max() < 1e-9
    assert (noise - x0).abs().mean() > 0.3  # it did move away from the image


def test_prediction_types_agree_on_x0_and_eps():
    sample = torch.randn(2, 4, 4, 4)
    eps = torch.randn(2, 4, 4, 4)
    a_t = 0.3
    x0 = (sample - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    v = a_t**0.5 * eps - (1 - a_t) ** 0.5 * x0
    for output, kind in ((eps, "epsilon"), (v, "v_prediction"), (x0, "sample")):
        got_x0, got_eps = split_prediction(output, sample, a_t, kind)
        assert torch.allclose(got_x0, x0, atol=1e-5) and torch.allclose(got_eps, eps, atol=1e-5)


def test_each_step_goes_to_the_next_timestep_of_the_sequence_for_every_spacing():
    """`trailing` and `linspace` checkpoints space their timesteps differently from `leading`;
    a step must land on the sequence's next timestep, not on t - 1000 // steps."""
    from diffmorpher.ddim import plan_steps

    for spacing in ("leading", "trailing", "linspace"):
        scheduler = DDIMScheduler.from_config(_scheduler().config, timestep_spacing=spacing)
        plan = plan_steps(scheduler, 7)
        assert plan.timesteps == ddim_timesteps(scheduler, 7).tolist()
        for index, t in enumerate(plan.timesteps):
            following = plan.timesteps[index + 1] if index + 1 < len(plan.timesteps) else -1
            assert plan.alphas[index] == float(scheduler.alphas_cumprod[t])
            expected = float(scheduler.alphas_cumprod[following]) if following >= 0 else float(scheduler.final_alpha_cumprod)
            assert plan.previous_alphas[index] == pytest.approx(expected, abs=1e-7), (spacing, t)
    linspace = plan_steps(DDIMScheduler.from_config(_scheduler().config, timestep_spacing="linspace"), 6)
    old_rule = [t - 1000 // 6 for t in linspace.timesteps[:-1]]
    assert old_rule != linspace.timesteps[1:]  # t - 1000 // steps misses the sequence's next timestep


def test_inversion_is_exactly_undone_for_trailing_spacing():
    scheduler = DDIMScheduler.from_config(_scheduler().config, timestep_spacing="trailing")
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = ddim_invert(scheduler, _recording_predictor([]), x0, 10)
    assert (ddim_sample(scheduler, _recording_predictor([]), noise, 10) - x0).abs().max() < 1e-9


def test_a_coarse_walk_keeps_the_first_steps_and_spreads_the_rest_with_the_full_plans_indices():
    """The reschedule's measuring pass: 25 of 50 steps, the first 12 one by one, 13 spread over
    the other 38; the attention store is read at the full plan's indices; each step jumps to
    the next kept timestep and the last one to the final alpha."""
    from diffmorpher.ddim import plan_steps

    full = plan_steps(_scheduler(), 50)
    coarse = full.coarse(25)
    assert coarse.step_indices[:12] == list(range(12))
    assert coarse.step_indices[12:] == [12 + (i * 38) // 13 for i in range(13)]
    assert coarse.timesteps == [full.timesteps[i] for i in coarse.step_indices]
    assert coarse.previous_alphas[:-1] == coarse.alphas[1:]
    assert coarse.previous_alphas[-1] == full.previous_alphas[-1]  # ends at the final alpha
    assert full.coarse(50) is full and full.coarse(80) is full
    assert full.coarse(1).step_indices == [0]
    assert len(plan_steps(_scheduler(), 15).coarse(8).timesteps) == 8
    with pytest.raises(ValueError, match="at least one step"):
        full.coarse(0)


def test_a_coarse_walk_lands_on_the_image_a_perfect_model_predicts():
    """DDIM's update is valid for any jump: with a model that predicts the true noise of a
    known clean latent, a 10-step coarse walk from the 50-step z_T lands exactly where the full walk
    does (next to it: the final alpha is not 1), and the predictor is told the full plan's
    step indices."""
    scheduler = _scheduler()
    alphas = scheduler.alphas_cumprod.double()
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seen: list[int] = []

    def oracle(latents, timestep, step_index):
        seen.append(step_index)
        a_t = alphas[timestep]
        return (latents - a_t.sqrt() * x0) / (1 - a_t).sqrt()

    noise = ddim_invert(scheduler, oracle, x0, 50)
    full = ddim_sample(scheduler, oracle, noise, 50)
    seen.clear()
    coarse = ddim_sample(scheduler, oracle, noise, 50, walk_steps=10)
    assert seen == [0, 1, 2, 3, 4, 5, 14, 23, 32, 41]
    assert (coarse - full).abs().max() < 1e-9
    assert (coarse - x0).abs().max() < 0.05


def test_a_tail_walk_inverts_and_samples_over_the_last_steps_only():
    """Image-to-image (endpoints.py): invert over the plan's last 10 of 25 steps, sample back
    over the same 10: the pair undoes itself and visits the least noisy timesteps only."""
    scheduler = _scheduler()
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inverted_log, sampled_log = [], []
    noisy = ddim_invert(scheduler, _recording_predictor(inverted_log), x0, 25, last_steps=10)
    back = ddim_sample(scheduler, _recording_predictor(sampled_log), noisy, 25, last_steps=10)
    timesteps = ddim_timesteps(scheduler, 25).tolist()
    assert [t for t, _ in sampled_log] == timesteps[15:]
    assert [i for _, i in sampled_log] == list(range(15, 25))
    assert inverted_log == sampled_log[::-1]
    assert (back - x0).abs().max() < 1e-9
    full = ddim_invert(scheduler, _recording_predictor([]), x0, 25)
    # Partly noised: further from the image than nothing, closer than the full inversion.
    assert 0.05 < (noisy - x0).abs().mean() < (full - x0).abs().mean()


def test_a_tail_longer_than_the_walk_is_refused():
    with pytest.raises(ValueError, match="no tail of 26"):
        ddim_sample(_scheduler(), _recording_predictor([]), torch.zeros(1, 4, 2, 2), 25, last_steps=26)
