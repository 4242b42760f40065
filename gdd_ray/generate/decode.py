"""Latents -> stored pixels, all on the device: the image decoder (the model's VAE, or the tiny
AutoencoderTiny) in the dtype it was loaded in, then diffusers' denormalisation, the anti-aliased resize to
the stored size and the uint8 quantisation, so only small uint8 images ever leave the device.

The latent unscaling follows StableDiffusionXLPipeline: `z * latents_std / scaling_factor + latents_mean`
when the decoder's config has both, else `z / scaling_factor` (AutoencoderTiny's factor is 1.0).
"""

from __future__ import annotations


class Decoder:
    def __init__(
        self, module, resolution: int, image_size: int, watermark=None, compile_mode: str | None = None,
        compile_scope: str = "model",
    ):  # fmt: skip
        import torch

        from gdd_ray.generate import tuning

        self.module, self.resolution, self.image_size, self.watermark = module, resolution, image_size, watermark
        param = next(module.parameters())
        self.dtype = param.dtype
        cfg = module.config
        self.scaling = cfg.scaling_factor
        self.mean = self.std = None
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            shape = (1, len(cfg.latents_mean), 1, 1)
            self.mean = torch.tensor(cfg.latents_mean, dtype=self.dtype, device=param.device).view(shape)
            self.std = torch.tensor(cfg.latents_std, dtype=self.dtype, device=param.device).view(shape)
        self._decode, self._finish = self._decode_eager, self._finish_eager
        if compile_mode and compile_scope == "blocks":
            tuning.compile_blocks(module, compile_mode)  # the resize and quantisation stay eager: a few ops
        elif compile_mode:
            self._decode = tuning.compile_callable(self._decode_eager, compile_mode)
            self._finish = tuning.compile_callable(self._finish_eager, compile_mode)

    def _decode_eager(self, latents):
        z = latents.to(self.dtype)  # the latents' cast, never the weights'
        z = z * self.std / self.scaling + self.mean if self.mean is not None else z / self.scaling
        return self.module.decode(z, return_dict=False)[0]  # [-1, 1] at the drawn resolution

    def _finish_eager(self, image):
        import torch
        import torch.nn.functional as F

        image = (image.float() * 0.5 + 0.5).clamp(0, 1)  # diffusers' denormalize, in float32
        if self.image_size != self.resolution:
            image = F.interpolate(image, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
        return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)

    def decode(self, latents):
        """Latents -> decoded images in [-1, 1] at the drawn resolution (the decoder's dtype)."""
        import torch

        with torch.inference_mode():
            return self._decode(latents)

    def finish(self, image):
        """Decoded images -> N x S x S x 3 uint8 at the stored size, still on the device."""
        import torch

        with torch.inference_mode():
            if self.watermark is not None:  # only where the pipeline has one (invisible-watermark installed)
                image = self.watermark.apply_watermark(image)
            return self._finish(image)
