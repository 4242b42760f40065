"""The engines that turn a batch of initial noise into latents, on one device, for one class per batch.

    FastEngine      the one-step SDXL path written out: x0 = x - sigma * eps at timestep 999, nothing else
    PipelineEngine  the general diffusers pipeline call (multi-step, CFG, other architectures), to latents
    PromptTable     every class's prompt embeddings, encoded in batched calls and kept on the device, and the
                    unconditional (empty-prompt) embeddings for classifier-free guidance, encoded once

Both take the same noise (drawn on the CPU from each image's own generator, see `draw_noise`) and give the
same latents within float rounding; `decode.Decoder` turns either into pixels. `fast_path_problem` says
why the fast path does not apply to a model, from its configs alone, so the driver (reading config files)
and the worker (holding the loaded pipeline) decide alike.

The fast path follows diffusers 0.42's StableDiffusionXLPipeline.__call__ + Euler(Ancestral)DiscreteScheduler
at one step: latents = noise * init_noise_sigma; the UNet sees latents / sqrt(sigma^2 + 1) at timestep 999
with time ids (H, W, 0, 0, H, W) and the pooled text embedding; the step with sigma_next = 0 is
x0 = latents - sigma * eps (the ancestral noise is multiplied by sigma_up = 0, so it is not drawn).
"""

from __future__ import annotations

EULER_SCHEDULERS = ("EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler")
SDXL_PIPELINE = "StableDiffusionXLPipeline"
EAGER_PROMPT_LIMIT = 4096  # classes encoded at start-up; beyond it, per unit (1000 classes ~ 0.3 GB in fp16)
PROMPT_CHUNK = 64  # prompts per text-encoder call


def one_step_schedule(scheduler_config: dict) -> dict:
    """Timestep, sigmas and init_noise_sigma of a one-step schedule, from diffusers' own scheduler code."""
    import diffusers
    import torch

    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    scheduler.set_timesteps(1)
    sigma = scheduler.sigmas[0].to(torch.float32)
    return {
        "timestep": float(scheduler.timesteps[0]),
        "sigma": float(sigma),
        "sigma_next": float(scheduler.sigmas[1]),
        "init_noise_sigma": float(scheduler.init_noise_sigma),
        # scale_model_input's divisor, computed in float32 as the scheduler does
        "input_scale": float((sigma**2 + 1) ** 0.5),
    }


def fast_path_problem(
    pipeline_class: str, scheduler_config: dict, unet_config: dict, steps: int, guidance: float
) -> str | None:
    """Why the one-step SDXL path does not apply (None when it does)."""
    if steps != 1:
        return f"--steps {steps} (it is one step)"
    if guidance > 1.0:
        return f"--guidance {guidance} (it has no unconditional pass)"
    if pipeline_class != SDXL_PIPELINE:
        return f"the model is a {pipeline_class}, not the SDXL architecture"
    if unet_config.get("addition_embed_type") != "text_time" or unet_config.get("time_cond_proj_dim") is not None:
        return "the UNet is not conditioned like SDXL's (text_time embedding, no guidance embedding)"
    name = scheduler_config.get("_class_name")
    if name not in EULER_SCHEDULERS:
        return f"the scheduler is {name}, not Euler-type"
    if scheduler_config.get("prediction_type", "epsilon") != "epsilon":
        return f"the scheduler predicts {scheduler_config.get('prediction_type')}, not epsilon"
    if scheduler_config.get("timestep_spacing") != "trailing":
        return f"the scheduler's timestep spacing is {scheduler_config.get('timestep_spacing')}, not trailing"
    one = one_step_schedule(scheduler_config)
    last = scheduler_config.get("num_train_timesteps", 1000) - 1
    if one["timestep"] != last or one["sigma_next"] != 0.0:
        return f"its one step is at timestep {one['timestep']:g} to sigma {one['sigma_next']:g}, not {last} to 0"
    return None


def pipeline_fast_path_problem(pipe, steps: int, guidance: float) -> str | None:
    """fast_path_problem for a loaded pipeline."""
    return fast_path_problem(type(pipe).__name__, dict(pipe.scheduler.config), dict(pipe.unet.config), steps, guidance)


def draw_noise(seeds: list[int], batch: int, shape: tuple[int, ...], dtype, pin: bool = False):
    """(batch x shape noise, one generator per row): row i from seeds[i]'s own CPU generator, exactly as the
    pipeline draws it (`randn_tensor` with a list of CPU generators), rows past len(seeds) zero (padding).

    CPU-drawn noise is the same on every machine, so an image depends on its seed only. The generators are
    returned advanced past the draw: a multi-step ancestral scheduler goes on drawing from them."""
    import torch

    noise = torch.zeros((batch, *shape), dtype=dtype, pin_memory=pin)
    gens = []
    for i in range(batch):
        g = torch.Generator("cpu").manual_seed(seeds[i] if i < len(seeds) else 0)
        if i < len(seeds):
            noise[i] = torch.randn((1, *shape), generator=g, dtype=dtype)[0]
        gens.append(g)
    return noise, gens


def encode_texts(pipe, texts: list[str], device: str) -> tuple:
    """(prompt, None, pooled, None) embeddings of `texts` whatever the architecture: SDXL's encode_prompt gives
    a pooled embedding, SD 1.x/2.x's does not (None)."""
    import torch

    with torch.inference_mode():
        out = pipe.encode_prompt(texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return (*out, None, None)[:4]


class PromptTable:
    """Every prompt's text embeddings (one per class, or per (class, template) with several templates: row
    label x templates + template), encoded in batched calls (PROMPT_CHUNK prompts each) and kept on the
    device: all of them at start-up when the list is not huge, else each chunk when first needed.

    With guidance, the unconditional embeddings are the empty prompt's as the pipeline makes them (encoded,
    or zeros where an SDXL model says force_zeros_for_empty_prompt): the same for every class, so they are
    encoded once per worker, at start-up, and shared by every batch."""

    def __init__(self, pipe, prompts: list[str], device: str, with_negative: bool):
        self.pipe, self.prompts, self.device, self.with_negative = pipe, prompts, device, with_negative
        self.rows: dict[int, tuple] = {}
        self.encoder_calls = 0
        self.negative_calls = 0  # encode_prompt calls for the unconditional embeddings: 1 per worker with CFG
        self._negative: tuple = (None, None)

    def encode_all(self) -> None:
        if self.with_negative:
            self._encode_negative()
        if len(self.prompts) <= EAGER_PROMPT_LIMIT:
            for start in range(0, len(self.prompts), PROMPT_CHUNK):
                self._encode_chunk(start)

    def get(self, label: int | tuple[int, ...]) -> tuple:
        """(prompt, negative, pooled, negative pooled) embeddings of one row, each with a batch dim of 1
        (negatives None without guidance, pooled None for architectures without a pooled embedding); for a
        tuple of rows (a batch whose images use several templates), one row per image, in that order."""
        if isinstance(label, tuple):
            import torch

            parts = zip(*(self.get(row) for row in label))
            return tuple(None if p[0] is None else torch.cat(p) for p in parts)
        if label not in self.rows:
            self._encode_chunk(label - label % PROMPT_CHUNK)
        if self.with_negative and self.negative_calls == 0:
            self._encode_negative()
        pe, ppe = self.rows[label]
        npe, nppe = self._negative
        return pe, npe, ppe, nppe

    def _encode_negative(self) -> None:
        import torch

        # The empty prompt encoded as a prompt is what the pipelines encode as the negative; SDXL models that
        # say force_zeros_for_empty_prompt use zeros of that shape instead.
        npe, _, nppe, _ = encode_texts(self.pipe, [""], self.device)
        if getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
            npe, nppe = torch.zeros_like(npe), None if nppe is None else torch.zeros_like(nppe)
        self.negative_calls += 1
        self._negative = (npe, nppe)

    def _encode_chunk(self, start: int) -> None:
        labels = range(start, min(start + PROMPT_CHUNK, len(self.prompts)))
        pe, _, ppe, _ = encode_texts(self.pipe, [self.prompts[i] for i in labels], self.device)
        self.encoder_calls += 1
        for row, label in enumerate(labels):
            # Own storage per row: every class's tensors look alike to a compiled model (no offset to guard on).
            self.rows[label] = tuple(None if t is None else t[row : row + 1].clone() for t in (pe, ppe))


class FastEngine:
    """SDXL at one step without guidance, written out: no scheduler state, no host syncs, nothing per call
    but the UNet and one fused update; the timestep and time ids live on the device."""

    name = "fast"

    def __init__(
        self, pipe, prompts: PromptTable, batch_size: int, resolution: int, device: str, compile_mode=None,
        compile_scope: str = "model",
    ):  # fmt: skip
        import torch

        from gdd_ray.generate import tuning

        problem = pipeline_fast_path_problem(pipe, 1, 0.0)
        if problem:
            raise ValueError(f"the fast engine does not apply: {problem}")
        one = one_step_schedule(dict(pipe.scheduler.config))
        self.unet, self.prompts, self.batch_size = pipe.unet, prompts, batch_size
        self.init_sigma, self.input_scale, self.sigma = one["init_noise_sigma"], one["input_scale"], one["sigma"]
        dtype = pipe.unet.dtype
        self.t = torch.tensor(one["timestep"], dtype=torch.float32, device=device)
        # SDXL's micro-conditioning: original size, crop (0, 0), target size, all the drawn resolution.
        ids = [resolution, resolution, 0, 0, resolution, resolution]
        self.time_ids = torch.tensor([ids], dtype=dtype, device=device).repeat(batch_size, 1)
        expected = pipe.unet.add_embedding.linear_1.in_features
        given = pipe.unet.config.addition_time_embed_dim * len(ids) + pipe.text_encoder_2.config.projection_dim
        if expected != given:
            raise ValueError(f"the UNet expects an added embedding of {expected}, the fast path gives {given}")
        self._denoise = self._denoise_eager
        if compile_mode and compile_scope == "blocks":
            tuning.compile_blocks(self.unet, compile_mode)
        elif compile_mode:
            self._denoise = tuning.compile_callable(self._denoise_eager, compile_mode)

    def _denoise_eager(self, noise, prompt_embeds, pooled):
        import torch

        latents = noise * self.init_sigma
        eps = self.unet(
            latents / self.input_scale,
            self.t,
            encoder_hidden_states=prompt_embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": self.time_ids},
            return_dict=False,
        )[0]
        # The scheduler's step at sigma_next = 0 (in float32 like it, back to the UNet's dtype).
        return (latents.to(torch.float32) - self.sigma * eps).to(eps.dtype)

    def latents(self, noise, generators, label: int):
        """noise: batch_size x 4 x h x w on the device; generators unused (nothing more is drawn)."""
        import torch

        pe, _, ppe, _ = self.prompts.get(label)
        b = self.batch_size
        with torch.inference_mode():
            return self._denoise(noise, pe.expand(b, -1, -1), ppe.expand(b, -1))


class PipelineEngine:
    """The diffusers pipeline call itself, stopped at the latents (the decoder is shared with the fast path).

    The initial noise goes in as `latents` (the pipeline scales it by init_noise_sigma as if it had drawn
    it) and each image's generator, already advanced past that draw, as `generator`: the same draws as
    the pipeline alone makes, for any scheduler and step count."""

    name = "diffusers"

    def __init__(self, pipe, prompts: PromptTable, config, resolution: int, compile_mode=None, compile_scope="model"):
        from gdd_ray.generate import tuning

        self.pipe, self.prompts, self.config, self.resolution = pipe, prompts, config, resolution
        if compile_mode and compile_scope == "blocks":
            tuning.compile_blocks(pipe.unet, compile_mode)
        elif compile_mode:
            pipe.unet = tuning.compile_callable(pipe.unet, compile_mode)

    def latents(self, noise, generators, label: int):
        import torch

        pe, npe, ppe, nppe = self.prompts.get(label)
        b = noise.shape[0]
        # Embeddings, never strings: the text encoders ran once per class (and once for the negatives).
        kwargs = dict(prompt_embeds=pe.expand(b, -1, -1))
        if ppe is not None:  # SDXL's pooled text embedding (SD 1.x/2.x have none)
            kwargs.update(pooled_prompt_embeds=ppe.expand(b, -1))
        if self.config.guidance > 1.0:  # as in diffusers: guidance <= 1 means no unconditional pass
            kwargs.update(negative_prompt_embeds=npe.expand(b, -1, -1))
            if nppe is not None:
                kwargs.update(negative_pooled_prompt_embeds=nppe.expand(b, -1))
        with torch.inference_mode():
            return self.pipe(
                **kwargs,
                latents=noise,
                generator=generators,
                num_inference_steps=self.config.steps,
                guidance_scale=self.config.guidance,
                height=self.resolution,
                width=self.resolution,
                output_type="latent",
            ).images


def latent_shape(pipe, resolution: int) -> tuple[int, int, int]:
    side = resolution // pipe.vae_scale_factor
    return (pipe.unet.config.in_channels, side, side)
