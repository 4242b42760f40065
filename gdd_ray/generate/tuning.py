"""How the model runs on the device, never what it draws: each component's memory layout and torch.compile.

memory layout   contiguous (NCHW) or channels_last (NHWC) per component (the UNet, the image decoder),
                set and read back one module at a time; nothing is forced at load: which is faster is a
                per-device, per-component measurement (jobs/gpu_bench.sh records both per row)
compile         always `fullgraph=True` and `dynamic=False`: a graph break is an error at start-up, not
                a silent fall back to eager code, and shapes never change (every batch is --batch-size).
                Two scopes (--compile-scope):
    model       the whole denoise step and the whole decoder, one graph each (the steadiest state;
                CUDA graphs on a GPU)
    blocks      each repeated block (the UNet's transformer and ResNet blocks, the decoder's ResNet
                blocks) compiled in place, once per distinct shape: blocks of one shape share one graph,
                so a cold compile is a fraction of the whole model's; the glue between blocks stays eager
                (no CUDA graphs: a graph per block instance would be recorded)
"""

from __future__ import annotations

MEMORY_FORMATS = ("contiguous", "channels_last")
COMPILE_SCOPES = ("model", "blocks")
# The classes repeated through SDXL's (and SD 1.x/2.x's) UNet and VAE, and through AutoencoderTiny.
REPEATED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D", "AutoencoderTinyBlock")
# Distinct shapes of one block class a compiled region may see (SDXL's UNet and VAE: about 20 ResnetBlock2D
# shapes); Dynamo's default limit (8) would silently send the rest to eager code.
BLOCK_RECOMPILE_LIMIT = 64


def _torch_format(name: str):
    import torch

    if name not in MEMORY_FORMATS:
        raise ValueError(f"memory format {name!r}: one of {', '.join(MEMORY_FORMATS)}")
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def memory_format(module) -> str:
    """The layout of a module's 4-D weights as they are now (its first convolution's): what a row records."""
    import torch

    for p in module.parameters():
        # A 1x1 or single-channel kernel is both at once: the first weight that tells them apart decides.
        if p.dim() == 4 and p.is_contiguous() != p.is_contiguous(memory_format=torch.channels_last):
            return "contiguous" if p.is_contiguous() else "channels_last"
    return "contiguous"


def set_memory_format(module, name: str) -> str:
    """Put a module's 4-D weights in layout `name`; returns the layout it had, to set it back."""
    before = memory_format(module)
    module.to(memory_format=_torch_format(name))
    return before


def compile_callable(fn, mode: str):
    """A function compiled whole: one graph, static shapes, any graph break an error."""
    import torch

    return torch.compile(fn, dynamic=False, fullgraph=True, mode=mode)


def compile_blocks(module, mode: str) -> int:
    """Compile every repeated block of `module` in place (nn.Module.compile); returns how many. Raises when it
    has none (nothing would be compiled: the caller asked for something that cannot happen)."""
    import torch

    dynamo = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(dynamo, limit):
            setattr(dynamo, limit, max(getattr(dynamo, limit), BLOCK_RECOMPILE_LIMIT))
    if hasattr(dynamo, "accumulated_recompile_limit"):
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * BLOCK_RECOMPILE_LIMIT)
    blocks = [m for m in module.modules() if type(m).__name__ in REPEATED_BLOCKS]
    if not blocks:
        raise ValueError(f"{type(module).__name__} has none of the repeated blocks {REPEATED_BLOCKS} to compile")
    for block in blocks:
        block.compile(dynamic=False, fullgraph=True, mode=mode)
    return len(blocks)


def uncompile_blocks(module) -> None:
    """Undo compile_blocks (a benchmark's later rows run the same module eager)."""
    for m in module.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
