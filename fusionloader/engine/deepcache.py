"""DeepCache-style feature caching across denoising steps, per slot (``Request.deepcache_interval = N``).

DeepCache (Ma, Fang & Wang, CVPR 2024, arXiv:2312.00858; github.com/horseee/DeepCache): the deep part of a
UNet changes slowly from step to step, so a full UNet call every N steps records the high-level feature that
enters the last up block, and the N - 1 steps in between run only the shallow branch -- ``conv_in``, the first
down block, the last up block fed that cached feature (plus the shallow skips computed afresh), and the output
head. This is DeepCache's uniform-interval schedule at block granularity (its ``cache_layer_id = 0``, the
whole first down block and last up block as the shallow branch).

NOTE [phases under continuous batching]: every slot keeps its own phase: a sample runs its full call at its own
steps 0, N, 2N, ... (so its first step always fills its cache) and the shallow branch otherwise, whatever its
batch-mates do. One sampler step therefore splits its UNet rows into at most two sub-batches -- full rows
(every slot without DeepCache, and DeepCache slots at a full step) and shallow rows -- and a sample's output
depends only on its own rows (batch-invariant). The cache has one row per slot for its conditional
prediction and one for its unconditional (CFG) prediction; it moves with the slots when they compact.
Nothing here reads the device: the row lists are host ints staged once per step.

The feature is captured with a forward pre-hook on the last up block during the ordinary ``unet(...)`` call,
so full rows compute exactly what the plain engine computes; with no shallow row in a step the sampler makes
its usual single call.
"""

from __future__ import annotations

import torch

__all__ = ["DeepCache", "check_interval"]


def check_interval(value, key) -> int | None:
    """``deepcache_interval`` of a request: None (off) or an int >= 1 (1: a full call every step)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"request {key!r}: deepcache_interval must be None or an int >= 1, got {value!r}")
    return value


class DeepCache:
    """The per-slot feature cache of one sampler (``capacity`` slots) over a ``UNet2DConditionModel``."""

    def __init__(self, unet, capacity: int):
        self.unet, self.capacity = unet, int(capacity)
        cfg = unet.config
        for key in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type"):
            if cfg.get(key) is not None:
                raise ValueError(f"deepcache_interval: UNets with {key}={cfg.get(key)!r} are not supported")
        blocks_down, blocks_up = getattr(unet, "down_blocks", None), getattr(unet, "up_blocks", None)
        if not blocks_down or not blocks_up or len(blocks_up) < 2:
            raise ValueError(f"deepcache_interval needs a UNet2DConditionModel-shaped UNet, got {type(unet).__name__}")
        if len(blocks_up[-1].resnets) > 1 + len(blocks_down[0].resnets):
            raise ValueError("deepcache_interval: the last up block takes skips from deeper than the first down block")
        self._cache: torch.Tensor | None = None  # (2 * capacity, C, h, w): rows b (cond) and capacity + b (uncond)

    # -- the two passes ---------------------------------------------------------------------------------

    def full(self, call, xin, t, emb, tc):
        """``call(xin, t, emb, tc)`` (the ordinary UNet call) and the feature entering the last up block."""
        seen = {}

        def grab(module, args, kwargs):
            seen["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        hook = self.unet.up_blocks[-1].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            out = call(xin, t, emb, tc)
        finally:
            hook.remove()
        return out, seen["h"]

    def shallow(self, sample, timestep, encoder_hidden_states, timestep_cond, feature):
        """The shallow branch (UNet2DConditionModel.forward with the deep part replaced by ``feature``)."""
        u = self.unet
        if u.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        ehs = u.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=None)
        sample = u.conv_in(sample)
        down, up = u.down_blocks[0], u.up_blocks[-1]
        if getattr(down, "has_cross_attention", False):
            _, res = down(hidden_states=sample, temb=emb, encoder_hidden_states=ehs)
        else:
            _, res = down(hidden_states=sample, temb=emb)
        # The last up block consumes the first skips: conv_in's output and the first down block's resnets.
        skips = ((sample,) + tuple(res))[: len(up.resnets)]
        if getattr(up, "has_cross_attention", False):
            h = up(hidden_states=feature, temb=emb, res_hidden_states_tuple=skips, encoder_hidden_states=ehs)
        else:
            h = up(hidden_states=feature, temb=emb, res_hidden_states_tuple=skips)
        if u.conv_norm_out:
            h = u.conv_act(u.conv_norm_out(h))
        return u.conv_out(h)

    # -- one step ---------------------------------------------------------------------------------------

    def run(self, call, xin, t, emb, tc, full, full_rows, shallow, shallow_rows):
        """Model output for every UNet row: rows ``full`` (device int64) through the full call, recording their
        features into cache rows ``full_rows``; rows ``shallow`` through the shallow branch from cache rows
        ``shallow_rows``. ``full``/``shallow`` None: no such rows this step."""
        if shallow is None:  # every row full: the ordinary single call, features recorded
            out, feat = self.full(call, xin, t, emb, tc)
            self._store(full_rows, feat)
            return out
        out = None
        if full is not None:
            sub = [v.index_select(0, full) if v is not None else None for v in (xin, t, emb, tc)]
            out_f, feat = self.full(call, *sub)
            self._store(full_rows, feat)
            out = torch.empty((xin.shape[0], *out_f.shape[1:]), dtype=out_f.dtype, device=out_f.device)
            out.index_copy_(0, full, out_f)
        sub = [v.index_select(0, shallow) if v is not None else None for v in (xin, t, emb, tc)]
        assert self._cache is not None, "a shallow step before any full step"  # host state, not a device read
        out_s = self.shallow(*sub, self._cache.index_select(0, shallow_rows))
        if out is None:
            out = torch.empty((xin.shape[0], *out_s.shape[1:]), dtype=out_s.dtype, device=out_s.device)
        out.index_copy_(0, shallow, out_s)
        return out

    def _store(self, rows, feat) -> None:
        if self._cache is None:
            self._cache = torch.zeros((2 * self.capacity, *feat.shape[1:]), dtype=feat.dtype, device=feat.device)
        self._cache.index_copy_(0, rows, feat)

    def compact(self, keep: torch.Tensor, n: int) -> None:
        """Slots ``keep`` (device int64, ``n`` of them) move to rows 0..n-1, as the sampler's buffers do."""
        if self._cache is not None:
            c = self.capacity
            self._cache[:n] = self._cache[keep]
            self._cache[c : c + n] = self._cache[keep + c]
