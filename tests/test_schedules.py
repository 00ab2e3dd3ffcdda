"""make_schedule + add_noise + cfg_step against diffusers' own schedulers, step by step.

For each scheduler / prediction type / timestep spacing, a batch of samples at different strengths (and
text-only) with mixed guidance runs through the fused kernels in one loop, and each sample separately
through a fresh diffusers scheduler the way StableDiffusionImg2ImgPipeline drives it (set_timesteps,
get_timesteps + set_begin_index, add_noise, scale_model_input, CFG combine, step). Model outputs are
random, so the check is on the arithmetic, not on a model.
"""

import diffusers
import pytest
import torch

from fusionloader.engine.schedules import Schedule, fused_kind, get_scheduler, guidance_free, make_schedule
from fusionloader.kernels import add_noise, cfg_step

# Stable Diffusion 1.x scheduler settings (scaled-linear betas, steps_offset 1, no clipping).
SD_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
)
STRENGTHS = (0.25, 0.5, 0.75, 1.0, None)  # None = text-only
GUIDANCE = (7.5, 1.0, 3.0, 1.0, 7.5)  # 1.0 rows have no unconditional prediction
SHAPE = (4, 13, 7)
RTOL = 1e-5  # max |ours - diffusers| / max |diffusers|, fp32


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _diffusers_run(proto, steps, strength, eta, x0, z, cond, uncond, g, noise):
    """One sample through a fresh diffusers scheduler, as the pipelines drive it."""
    sched = type(proto).from_config(proto.config)
    step_noise = {}
    if isinstance(sched, (diffusers.LCMScheduler, diffusers.EulerAncestralDiscreteScheduler)):
        # These draw their step noise inside step() with randn_tensor: hand them this step's noise.
        module = __import__(type(sched).__module__, fromlist=["randn_tensor"])
        mp = pytest.MonkeyPatch()
        mp.setattr(module, "randn_tensor", lambda shape, **kw: step_noise["z"].reshape(shape).to(kw.get("dtype")))
    else:
        mp = None
    sched.set_timesteps(steps)
    if strength is None:  # StableDiffusionPipeline: all steps, latents = z * init_noise_sigma
        timesteps = sched.timesteps
        x = z * sched.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        timesteps = sched.timesteps[t_start * sched.order :]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        x = sched.add_noise(x0, z, timesteps[:1])
    scaled = []
    for j, t in enumerate(timesteps):
        model_in = sched.scale_model_input(x, t)
        scaled.append((model_in, x))
        m = uncond[j] + g * (cond[j] - uncond[j]) if g > 1 else cond[j]
        kwargs = {"eta": eta, "variance_noise": noise[j]} if isinstance(sched, diffusers.DDIMScheduler) else {}
        step_noise["z"] = noise[j]
        x = sched.step(m, t, x, **kwargs).prev_sample
    if mp is not None:
        mp.undo()
    return timesteps, scaled, x


def _run_sequence(proto, steps, eta):
    batch = len(STRENGTHS)
    gen = torch.Generator().manual_seed(1234)
    x0 = torch.randn(batch, 1, *SHAPE, generator=gen)
    z = torch.randn(batch, 1, *SHAPE, generator=gen)
    cond = torch.randn(batch, steps, 1, *SHAPE, generator=gen)
    uncond = torch.randn(batch, steps, 1, *SHAPE, generator=gen)
    noise = torch.randn(batch, steps, 1, *SHAPE, generator=gen)
    schedules = [make_schedule(proto, steps, s, eta=eta) for s in STRENGTHS]

    # (a) diffusers, one sample at a time.
    expected = []
    for b, s in enumerate(STRENGTHS):
        ts, scaled, x = _diffusers_run(proto, steps, s, eta, x0[b], z[b], cond[b], uncond[b], GUIDANCE[b], noise[b])
        assert torch.equal(schedules[b].timesteps, ts), (s, schedules[b].timesteps, ts)
        for j, (model_in, x_j) in enumerate(scaled):
            assert _rel(schedules[b].c_in[j] * x_j, model_in) <= 1e-6
        expected.append(x[0])

    stochastic = any(sc.stochastic for sc in schedules)
    # (b) the fused path: the whole batch in one loop, every sample at its own step (continuous batching:
    # a sample with fewer steps simply stops; state is updated in place through out= / x0_out=).
    x = add_noise(
        x0[:, 0],
        [sc.start[0] for sc in schedules],
        [sc.start[1] for sc in schedules],
        noise=z[:, 0],
    )
    prev = torch.zeros_like(x)
    for it in range(max(sc.num_steps for sc in schedules)):
        active = [b for b, sc in enumerate(schedules) if it < sc.num_steps]
        guided = [b for b in active if GUIDANCE[b] > 1]
        model_out = torch.cat([cond[active, it, 0], uncond[guided, it, 0]])
        uncond_index = [len(active) + guided.index(b) if b in guided else -1 for b in active]
        coefs = torch.stack([schedules[b].coefs[it] for b in active])
        x_sub, prev_sub = x[active].contiguous(), prev[active].contiguous()
        cfg_step(
            model_out, x_sub, torch.tensor([GUIDANCE[b] for b in active]), torch.tensor(uncond_index), coefs,
            prev_x0=prev_sub, noise=noise[active, it, 0] if stochastic else None, out=x_sub, x0_out=prev_sub,
        )  # fmt: skip
        x[active], prev[active] = x_sub, prev_sub
    for b, s in enumerate(STRENGTHS):
        assert _rel(x[b], expected[b]) <= RTOL, (s, _rel(x[b], expected[b]))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(
    "name,eta,steps",
    [
        ("ddim", 0.0, 20),
        ("ddim", 0.5, 20),
        ("euler", 0.0, 20),
        ("dpmpp_2m", 0.0, 10),  # < 15 steps: lower_order_final applies
        ("dpmpp_2m", 0.0, 50),  # the pipelines' default; fp32 error grows with steps here most
    ],
)
def test_matches_diffusers(name, eta, steps, prediction, spacing):
    proto = get_scheduler(name, {**SD_CONFIG, "prediction_type": prediction, "timestep_spacing": spacing})
    assert fused_kind(proto) == name
    _run_sequence(proto, steps, eta)


@pytest.mark.parametrize("steps", [4, 8])  # 4: strengths 0.25..1 run 1..4 steps
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["lcm", "turbo"])
def test_few_step_schedulers_match_diffusers(name, prediction, steps):
    # LCMScheduler.step (boundary condition, re-noise to the next timestep but not after the last) and SD-Turbo's
    # Euler ancestral (trailing) step, through the unchanged fused kernel, at every strength and text-only.
    proto = get_scheduler(name, {**SD_CONFIG, "prediction_type": prediction})
    assert fused_kind(proto) == ("lcm" if name == "lcm" else "euler_a")
    _run_sequence(proto, steps, 0.0)


def test_few_step_schedule_fields():
    lcm = get_scheduler("lcm", SD_CONFIG)
    four = make_schedule(lcm, 4, None)
    assert four.stochastic and four.coefs[-1, 6] == 0 and (four.coefs[:-1, 6] > 0).all()  # no noise after the last
    assert four.coefs[-1, 4] == 1 and not make_schedule(lcm, 1, None).stochastic  # one step: x_next = denoised
    turbo = get_scheduler("turbo", SD_CONFIG)
    assert turbo.config.timestep_spacing == "trailing" and guidance_free(turbo) and not guidance_free(lcm)
    one = make_schedule(turbo, 1, None)
    assert one.stochastic and one.timesteps.tolist() == [999] and one.coefs[0, 2] == 0  # straight to x0
    # The marker survives a save/load round trip (the handoff of a Synthesizer built from a pipeline).
    again = diffusers.EulerAncestralDiscreteScheduler.from_config(turbo.config)
    assert guidance_free(again) and fused_kind(again) == "euler_a"
    assert not guidance_free(get_scheduler("ddim", turbo.config))  # other names drop it


@pytest.mark.parametrize(
    "name,extra",
    [
        ("euler", {"final_sigmas_type": "sigma_min"}),
        ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}),
        ("dpmpp_2m", {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
        ("dpmpp_2m", {"euler_at_final": True}),
        ("ddim", {"set_alpha_to_one": True, "prediction_type": "sample"}),
        ("euler", {"prediction_type": "sample"}),
        ("dpmpp_2m", {"prediction_type": "sample"}),
    ],
)
def test_matches_diffusers_config_variants(name, extra):
    proto = get_scheduler(name, {**SD_CONFIG, **extra})
    assert fused_kind(proto) == name
    _run_sequence(proto, 12, 0.3 if name == "ddim" else 0.0)


def test_schedule_fields():
    proto = get_scheduler("ddim", SD_CONFIG)
    sc = make_schedule(proto, 50, 0.5, eta=0.5)
    assert isinstance(sc, Schedule) and sc.kind == "ddim" and sc.stochastic and sc.begin_index == 25
    assert sc.timesteps.shape == (25,) and sc.c_in.shape == (25,) and sc.coefs.shape == (25, 7)
    assert sc.coefs.dtype == torch.float32 and sc.c_in.dtype == torch.float32
    assert not make_schedule(proto, 50, 0.5).stochastic
    text = make_schedule(get_scheduler("euler", SD_CONFIG), 30, None)
    assert text.start == (0.0, text.init_noise_sigma) and text.num_steps == 30 and text.init_noise_sigma > 1
    # The scheduler handed in is left untouched.
    assert proto.num_inference_steps is None


def test_make_schedule_rejects_bad_input():
    proto = get_scheduler("ddim", SD_CONFIG)
    for strength in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="strength"):
            make_schedule(proto, 10, strength)
    with pytest.raises(ValueError, match="no denoising step"):
        make_schedule(proto, 10, 0.05)
    zero_snr = {**SD_CONFIG, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    with pytest.raises(ValueError, match="v_prediction"):
        make_schedule(get_scheduler("ddim", zero_snr), 10, 1.0)
    make_schedule(get_scheduler("ddim", {**zero_snr, "prediction_type": "v_prediction"}), 10, 1.0)


def test_make_schedule_unfused_scheduler_gets_timesteps_only():
    heun = diffusers.HeunDiscreteScheduler.from_config(SD_CONFIG)  # order 2: timesteps are doubled
    sc = make_schedule(heun, 10, 0.5)
    assert sc.kind is None and sc.coefs is None and sc.c_in is None and sc.start is None
    ref = diffusers.HeunDiscreteScheduler.from_config(SD_CONFIG)
    ref.set_timesteps(10)
    assert sc.begin_index == 5 * heun.order
    assert torch.equal(sc.timesteps, ref.timesteps[5 * heun.order :])


def test_fused_kind_only_for_exact_configs():
    assert fused_kind(get_scheduler("ddim", {**SD_CONFIG, "clip_sample": True})) is None
    assert fused_kind(get_scheduler("ddim", {**SD_CONFIG, "thresholding": True})) is None
    assert fused_kind(get_scheduler("euler", {**SD_CONFIG, "use_karras_sigmas": True})) is None
    assert fused_kind(get_scheduler("euler", {**SD_CONFIG, "interpolation_type": "log_linear"})) is None
    dpm = diffusers.DPMSolverMultistepScheduler
    assert fused_kind(dpm.from_config(SD_CONFIG, algorithm_type="sde-dpmsolver++")) is None
    assert fused_kind(dpm.from_config(SD_CONFIG, solver_order=3)) is None
    assert fused_kind(dpm.from_config(SD_CONFIG, solver_type="heun")) is None
    assert fused_kind(dpm.from_config(SD_CONFIG, use_karras_sigmas=True)) is None
    assert fused_kind(diffusers.PNDMScheduler.from_config(SD_CONFIG)) is None
    assert fused_kind(diffusers.EulerAncestralDiscreteScheduler.from_config(SD_CONFIG)) is None


def test_get_scheduler():
    pndm = diffusers.PNDMScheduler.from_config(SD_CONFIG)  # what SD checkpoints ship
    dpm = get_scheduler("dpmpp_2m", pndm)
    assert isinstance(dpm, diffusers.DPMSolverMultistepScheduler)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    assert dpm.config.beta_schedule == "scaled_linear" and dpm.config.steps_offset == 1
    assert isinstance(get_scheduler("DDIM", SD_CONFIG), diffusers.DDIMScheduler)
    assert isinstance(get_scheduler("euler", SD_CONFIG), diffusers.EulerDiscreteScheduler)
    assert get_scheduler(pndm, SD_CONFIG) is pndm
    assert isinstance(get_scheduler(diffusers.LMSDiscreteScheduler, SD_CONFIG), diffusers.LMSDiscreteScheduler)
    with pytest.raises(ValueError, match="ddim, dpmpp_2m, euler"):
        get_scheduler("heun2", SD_CONFIG)
