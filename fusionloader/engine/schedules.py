"""Diffusers schedulers -> the per-step coefficient rows the fused kernels consume.

``make_schedule`` reads every table from the scheduler object itself after ``set_timesteps``
(``alphas_cumprod``, ``final_alpha_cumprod``, ``sigmas``, ``timesteps``, ``init_noise_sigma``; the config's
``timestep_spacing``, ``steps_offset``, ``prediction_type``, ...) and never re-derives a schedule, so what
the engine runs is what ``StableDiffusionImg2ImgPipeline`` runs. For step i of a sample:

    x0     = c0*x + c1*m
    x_next = c2*x + c3*m + c4*x0 + c5*prev_x0 + c6*z        (kernels/cfg_step.py)

with m the guided model output. Coefficients are computed in float64 from the scheduler's (float32) tables
and cast to float32. ``fused_kind`` says whether a scheduler's configuration is one these rows reproduce
exactly (DDIM, Euler, DPM++ 2M, LCM, and Euler ancestral when built as ``"turbo"``); anything else goes
through the engine's unfused path (``scheduler.step``).

Img2img (SDEdit) start: ``StableDiffusionImg2ImgPipeline.get_timesteps`` keeps the last
``min(int(n * strength), n)`` of the n timesteps and calls ``set_begin_index``; the start latent is
``start[0] * x0 + start[1] * z`` (``scheduler.add_noise`` at the first kept timestep). Text-only
(``strength=None``) runs all n steps from ``z * init_noise_sigma`` as ``StableDiffusionPipeline`` does.
The one exception is LCM built as ``"lcm_span"`` (``LCM_SPAN_KEY``): ``LatentConsistencyModelImg2ImgPipeline``'s
rule, ``LCMScheduler.set_timesteps(n, strength=strength)`` -- all n steps, spread over the strength's share of
the distillation schedule, so 1-2 step students run at any strength.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math

import torch

__all__ = [
    "FUSED_KINDS",
    "LCM_SPAN_KEY",
    "SCHEDULER_NAMES",
    "Schedule",
    "TURBO_KEY",
    "fused_kind",
    "get_scheduler",
    "guidance_free",
    "lcm_span",
    "make_schedule",
    "training_scheduler",
]

FUSED_KINDS = ("ddim", "dpmpp_2m", "euler", "euler_a", "lcm")
SCHEDULER_NAMES = ("ddim", "dpmpp_2m", "euler", "euler_a", "lcm", "lcm_span", "turbo")
# "turbo" is SD-Turbo's scheduler: Euler ancestral with trailing timesteps, marked with this config key (kept
# through save_pretrained / from_config round trips). The marked scheduler runs fused and without CFG; an
# unmarked Euler ancestral scheduler keeps the unfused path it always had (bit-identical).
TURBO_KEY = "fusionloader_turbo"
# "lcm_span" is LCMScheduler with img2img strength applied the way LatentConsistencyModelImg2ImgPipeline applies
# it (all n steps inside the strength's span) instead of StableDiffusionImg2ImgPipeline's (the last int(n *
# strength) of n, what "lcm" does, as for LCM-LoRA in the SD img2img pipeline). Marked like TURBO_KEY.
LCM_SPAN_KEY = "fusionloader_lcm_span"
_MARKERS = (TURBO_KEY, LCM_SPAN_KEY)
_PREDICTIONS = ("epsilon", "sample", "v_prediction")


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """One (scheduler, steps, strength, eta) setting, ready for ``add_noise`` + ``cfg_step``."""

    kind: str | None  # one of FUSED_KINDS; None: no fused step (fields marked * are None)
    timesteps: torch.Tensor  # (n,) the timesteps the pipeline feeds the UNet, in the scheduler's dtype
    c_in: torch.Tensor | None  # * (n,) float32: UNet input = c_in[i] * x (scale_model_input)
    coefs: torch.Tensor | None  # * (n, 7) float32: cfg_step rows, step by step
    start: tuple[float, float] | None  # * (coef_x, coef_noise) for add_noise: the start latent
    init_noise_sigma: float  # scheduler.init_noise_sigma (text-only start: z * init_noise_sigma)
    stochastic: bool | None  # * some step adds fresh noise (DDIM eta > 0, Euler ancestral, LCM; column 6)
    begin_index: int  # index of timesteps[0] in the scheduler's full list (pipeline's set_begin_index)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def _diffusers():
    import diffusers  # deferred: importing diffusers is slow, and the kernels never need it

    return diffusers


def get_scheduler(name_or_obj, config=None):
    """A diffusers scheduler from a name (one of ``SCHEDULER_NAMES``), a class, or an instance.

    Names and classes are built ``from_config(config)`` (``config``: a scheduler config dict, or a scheduler
    whose config is used, typically the checkpoint's own). ``"dpmpp_2m"`` is DPMSolverMultistepScheduler
    with ``algorithm_type="dpmsolver++"``, ``solver_order=2`` (midpoint), i.e. "DPM++ 2M". ``"euler_a"`` is
    EulerAncestralDiscreteScheduler; ``"lcm"`` LCMScheduler (for LCM-distilled UNets and LCM-LoRA; img2img as
    ``StableDiffusionImg2ImgPipeline`` runs it), ``"lcm_span"`` the same with ``LatentConsistencyModelImg2ImgPipeline``'s
    strength rule (see ``LCM_SPAN_KEY``);
    ``"turbo"`` EulerAncestralDiscreteScheduler with ``timestep_spacing="trailing"`` (SD-Turbo's own
    scheduler config; a Synthesizer loaded with it runs every request without CFG). Instances are returned
    unchanged.
    """
    d = _diffusers()
    if isinstance(name_or_obj, d.SchedulerMixin):
        return name_or_obj
    if config is not None and hasattr(config, "config"):
        config = config.config
    if isinstance(name_or_obj, type) and issubclass(name_or_obj, d.SchedulerMixin):
        if config is None:
            return name_or_obj()
        return name_or_obj.from_config(config)
    if not isinstance(name_or_obj, str) or name_or_obj.lower() not in SCHEDULER_NAMES:
        raise ValueError(
            f"unknown scheduler {name_or_obj!r}: use one of {', '.join(SCHEDULER_NAMES)}, "
            "or pass a diffusers scheduler class or instance"
        )
    name = name_or_obj.lower()
    config = _without_marker(config)
    if name == "ddim":
        return d.DDIMScheduler.from_config(config)
    if name == "euler":
        return d.EulerDiscreteScheduler.from_config(config)
    if name == "euler_a":
        return d.EulerAncestralDiscreteScheduler.from_config(config)
    if name == "turbo":
        turbo = d.EulerAncestralDiscreteScheduler.from_config(_without_marker(config), timestep_spacing="trailing")
        turbo.register_to_config(**{TURBO_KEY: True})
        return turbo
    if name in ("lcm", "lcm_span"):
        lcm = d.LCMScheduler.from_config(config)
        if name == "lcm_span":
            lcm.register_to_config(**{LCM_SPAN_KEY: True})
        return lcm
    return d.DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint"
    )


def guidance_free(scheduler) -> bool:
    """True for a scheduler built as ``"turbo"``: the sampler runs its requests without CFG (SD-Turbo is
    distilled for guidance 0; diffusers' docs have ``guidance_scale=0.0``), whatever their guidance_scale."""
    return bool(scheduler.config.get(TURBO_KEY, False))


def _without_marker(config):
    if config is None:
        return {}
    return {k: v for k, v in dict(config).items() if k not in _MARKERS}


def training_scheduler(scheduler):
    """A ``DDPMScheduler`` with ``scheduler``'s training noise schedule, fusionloader's marker keys left out (they
    would only draw diffusers' unknown-key warning): what training code noises latents with."""
    return _diffusers().DDPMScheduler.from_config(_without_marker(scheduler.config))


def lcm_span(scheduler) -> bool:
    """True for an LCMScheduler built as ``"lcm_span"`` (img2img strength as the LCM img2img pipeline applies it)."""
    return bool(scheduler.config.get(LCM_SPAN_KEY, False))


def fused_kind(scheduler) -> str | None:
    """The ``FUSED_KINDS`` entry whose rows reproduce ``scheduler.step`` exactly, else None."""
    d = _diffusers()
    cfg = scheduler.config
    if cfg.get("prediction_type", "epsilon") not in _PREDICTIONS:
        return None
    # Exact class matches: a subclass may override step().
    if type(scheduler) is d.DDIMScheduler:
        ok = not cfg.get("clip_sample", True) and not cfg.get("thresholding", False)
        return "ddim" if ok else None
    if type(scheduler) is d.EulerDiscreteScheduler:
        # s_churn is a step() argument the pipelines never pass, so the step is the deterministic Euler one.
        ok = (
            cfg.get("interpolation_type", "linear") == "linear"
            and not cfg.get("use_karras_sigmas", False)
            and not cfg.get("use_exponential_sigmas", False)
            and not cfg.get("use_beta_sigmas", False)
        )
        return "euler" if ok else None
    if type(scheduler) is d.EulerAncestralDiscreteScheduler:
        # Fused only as "turbo" (see TURBO_KEY). "sample" prediction raises NotImplementedError in diffusers.
        return "euler_a" if guidance_free(scheduler) and cfg.get("prediction_type", "epsilon") != "sample" else None
    if type(scheduler) is d.LCMScheduler:
        ok = not cfg.get("clip_sample", False) and not cfg.get("thresholding", False)
        return "lcm" if ok else None
    if type(scheduler) is d.DPMSolverMultistepScheduler:
        ok = (
            cfg.get("algorithm_type") == "dpmsolver++"
            and cfg.get("solver_order") == 2
            and cfg.get("solver_type", "midpoint") == "midpoint"
            and not cfg.get("use_karras_sigmas", False)
            and not cfg.get("use_lu_lambdas", False)
            and not cfg.get("use_exponential_sigmas", False)
            and not cfg.get("use_beta_sigmas", False)
            and not cfg.get("use_flow_sigmas", False)
            and not cfg.get("thresholding", False)
            and cfg.get("variance_type") is None
        )
        return "dpmpp_2m" if ok else None
    return None


def _begin_index(n: int, strength: float | None, order: int) -> int:
    # StableDiffusionImg2ImgPipeline.get_timesteps, verbatim arithmetic.
    if strength is None:
        return 0
    init_timestep = min(int(n * strength), n)
    t_start = max(n - init_timestep, 0)
    return t_start * order


def _x0_rows(pred: str, a: float, s: float) -> tuple[float, float]:
    # (c0, c1) of x0 = c0*x + c1*m for a sample x = a*x0 + s*eps (DDIM: a = sqrt(abar); DPM: alpha_t, sigma_t).
    if pred == "epsilon":
        return 1.0 / a, -s / a
    if pred == "v_prediction":
        return a, -s
    return 0.0, 1.0  # "sample": the model predicts x0


def _ddim_rows(sched, timesteps, eta: float, pred: str) -> list[list[float]]:
    # DDIMScheduler.step (Song et al. 2020, eq. 12 and 16). prev_timestep is t - T // n whatever the
    # timestep_spacing: diffusers' rule, kept as is.
    ac = sched.alphas_cumprod.double()
    final = float(sched.final_alpha_cumprod)
    stride = sched.config.num_train_timesteps // sched.num_inference_steps
    rows = []
    for t in timesteps.tolist():
        t = int(t)
        prev = t - stride
        a = float(ac[t])
        a_prev = float(ac[prev]) if prev >= 0 else final
        if a == 0.0 and pred == "epsilon":
            # Zero terminal SNR (rescale_betas_zero_snr) at t = T: x0 = (x - eps)/0, NaN in diffusers too.
            raise ValueError(f"epsilon prediction is undefined at timestep {t} (alphas_cumprod = 0); use v_prediction")
        b = 1.0 - a
        variance = (1.0 - a_prev) / b * (1.0 - a / a_prev)
        std = eta * math.sqrt(variance)
        direction = math.sqrt(max(1.0 - a_prev - std * std, 0.0))
        sa, sb = math.sqrt(a), math.sqrt(b)
        c0, c1 = _x0_rows(pred, sa, sb)
        # x_next = sqrt(a_prev) * x0 + direction * eps + std * z, with eps written in x, m and x0.
        if pred == "epsilon":  # eps = m
            c2, c3, c4 = 0.0, direction, math.sqrt(a_prev)
        elif pred == "v_prediction":  # eps = sqrt(a) m + sqrt(b) x
            c2, c3, c4 = direction * sb, direction * sa, math.sqrt(a_prev)
        else:  # eps = (x - sqrt(a) x0) / sqrt(b)
            c2, c3, c4 = direction / sb, 0.0, math.sqrt(a_prev) - direction * sa / sb
        rows.append([c0, c1, c2, c3, c4, 0.0, std])
    return rows


def _euler_rows(sched, begin: int, n: int, pred: str) -> tuple[list[list[float]], list[float]]:
    # EulerDiscreteScheduler.step with s_churn = 0 (Karras et al. 2022, Algorithm 2 without churn):
    # d = (x - x0) / sigma; x_next = x + d * (sigma_next - sigma) = (sigma_next/sigma) x + (1 - sigma_next/sigma) x0.
    sigmas = sched.sigmas.double()
    rows, c_in = [], []
    for k in range(begin, begin + n):
        s, s_next = float(sigmas[k]), float(sigmas[k + 1])
        if pred == "epsilon":
            c0, c1 = 1.0, -s
        elif pred == "v_prediction":
            c0, c1 = 1.0 / (s * s + 1.0), -s / math.sqrt(s * s + 1.0)
        else:
            c0, c1 = 0.0, 1.0
        ratio = s_next / s
        rows.append([c0, c1, ratio, 0.0, 1.0 - ratio, 0.0, 0.0])
        c_in.append(1.0 / math.sqrt(s * s + 1.0))
    return rows, c_in


def _euler_a_rows(sched, begin: int, n: int, pred: str) -> tuple[list[list[float]], list[float]]:
    # EulerAncestralDiscreteScheduler.step: x0 as Euler's; sigma_up = sqrt(s_to^2 (s^2 - s_to^2) / s^2),
    # sigma_down = sqrt(s_to^2 - sigma_up^2); x_next = x + (x - x0)/s * (sigma_down - s) + sigma_up z
    #                                               = (sigma_down/s) x + (1 - sigma_down/s) x0 + sigma_up z.
    # It draws z on every step, the last one included (where sigma_up = 0).
    rows, c_in = _euler_rows(sched, begin, n, pred)
    sigmas = sched.sigmas.double()
    for row, k in zip(rows, range(begin, begin + n)):
        s, s_to = float(sigmas[k]), float(sigmas[k + 1])
        up = math.sqrt(max(s_to * s_to * (s * s - s_to * s_to) / (s * s), 0.0))
        down = math.sqrt(max(s_to * s_to - up * up, 0.0))
        row[2], row[4], row[6] = down / s, 1.0 - down / s, up
    return rows, c_in


def _lcm_rows(sched, begin: int, n: int, pred: str) -> list[list[float]]:
    # LCMScheduler.step (Luo et al. 2023, arXiv:2310.04378): x0 as DDIM's, then the consistency boundary
    # condition denoised = c_out * x0 + c_skip * x with c_skip = sd^2 / (ts^2 + sd^2), c_out = ts / sqrt(ts^2 +
    # sd^2), ts = t * timestep_scaling, sd = 0.5. Every step but the schedule's last re-noises denoised to the
    # next timestep: x_next = sqrt(a_prev) denoised + sqrt(1 - a_prev) z; the last returns denoised. The kernel's
    # "x0" column carries denoised (c0, c1 folded), so the step is one row.
    ac = sched.alphas_cumprod.double()
    final = float(sched.final_alpha_cumprod)
    timesteps = [int(t) for t in sched.timesteps.tolist()]
    total, scaling, sd = sched.num_inference_steps, float(sched.config.timestep_scaling), 0.5
    rows = []
    for k in range(begin, begin + n):
        t = timesteps[k]
        prev = timesteps[k + 1] if k + 1 < len(timesteps) else t
        a = float(ac[t])
        a_prev = float(ac[prev]) if prev >= 0 else final
        if a == 0.0 and pred == "epsilon":
            raise ValueError(f"epsilon prediction is undefined at timestep {t} (alphas_cumprod = 0); use v_prediction")
        c0, c1 = _x0_rows(pred, math.sqrt(a), math.sqrt(1.0 - a))
        ts = t * scaling
        c_skip = sd * sd / (ts * ts + sd * sd)
        c_out = ts / math.sqrt(ts * ts + sd * sd)
        d0, d1 = c_out * c0 + c_skip, c_out * c1
        if k != total - 1:
            rows.append([d0, d1, 0.0, 0.0, math.sqrt(a_prev), 0.0, math.sqrt(1.0 - a_prev)])
        else:
            rows.append([d0, d1, 0.0, 0.0, 1.0, 0.0, 0.0])
    return rows


def _alpha_sigma(sigma: float) -> tuple[float, float]:
    # DPMSolverMultistepScheduler._sigma_to_alpha_sigma_t (VP): alpha = 1/sqrt(sigma^2+1), sigma_t = sigma*alpha.
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def _lambda(sigma: float) -> float:
    # log(alpha_t) - log(sigma_t) = -log(sigma); +inf at the final sigma 0 (then exp(-h) = 0 below).
    return math.inf if sigma == 0.0 else -math.log(sigma)


def _dpmpp_2m_rows(sched, begin: int, n: int, pred: str) -> list[list[float]]:
    # DPMSolverMultistepScheduler.step, algorithm "dpmsolver++", order 2, midpoint (Lu et al. 2022,
    # arXiv:2211.01095, Alg. 2). lower_order_nums starts at 0 after set_timesteps, so the first step of
    # every sample (whatever its begin index) is first order; the last step is too under lower_order_final.
    cfg = sched.config
    sigmas = sched.sigmas.double()
    total = len(sched.timesteps)
    rows = []
    for i, k in enumerate(range(begin, begin + n)):
        s0, s_t = float(sigmas[k]), float(sigmas[k + 1])
        alpha_s0, sigma_s0 = _alpha_sigma(s0)
        alpha_t, sigma_t = _alpha_sigma(s_t)
        c0, c1 = _x0_rows(pred, alpha_s0, sigma_s0)
        h = _lambda(s_t) - _lambda(s0)
        a = alpha_t * (math.exp(-h) - 1.0)  # alpha_t * (e^{-h} - 1)
        lower_order_final = k == total - 1 and (
            cfg.euler_at_final or (cfg.lower_order_final and total < 15) or cfg.final_sigmas_type == "zero"
        )
        if i == 0 or lower_order_final:
            # x_t = (sigma_t / sigma_s) x - a * x0
            rows.append([c0, c1, sigma_t / sigma_s0, 0.0, -a, 0.0, 0.0])
        else:
            # x_t = (sigma_t / sigma_s0) x - a * D0 - 0.5 * a * D1, D0 = x0, D1 = (x0 - prev_x0) / r0
            r0 = (_lambda(s0) - _lambda(float(sigmas[k - 1]))) / h
            half = 0.5 * a / r0
            rows.append([c0, c1, sigma_t / sigma_s0, 0.0, -a - half, half, 0.0])
    return rows


_CACHE: collections.OrderedDict = collections.OrderedDict()  # make_schedule's results, least recent first
_CACHE_SIZE = 256


def make_schedule(scheduler, num_inference_steps: int, strength: float | None, eta: float = 0.0) -> Schedule:
    """The pipeline's timesteps and the fused-kernel rows for one (steps, strength, eta) setting.

    Cached per (scheduler class and config, steps, strength, eta): building one runs diffusers'
    ``set_timesteps``, which every ``augment`` call would otherwise pay again per strength. Treat the
    result as read-only.

    ``strength`` in (0, 1] is img2img/SDEdit; None is text-only (all steps, from pure noise). ``eta`` is
    DDIM's (ignored by the other schedulers, as the pipeline's ``prepare_extra_step_kwargs`` does). The
    scheduler passed in is not modified (a fresh one is built from its config).

    Any diffusers scheduler is accepted: when ``fused_kind(scheduler)`` is None the result carries only
    what the unfused path needs (``kind``, ``c_in``, ``coefs``, ``start`` and ``stochastic`` are None; that
    path calls ``scale_model_input`` / ``add_noise`` / ``step`` itself).
    """
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    if strength is not None and not (0.0 < strength <= 1.0):
        raise ValueError(f"strength must be in (0, 1] (or None for text-only), got {strength!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    config = json.dumps(dict(scheduler.config), sort_keys=True, default=_plain)  # trained_betas: every value
    key = (type(scheduler).__qualname__, config, num_inference_steps, strength, float(eta))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    schedule = _CACHE[key] = _make_schedule(scheduler, num_inference_steps, strength, eta)
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return schedule


def _plain(value):
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _make_schedule(scheduler, num_inference_steps: int, strength: float | None, eta: float) -> Schedule:
    kind = fused_kind(scheduler)
    sched = type(scheduler).from_config(_without_marker(scheduler.config))  # (diffusers warns on unknown keys)
    if kind == "lcm" and lcm_span(scheduler) and strength is not None:
        try:  # LatentConsistencyModelImg2ImgPipeline: n steps inside the strength's span, from the first
            sched.set_timesteps(num_inference_steps, strength=strength)
        except ValueError as e:  # int(original_inference_steps * strength) < n
            raise ValueError(f"strength {strength} with {num_inference_steps} LCM steps: {e}") from None
        begin = 0
    else:
        sched.set_timesteps(num_inference_steps)
        begin = _begin_index(num_inference_steps, strength, sched.order)
    timesteps = sched.timesteps[begin:].clone()
    n = len(timesteps)
    if n == 0:
        raise ValueError(
            f"strength {strength} with {num_inference_steps} steps leaves no denoising step "
            f"(int({num_inference_steps} * {strength}) == 0)"
        )
    init_noise_sigma = float(sched.init_noise_sigma)
    if kind is None:
        return Schedule(None, timesteps, None, None, None, init_noise_sigma, None, begin)
    pred = sched.config.prediction_type
    if kind == "ddim":
        rows = _ddim_rows(sched, timesteps, float(eta), pred)
        c_in = [1.0] * n
        abar = float(sched.alphas_cumprod.double()[int(timesteps[0])])
        start = (math.sqrt(abar), math.sqrt(1.0 - abar))
    elif kind in ("euler", "euler_a"):
        rows, c_in = (_euler_rows if kind == "euler" else _euler_a_rows)(sched, begin, n, pred)
        start = (1.0, float(sched.sigmas.double()[begin]))
    elif kind == "lcm":
        rows = _lcm_rows(sched, begin, n, pred)
        c_in = [1.0] * n
        abar = float(sched.alphas_cumprod.double()[int(timesteps[0])])
        start = (math.sqrt(abar), math.sqrt(1.0 - abar))
    else:
        rows = _dpmpp_2m_rows(sched, begin, n, pred)
        c_in = [1.0] * n
        start = _alpha_sigma(float(sched.sigmas.double()[begin]))
    if strength is None:
        start = (0.0, init_noise_sigma)  # StableDiffusionPipeline.prepare_latents: z * init_noise_sigma
    return Schedule(
        kind=kind,
        timesteps=timesteps,
        c_in=torch.tensor(c_in, dtype=torch.float64).float(),
        coefs=torch.tensor(rows, dtype=torch.float64).float(),
        start=(float(start[0]), float(start[1])),
        init_noise_sigma=init_noise_sigma,
        # DDIM with eta > 0 and Euler ancestral draw fresh noise every step (even where the std is 0, as
        # diffusers does, which matters for matching a generator's draw order); LCM on every step but the
        # schedule's last (its draw order: see the sampler's _step_noise).
        stochastic=(kind == "ddim" and eta > 0) or kind == "euler_a" or (kind == "lcm" and n > 1),
        begin_index=begin,
    )
