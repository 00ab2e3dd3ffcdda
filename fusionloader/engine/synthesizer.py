"""``Synthesizer``: the engine's public face -- diffusers-exact img2img (SDEdit) and txt2img, continuously batched.

    synth = Synthesizer.from_pretrained("CompVis/stable-diffusion-v1-4", device="cuda:1")  # fp16, fp32 VAE, DDIM
    out = synth.augment(images, prompts=["a photo of a <cat>"] * len(images), strengths=[0.25, 0.5, 0.75, 1.0],
                        guidance_scale=7.5, num_inference_steps=50, seeds=[11, 12, 13, 14])

With one strength and a ``torch.Generator``, ``augment`` computes what ``StableDiffusionImg2ImgPipeline`` computes
with an identically seeded generator (tests/test_synthesizer.py is the oracle).

NOTE [generator meaning]: ``generator`` has diffusers' meaning. A list (one per image) is per-sample: image i draws
its latent sample, start noise and step noise from ``generator[i]``, so a mixed-strength call equals separate
per-strength pipeline calls. A single generator draws batch-shaped tensors like the pipeline does for the batch;
with mixed strengths the images are split into strength groups (in order of first appearance) that draw one
after the other, i.e. equal to consecutive pipeline calls per group sharing the generator. ``seeds`` (ints) use
in-kernel Philox streams instead (batch-invariant; what the loader's plan supplies).

NOTE [pickling]: a Synthesizer pickles as its load spec (path or hub id + options) and reloads in the receiving
process. One built from a pipeline object is first written into a temporary checkpoint folder by
``handoff.py`` -- on every rank, whatever the process group (``save_pretrained`` writes nothing on ranks != 0
once one exists) -- in a 0700 folder per rank and process. The producer pool holds the spec naming it and
the folder goes when the pool closes (or at exit); a Synthesizer pickled directly keeps its folder as long as
it lives (or until exit), so unpickle while it lives (producers start while the trainer runs).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence

import torch

from .errors import NonFiniteOutputError
from .latents import LatentCache, encode_posterior
from .models import Components, components_from_pipe, device_scope, load_components
from .prompts import DEFAULT_PROMPT_CACHE_SIZE, PromptCache, PromptPolicy
from .sampler import DEFAULT_DECODE_CHUNK, Finished, Request, Sampler, _Cohort

__all__ = ["Synthesizer"]

# augment's default UNet batch (slots) when ``capacity`` is not given: all images, up to this many.
DEFAULT_MAX_CAPACITY = 64


def _as_list(value, n: int, name: str) -> list:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: got {len(value)} values for {n} images")
        return list(value)
    return [value] * n


class Synthesizer:
    """Augments real images with a Stable-Diffusion-shaped model (see the module docstring).

    ``Synthesizer(pipe)`` shares an existing diffusers pipeline's modules; ``Synthesizer.from_pretrained`` loads a
    checkpoint folder or hub id. Options: ``device``, ``dtype`` (UNet + text encoder), ``vae_dtype`` (use float32
    with a half UNet: the SD-1.x VAE overflows in fp16), ``scheduler`` (None = the checkpoint's; ``"ddim"``,
    ``"euler"``, ``"dpmpp_2m"``, a diffusers class or instance), ``tiny_vae`` (an ``AutoencoderTiny`` decoder),
    ``attention`` (``"sdpa"`` or ``"xformers"``), ``resolution`` (generation size; default the UNet's),
    ``prompt_policy`` (maps class ids to prompts).

    ``leakage_guard=True`` with ``class_names`` (DA-Fusion's data-centric leakage prevention): no prompt whose
    encoded token ids contain a class name reaches the text encoder -- :class:`~.leakage.LeakageError` (a
    ``ValueError`` naming the prompt and the class) instead, checked on the ids actually encoded (engine/leakage.py);
    learned tokens pass. It travels with the load spec, so producers check too.

    Device memory: ``prompt_cache_size`` bounds the prompt-embedding cache (LRU, default
    ``DEFAULT_PROMPT_CACHE_SIZE`` = 1024 prompts; None = unbounded); ``decode_chunk`` is how many finished samples
    one VAE decode takes (default ``DEFAULT_DECODE_CHUNK`` = 4; the result does not depend on it);
    :meth:`memory_estimate` predicts the device memory of a sampler of a given capacity.
    On ``cuda:N`` every call runs under ``torch.cuda.device(N)``: nothing touches the current device.
    """

    def __init__(self, pipe=None, *, device=None, dtype=None, vae_dtype=None, scheduler=None, tiny_vae=None,
                 attention="sdpa", resolution=None, prompt_policy: PromptPolicy | None = None,
                 prompt_cache_size: int | None = DEFAULT_PROMPT_CACHE_SIZE, decode_chunk: int = DEFAULT_DECODE_CHUNK,
                 leakage_guard: bool = False, class_names=None,
                 tiny_decoder=None, compile: bool = False, cuda_graphs: bool = False,
                 _components: Components | None = None, _spec: dict | None = None):  # fmt: skip
        if _components is None:
            if pipe is None:
                raise ValueError("Synthesizer(pipe) needs a diffusers pipeline; or use Synthesizer.from_pretrained(path)")
            _components = components_from_pipe(pipe, device, dtype, vae_dtype, scheduler, tiny_vae, attention)
        self._options = dict(vae_dtype=vae_dtype, attention=attention)
        self.components = _components
        self._spec = _spec
        self._live_spec: weakref.ref | None = None  # the temporary-checkpoint spec producers hold (see load_spec)
        self._pickled_specs: list[dict] = []
        self.resolution = self._check_resolution(resolution)
        f = self.components.vae_scale_factor
        self.latent_shape = (self.components.latent_channels, self.resolution[0] // f, self.resolution[1] // f)
        self.prompt_policy = prompt_policy
        if not isinstance(decode_chunk, int) or decode_chunk < 1:
            raise ValueError(f"decode_chunk must be a positive int, got {decode_chunk!r}")
        self.decode_chunk = decode_chunk
        self.leakage_guard, self.class_names = _check_guard(leakage_guard, class_names)
        if self.leakage_guard:
            from .leakage import GuardedPromptCache

            self.prompt_cache = GuardedPromptCache(self.components.tokenizer, self.components.text_encoder,
                                                   self.components.device, max_size=prompt_cache_size,
                                                   class_names=self.class_names)  # fmt: skip
        else:
            self.prompt_cache = PromptCache(self.components.tokenizer, self.components.text_encoder,
                                            self.components.device, max_size=prompt_cache_size)  # fmt: skip
        # Speed options (docs/CONTRACTS.md "Engine speed options"): per sampler (compile, cuda_graphs) and the
        # decoders a request may pick (decoder="tiny": tiny_decoder, else the checkpoint's vae_tiny/ folder).
        self.compile, self.cuda_graphs = bool(compile), bool(cuda_graphs)
        if self.cuda_graphs:
            from .compile import check_cuda_graphs

            check_cuda_graphs(self.components.device)
        self.decoders = self._decoders(tiny_decoder)

    def _decoders(self, tiny_decoder):
        from .decoders import TINY_SUBFOLDER, Decoders

        c = self.components
        source = tiny_decoder
        folder = self._spec.get("path_or_id") if self._spec else None
        if source is None and folder and os.path.isdir(os.path.join(folder, TINY_SUBFOLDER)):
            source = os.path.join(folder, TINY_SUBFOLDER)
        if source is None and c.decoder is not c.vae:  # tiny_vae= already made TAESD the decoder
            source = c.decoder
        return Decoders(c.decoder, source, c.device, c.vae_dtype)

    def _check_resolution(self, resolution) -> tuple[int, int]:
        if resolution is None:
            return self.components.resolution
        res = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        f = self.components.vae_scale_factor
        if len(res) != 2 or res[0] % f or res[1] % f or min(res) <= 0:
            raise ValueError(f"resolution {resolution} must be positive multiples of the VAE factor {f}")
        return res

    @classmethod
    def from_pretrained(cls, path_or_id, device="cpu", dtype=None, vae_dtype=None, scheduler=None,
                        tiny_vae=None, attention="sdpa", variant=None, revision=None, local_files_only=None,
                        resolution=None, prompt_policy: PromptPolicy | None = None,
                        textual_inversion=None, prompt_cache_size: int | None = DEFAULT_PROMPT_CACHE_SIZE,
                        decode_chunk: int = DEFAULT_DECODE_CHUNK, leakage_guard: bool = False,
                        class_names=None, tiny_decoder=None, compile: bool = False,
                        cuda_graphs: bool = False) -> Synthesizer:  # fmt: skip
        """Load a Stable-Diffusion checkpoint (folder or hub id); see :func:`~fusionloader.engine.models.load_components`.

        Defaults by device: on CUDA an fp16 UNet and text encoder with an fp32 VAE, and a fused scheduler (DDIM
        from the checkpoint's config) in place of one without a kernel (PNDM), logged; on CPU fp32 and the
        checkpoint's scheduler. ``dtype``/``vae_dtype``/``scheduler`` override (``scheduler="checkpoint"`` keeps it).

        ``textual_inversion``: a list of ``(source, token)`` pairs applied with :meth:`load_textual_inversion`.

        Speed options: ``scheduler="lcm"`` / ``"turbo"`` (few-step; Turbo runs without CFG), ``tiny_decoder`` (an
        ``AutoencoderTiny`` or folder for requests with ``decoder="tiny"``; default the checkpoint's ``vae_tiny/``),
        ``compile`` (torch.compile of the UNet call), ``cuda_graphs`` (CUDA only).
        """
        spec = dict(
            path_or_id=os.fspath(path_or_id), device=str(device), dtype=dtype, vae_dtype=vae_dtype,
            scheduler=scheduler, tiny_vae=tiny_vae, attention=attention, variant=variant, revision=revision,
            local_files_only=local_files_only, resolution=resolution, prompt_policy=prompt_policy,
            textual_inversion=[], prompt_cache_size=prompt_cache_size, decode_chunk=decode_chunk,
            tiny_decoder=tiny_decoder, compile=compile, cuda_graphs=cuda_graphs,
        )  # fmt: skip
        guard, names = _check_guard(leakage_guard, class_names)  # before loading anything
        if guard:
            spec.update(leakage_guard=True, class_names=names)
        comps = load_components(
            path_or_id, device, dtype, vae_dtype, scheduler, tiny_vae, attention, variant, revision, local_files_only
        )
        synth = cls(_components=comps, _spec=spec, resolution=resolution, prompt_policy=prompt_policy,
                    prompt_cache_size=prompt_cache_size, decode_chunk=decode_chunk, leakage_guard=guard,
                    class_names=names, tiny_decoder=tiny_decoder, compile=compile,
                    cuda_graphs=cuda_graphs)  # fmt: skip
        for source, token in textual_inversion or ():
            synth.load_textual_inversion(source, token)
        return synth

    def load_textual_inversion(self, source, token: str | None = None, **kwargs) -> None:
        """Add learned token embeddings (DA-Fusion's class tokens) to the tokenizer and text encoder.

        ``source``: what diffusers' ``load_textual_inversion`` takes -- a file/folder/hub id in the diffusers or
        A1111 format, or a ``{token: tensor}`` dict. A token learned with k vectors becomes ``<t>``, ``<t>_1``, ...,
        and prompts mentioning ``<t>`` use all k, as diffusers does. Clears the prompt cache. A Synthesizer built
        from a pipeline shares that pipeline's tokenizer and text encoder, so the pipeline sees the tokens too.
        """
        from diffusers.loaders import TextualInversionLoaderMixin

        class _Holder(TextualInversionLoaderMixin):  # the mixin only needs these attributes
            hf_device_map = None

            def __init__(self, tokenizer, text_encoder):
                self.tokenizer, self.text_encoder = tokenizer, text_encoder
                self.components = {"text_encoder": text_encoder}

        c = self.components
        _Holder(c.tokenizer, c.text_encoder).load_textual_inversion(source, token=token, **kwargs)
        c.text_encoder.requires_grad_(False)
        self.prompt_cache.clear()
        if self._spec is not None and "textual_inversion" in self._spec:
            self._spec["textual_inversion"] = self._spec["textual_inversion"] + [(source, token)]

    # -- pickling: as the load spec ---------------------------------------------------------------------

    def load_spec(self) -> dict:
        """Keyword arguments of :meth:`from_pretrained` that rebuild this synthesizer in another process.

        Built from a path or hub id: that path or id. Built from a pipeline object: a temporary checkpoint this
        process writes (any rank, any process group; see NOTE [rank-independent handoff] in ``handoff.py``),
        returned as a :class:`~fusionloader.engine.handoff.LoadSpec` that removes the folder once the last holder
        (the producer pool, until it closes) drops it. Calls while one is held return that same spec."""
        if self._spec is not None:
            spec = dict(self._spec)
        else:
            spec = self._live_spec() if self._live_spec is not None else None
            if spec is None:  # none held (or the last holder dropped it): write a new one
                spec = self._handoff()
        spec["prompt_policy"] = self.prompt_policy
        spec["resolution"] = self.resolution
        spec["prompt_cache_size"], spec["decode_chunk"] = self.prompt_cache.max_size, self.decode_chunk  # engine: memory bounds
        if self.leakage_guard:  # producers refuse class names too
            spec["leakage_guard"], spec["class_names"] = True, list(self.class_names)
        spec["compile"], spec["cuda_graphs"] = self.compile, self.cuda_graphs  # engine: speed options
        return spec

    def _handoff(self) -> dict:
        from .handoff import LoadSpec, write_temp_checkpoint

        c = self.components
        folder, tiny = write_temp_checkpoint(c)
        spec = LoadSpec(
            path_or_id=folder, device=str(c.device), dtype=c.dtype, vae_dtype=c.vae_dtype, scheduler=None,
            tiny_vae=tiny, attention=self._options.get("attention", "sdpa"), local_files_only=True,
        )  # fmt: skip
        spec.own(folder)
        self._live_spec = weakref.ref(spec)
        return spec

    def __reduce__(self):
        spec = self.load_spec()
        if type(spec) is not dict and not any(s is spec for s in self._pickled_specs):
            # Pickled directly (e.g. inside a loader sent to ddp_spawn ranks): the receiver loads whenever it
            # unpickles, so the folder lives as long as this synthesizer (or this process).
            self._pickled_specs.append(spec)
        return (_rebuild, (dict(spec),))

    # -- parts ------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.components.device

    @property
    def dtype(self) -> torch.dtype:
        return self.components.dtype

    @property
    def scheduler(self):
        return self.components.scheduler

    @property
    def spans_strength(self) -> bool:
        """Whether img2img runs all ``num_inference_steps`` at any strength (``scheduler="lcm_span"``, the LCM
        img2img pipeline's rule) rather than the last ``int(steps * strength)`` of them."""
        from .schedules import lcm_span

        return lcm_span(self.scheduler)

    def encode_prompts(self, prompts: Sequence[str]) -> None:
        """Prefill the prompt-embedding cache (the negative prompt ``""`` is always added)."""
        self.prompt_cache.add(list(prompts) + [""])

    def latent_cache(self, path=None, resolution=None, resize: str = "bilinear", batch_size: int = 16) -> LatentCache:
        """A :class:`LatentCache` for this model's VAE at ``resolution`` (default: the generation resolution)."""
        if self.components.vae is None:
            raise ValueError("a latent cache needs the AutoencoderKL encoder; this synthesizer has only a decoder")
        return LatentCache(self.components.vae, path, resolution or self.resolution, self.device, resize, batch_size)

    def sampler(self, capacity: int = 8, out: torch.Tensor | None = None, mean=None, std=None,
                return_latents: bool = False, decode_chunk: int | None = None) -> Sampler:  # fmt: skip
        """A streaming continuous-batching sampler (producers use it); ``out`` receives images at ``Request.out_row``."""
        if out is not None:
            self._check_out(out, None)
        return Sampler(self.components, self.prompt_cache, capacity, self.resolution, out, mean, std, return_latents,
                       self.decode_chunk if decode_chunk is None else decode_chunk, compile=self.compile,
                       cuda_graphs=self.cuda_graphs, decoders=self.decoders)  # fmt: skip

    def memory_estimate(self, capacity: int = 8, decode_chunk: int | None = None, guided: bool = True) -> dict:
        """Predicted device memory (bytes) of a sampler with ``capacity`` slots; see :mod:`.memory`.

        Keys: ``weights`` (``{module: bytes}``), ``weights_by_dtype``, ``unet_activations`` (one UNet call on
        ``capacity`` rows, twice that with CFG when ``guided``), ``decode_activations`` (one decode of
        ``decode_chunk`` samples), ``sampler_buffers``, ``prompt_cache`` (its bound), ``total`` (weights + the
        larger of the two activation peaks + buffers + prompt cache), and the inputs.
        """
        from .memory import estimate

        return estimate(self.components, self.prompt_cache, self.resolution, capacity,
                        self.decode_chunk if decode_chunk is None else decode_chunk, guided)  # fmt: skip

    # -- the public calls -------------------------------------------------------------------------------

    def augment(self, images, prompts, strengths=0.5, guidance_scale=7.5, num_inference_steps: int = 50,
                generator=None, seeds=None, eta: float = 0.0, capacity: int | None = None, negative_prompt="",
                prompt_policy: PromptPolicy | None = None, latent_mode: str = "sample",
                output_type: str = "pt", return_latents: bool = False, deepcache_interval: int | None = None,
                decoder: str = "vae"):  # fmt: skip
        """Augment ``images`` (float [0, 1], (N, 3, H, W) at the generation resolution) -> float [0, 1] images.

        ``images`` may also be cached latents: ``(mean, std)`` from :meth:`LatentCache.get` (``std=None`` or
        ``latent_mode="mean"``: use the mean), or a (N, 4, h, w) tensor of already-scaled latents (diffusers'
        meaning of a 4-channel ``image``). ``prompts``: strings, or class ids mapped by ``prompt_policy``.
        ``strengths``, ``guidance_scale``: one value or one per image (strength None = text-only).
        ``generator`` / ``seeds``: see the module NOTE. ``capacity``: UNet batch slots (default: all images, at
        most 64; a shared generator's strength group always fits whole).
        ``output_type="latent"`` returns the final scaled latents instead; ``return_latents=True`` returns
        ``(images, latents)``. ``deepcache_interval`` (one value or one per image) and ``decoder`` (``"vae"`` or
        ``"tiny"``, one or one per image): the per-request speed options of ``Request``. Raises
        :class:`~fusionloader.engine.errors.NonFiniteOutputError` naming the images that came out NaN/inf.
        """
        if output_type not in ("pt", "latent"):
            raise ValueError(f"output_type must be 'pt' or 'latent', got {output_type!r}")
        reqs, phases = self._requests(
            images, prompts, strengths, guidance_scale, num_inference_steps, generator, seeds, eta,
            negative_prompt, prompt_policy, latent_mode,
        )  # fmt: skip
        self._speed_options(reqs, deepcache_interval, decoder)
        want_latents = output_type == "latent" or return_latents
        results = self._run(reqs, phases, capacity, None, None, None, want_latents)
        self._raise_nonfinite(results)
        latents = torch.stack([results[i].latents for i in range(len(reqs))]) if want_latents else None
        if output_type == "latent":
            return latents
        images = torch.stack([results[i].image for i in range(len(reqs))])
        return (images, latents) if return_latents else images

    def augment_into(self, out: torch.Tensor, images, prompts, strengths=0.5, guidance_scale=7.5,
                     num_inference_steps: int = 50, generator=None, seeds=None, eta: float = 0.0,
                     capacity: int | None = None, negative_prompt="", prompt_policy: PromptPolicy | None = None,
                     latent_mode: str = "sample", rows=None, mean=None, std=None,
                     deepcache_interval: int | None = None, decoder: str = "vae") -> torch.Tensor:  # fmt: skip
        """:meth:`augment` writing straight into ``out`` (uint8 0..255, or float, optionally ``(x - mean) / std``).

        ``rows`` (default ``range(N)``) are the rows of ``out`` image i goes to. Returns ``out``.
        """
        reqs, phases = self._requests(
            images, prompts, strengths, guidance_scale, num_inference_steps, generator, seeds, eta,
            negative_prompt, prompt_policy, latent_mode,
        )  # fmt: skip
        self._speed_options(reqs, deepcache_interval, decoder)
        rows = list(range(len(reqs))) if rows is None else [int(r) for r in rows]
        if len(rows) != len(reqs):
            raise ValueError(f"rows: got {len(rows)} rows for {len(reqs)} images")
        self._check_out(out, max(rows) + 1 if rows else 0)
        for r, row in zip(reqs, rows):
            r.out_row = row
        results = self._run(reqs, phases, capacity, out, mean, std, False)
        self._raise_nonfinite(results)
        return out

    def generate(self, prompts, guidance_scale=7.5, num_inference_steps: int = 50, generator=None, seeds=None,
                 eta: float = 0.0, capacity: int | None = None, negative_prompt="",
                 prompt_policy: PromptPolicy | None = None, output_type: str = "pt",
                 deepcache_interval: int | None = None, decoder: str = "vae") -> torch.Tensor:  # fmt: skip
        """Text-to-image from pure noise (``StableDiffusionPipeline``'s function), e.g. class-label generation."""
        return self.augment(
            None, prompts, None, guidance_scale, num_inference_steps, generator, seeds, eta, capacity,
            negative_prompt, prompt_policy, "sample", output_type, deepcache_interval=deepcache_interval,
            decoder=decoder,
        )  # fmt: skip

    # -- internals --------------------------------------------------------------------------------------

    def _check_out(self, out: torch.Tensor, rows_needed: int | None) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or tuple(out.shape[1:]) != (3, *self.resolution):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"out must be a (N, 3, {self.resolution[0]}, {self.resolution[1]}) tensor, got {shape}")
        if out.dtype != torch.uint8 and not out.is_floating_point():
            raise ValueError(f"out must be uint8 or float, got {out.dtype}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous (the post-process kernel writes whole rows)")
        if rows_needed is not None and out.shape[0] < rows_needed:
            raise ValueError(f"out has {out.shape[0]} rows, needs {rows_needed}")

    def _prompts(self, prompts, n: int | None, policy, seeds) -> list[str]:
        if isinstance(prompts, str):
            prompts = [prompts] * (n or 1)
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        prompts = list(prompts)
        if n is not None and len(prompts) != n:
            raise ValueError(f"got {n} images but {len(prompts)} prompts: pass one prompt per image")
        policy = policy or self.prompt_policy
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                out.append(p)
            elif isinstance(p, int):
                if policy is None:
                    raise ValueError("prompts are class ids but no prompt_policy was given")
                out.append(policy(p, seeds[i] if seeds is not None else i))
            else:
                raise TypeError(f"prompt {i} must be a string or a class id, got {type(p).__name__}")
        return out

    def _latents(self, images, strengths, latent_mode):
        """Per image: dict(latent_mean=, latent_std=) or dict(latents=) or {} (text-only)."""
        n_img = [i for i, s in enumerate(strengths) if s is not None]
        if images is None:
            if n_img:
                raise ValueError(f"strength {strengths[n_img[0]]} (img2img) needs images; use strength None for text-only")
            return [{} for _ in strengths]
        if latent_mode not in ("sample", "mean"):
            raise ValueError(f"latent_mode must be 'sample' or 'mean', got {latent_mode!r}")
        is_posterior = isinstance(images, (tuple, list)) and len(images) == 2 and isinstance(images[0], torch.Tensor)
        if is_posterior and images[0].dim() == 4:
            mean, std = images
            if tuple(mean.shape[1:]) != self.latent_shape:
                raise ValueError(f"cached latents of shape {tuple(mean.shape[1:])}, expected {self.latent_shape}")
            std = None if latent_mode == "mean" else std
            return [dict(latent_mean=mean[i], latent_std=None if std is None else std[i]) for i in range(len(mean))]
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError("images must be a float tensor (N, 3, H, W) in [0, 1], cached (mean, std), or latents")
        if images.shape[1] == self.latent_shape[0] and tuple(images.shape[2:]) == self.latent_shape[1:]:
            return [dict(latents=images[i]) for i in range(len(images))]
        if images.shape[1] != 3:
            raise ValueError(f"images must have 3 channels (N, 3, H, W), got {images.shape[1]} ({tuple(images.shape)})")
        if tuple(images.shape[2:]) != self.resolution:
            raise ValueError(
                f"images are {tuple(images.shape[2:])} but the generation resolution is {self.resolution}; "
                "resize them (or use a latent cache, which resizes)"
            )
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1], got {images.dtype}")
        lo, hi = torch.aminmax(images.detach())
        if lo.item() < 0.0 or hi.item() > 1.0:
            raise ValueError(f"images must be in [0, 1], got values in [{lo.item():.3g}, {hi.item():.3g}]")
        result = [{} for _ in strengths]
        if n_img:
            sub = images[n_img] if len(n_img) < len(images) else images
            with device_scope(self.device):
                mean, std = encode_posterior(self.components.vae, sub, self.resolution, device=self.device)
            for k, i in enumerate(n_img):
                result[i] = dict(latent_mean=mean[k], latent_std=None if latent_mode == "mean" else std[k])
        return result

    def _requests(self, images, prompts, strengths, guidance_scale, steps, generator, seeds, eta, negative_prompt,
                  policy, latent_mode):  # fmt: skip
        n = None
        if images is not None:
            n = len(images[0]) if isinstance(images, (tuple, list)) else len(images)
        if n is None and not isinstance(prompts, str):
            n = len(prompts)
        n = n or 1
        if seeds is not None and generator is not None:
            raise ValueError("give either generator(s) or seeds, not both")
        seeds = None if seeds is None else [int(s) for s in _as_list(seeds, n, "seeds")]
        texts = self._prompts(prompts, n, policy, seeds)
        strengths = _as_list(strengths, n, "strengths")
        for s in strengths:
            if s is not None and not 0.0 < float(s) <= 1.0:
                raise ValueError(f"strength must be in (0, 1] (or None for text-only), got {s}")
        guidance = [float(g) for g in _as_list(guidance_scale, n, "guidance_scale")]
        negatives = _as_list(negative_prompt, n, "negative_prompt")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {steps!r}")
        lat = self._latents(images, strengths, latent_mode)
        gens = [None] * n
        cohort_of = [None] * n
        phases: list[list[int]] = [list(range(n))]
        if isinstance(generator, (list, tuple)):
            if len(generator) == 1:
                generator = generator[0]  # diffusers treats a 1-list like one generator
            else:
                gens = _as_list(generator, n, "generator")
        if isinstance(generator, torch.Generator):
            groups: dict = {}
            for i, s in enumerate(strengths):
                groups.setdefault(s, []).append(i)
            phases = list(groups.values())
            for members in phases:
                cohort = _Cohort(generator, len(members))
                for i in members:
                    cohort_of[i] = cohort
        elif generator is not None and not isinstance(generator, (list, tuple)):
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
        reqs = [
            Request(
                key=i, prompt=texts[i], strength=None if strengths[i] is None else float(strengths[i]),
                guidance_scale=guidance[i], num_inference_steps=steps, seed=None if seeds is None else seeds[i],
                generator=gens[i], eta=float(eta), negative_prompt=negatives[i], cohort=cohort_of[i], **lat[i],
            )  # fmt: skip
            for i in range(n)
        ]
        return reqs, phases

    @staticmethod
    def _speed_options(reqs, deepcache_interval, decoder) -> None:
        n = len(reqs)
        for r, every, dec in zip(reqs, _as_list(deepcache_interval, n, "deepcache_interval"),
                                 _as_list(decoder, n, "decoder")):  # fmt: skip
            r.deepcache_interval, r.decoder = every, dec

    def _run(self, reqs, phases, capacity, out, mean, std, return_latents) -> dict[int, Finished]:
        """Sample every phase. Inference mode (no version counters, no view tracking) makes the many small
        ops of a step measurably cheaper on CPU than no_grad; what it returns are inference tensors, which
        callers turn into plain ones (``torch.stack``) or write into a caller's plain ``out``."""
        results: dict[int, Finished] = {}
        with torch.inference_mode(), device_scope(self.device):
            for members in phases:
                cap = capacity or min(len(members), DEFAULT_MAX_CAPACITY)
                if reqs[members[0]].cohort is not None:
                    cap = max(cap, len(members))
                sampler = Sampler(self.components, self.prompt_cache, cap, self.resolution, out, mean, std, return_latents,
                                  self.decode_chunk, compile=self.compile, cuda_graphs=self.cuda_graphs,
                                  decoders=self.decoders)  # fmt: skip
                for i in members:
                    sampler.submit(reqs[i])
                for f in sampler.drain():
                    results[f.key] = f
        return results

    @staticmethod
    def _raise_nonfinite(results: dict[int, Finished]) -> None:
        bad = sorted(k for k, f in results.items() if not f.finite)
        if bad:
            raise NonFiniteOutputError(bad, "with a half-precision VAE try vae_dtype=torch.float32")

    def __repr__(self) -> str:
        c = self.components
        return (f"Synthesizer({type(c.unet).__name__}, scheduler={type(c.scheduler).__name__}, device={c.device}, "
                f"dtype={c.dtype}, resolution={self.resolution})")  # fmt: skip


def _check_guard(leakage_guard, class_names) -> tuple[bool, list[str] | None]:
    if not isinstance(leakage_guard, bool):
        raise TypeError(f"leakage_guard must be True or False, got {leakage_guard!r}")
    if not leakage_guard:
        return False, None
    if class_names is None or isinstance(class_names, str) or not len(class_names):
        raise ValueError(f"leakage_guard=True needs class_names (the class names to keep from the text encoder), "
                         f"got {class_names!r}")
    names = list(class_names)
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class_names[{i}] must be a non-empty string, got {name!r}")
    return True, names


def _rebuild(spec: dict) -> Synthesizer:
    return Synthesizer.from_pretrained(**spec)
