"""ParagonSR nodes: each a schema and a short ``execute`` over one call into :mod:`paragonsr`."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from paragonsr import UpscaleSettings, load_descriptor, upscale
from paragonsr.arch import macs_per_pixel
from paragonsr.tiling import MODES, PRECISIONS

from . import comfy_bridge

CATEGORY = "image/upscaling/ParagonSR"


def summary(descriptor) -> str:
    model = getattr(descriptor, "model", None)
    config = getattr(model, "config", None)
    if config is None:
        return f"{descriptor.architecture.name} x{descriptor.scale} ({', '.join(descriptor.tags)})"
    params = sum(p.numel() for p in model.parameters())
    return (
        f"ParagonSR {model.form}, {' '.join(descriptor.tags[:1])} x{config.scale}: "
        f"{config.num_feat} features, {config.num_groups}x{config.num_blocks} blocks, "
        f"{params:,} parameters, {macs_per_pixel(config, 'optimized'):,} MACs per input pixel"
    )


class LoadParagonSR(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ParagonSRLoader",
            display_name="Load ParagonSR",
            category=CATEGORY,
            description="Load a ParagonSR checkpoint (training or fused form) from "
            "models/upscale_models; every hyper-parameter is read from the file.",
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=comfy_bridge.model_names(),
                    tooltip="A ParagonSR .safetensors/.pth/.ckpt file in models/upscale_models.",
                ),
                io.Boolean.Input(
                    "optimize",
                    default=True,
                    tooltip="Build the inference-optimized network now (folded "
                    "LayerScale/GroupNorm, collapsed upsampler), not on first use.",
                ),
            ],
            outputs=[io.UpscaleModel.Output(), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, model_name: str, optimize: bool = True) -> io.NodeOutput:
        descriptor = load_descriptor(comfy_bridge.model_path(model_name))
        if optimize:
            with torch.inference_mode():
                descriptor.model.optimized()
        return io.NodeOutput(comfy_bridge.attach_patcher(descriptor), summary(descriptor))


class UpscaleParagonSR(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ParagonSRUpscale",
            display_name="Upscale Image (ParagonSR, tiled)",
            category=CATEGORY,
            description="Upscale with ParagonSR in exact mode (tiled, equal to whole-image "
            "inference) or any upscale model in overlap mode.",
            inputs=[
                io.UpscaleModel.Input(
                    "upscale_model",
                    tooltip="From Load ParagonSR or the "
                    "stock Load Upscale Model (any spandrel model).",
                ),
                io.Image.Input("image", tooltip="Images or video frames; RGBA keeps its alpha."),
                io.Int.Input(
                    "tile",
                    default=0,
                    min=0,
                    max=8192,
                    step=32,
                    tooltip="Tile size in input pixels; 0 picks one from free memory.",
                ),
                io.Combo.Input(
                    "mode",
                    options=["auto", *MODES],
                    default="auto",
                    tooltip="exact: whole-image result in tile memory (ParagonSR); "
                    "overlap: independent blended tiles; auto picks exact for "
                    "ParagonSR.",
                ),
                io.Int.Input(
                    "overlap",
                    default=32,
                    min=0,
                    max=512,
                    tooltip="Overlap mode: pixels of context shared by neighbours.",
                ),
                io.Combo.Input(
                    "precision",
                    options=list(PRECISIONS),
                    default="auto",
                    tooltip="auto: fp32 on the CPU; bf16/fp16 on CUDA only where "
                    "the model is known to be safe; inf/NaN frames redo in fp32.",
                ),
                io.Combo.Input(
                    "alpha",
                    options=["bilinear", "model"],
                    default="bilinear",
                    tooltip="How an alpha channel is upscaled.",
                ),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(
        cls,
        upscale_model,
        image,
        tile=0,
        mode="auto",
        overlap=32,
        precision="auto",
        alpha="bilinear",
    ) -> io.NodeOutput:
        device = comfy_bridge.load_device(upscale_model)
        settings = UpscaleSettings(
            tile=tile or None,
            mode=None if mode == "auto" else mode,
            overlap=overlap,
            precision=precision,
            alpha=alpha,
            device=device,
        )
        parameters = sum(p.numel() * p.element_size() for p in upscale_model.model.parameters())
        comfy_bridge.make_room(device, parameters * 4 + (256 << 20))
        frames = image.movedim(-1, 1)
        result = upscale(
            upscale_model,
            frames,
            settings,
            tick=comfy_bridge.progress_ticker(),
            cancelled=comfy_bridge.interrupt_check(),
        )
        return io.NodeOutput(result.movedim(1, -1))


NODES = [LoadParagonSR, UpscaleParagonSR]
