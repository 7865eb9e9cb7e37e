"""ParagonSR nodes: each a schema and a short ``execute`` over one call into :mod:`paragonsr`."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from paragonsr import (
    VARIANTS,
    ExportOptions,
    ParagonSR,
    UpscaleSettings,
    export_ncnn,
    export_onnx,
    fuse_for_release,
    load_descriptor,
    save_checkpoint,
    upscale,
)
from paragonsr.choices import MODES, PRECISIONS
from paragonsr.config import macs_per_pixel
from paragonsr.errors import ParagonSRError
from paragonsr.images import SAMPLE_DATASET, SAMPLE_IMAGE, read_image
from paragonsr.upscale import optimized_network, release_optimized

from . import comfy_bridge

CATEGORY = "image/upscaling/ParagonSR"
BUNDLED_DATASET = "(bundled sample photos)"


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
                optimized_network(descriptor)
        text = summary(descriptor)
        return io.NodeOutput(
            comfy_bridge.attach_patcher(descriptor), text, ui=comfy_bridge.show_text(text)
        )


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
        if image.ndim != 4 or image.shape[-1] not in (3, 4):
            raise ParagonSRError(
                f"Upscale Image (ParagonSR) takes RGB or RGBA images; this IMAGE has shape "
                f"{tuple(image.shape)}"
            )
        parameters = sum(p.numel() * p.element_size() for p in upscale_model.model.parameters())
        # The optimized copy (about the weights' size again) and room for tiles: the tile size
        # is then picked from what is free.
        device = comfy_bridge.load_for_inference(upscale_model, 2 * parameters + (256 << 20))
        settings = UpscaleSettings(
            tile=tile or None,
            mode=None if mode == "auto" else mode,
            overlap=overlap,
            precision=precision,
            alpha=alpha,
            device=device,
        )
        frames = image.movedim(-1, 1)
        try:
            result = upscale(
                upscale_model,
                frames,
                settings,
                tick=comfy_bridge.progress_ticker(),
                cancelled=comfy_bridge.interrupt_check(),
            )
        finally:
            # ComfyUI accounts for the model it loaded, not for our optimized copy of it: that
            # copy leaves the device with the node, whatever ComfyUI does with the model later.
            release_optimized(upscale_model)
        return io.NodeOutput(result.movedim(1, -1))


def paragonsr_model(descriptor) -> ParagonSR:
    model = getattr(descriptor, "model", None)
    if not isinstance(model, ParagonSR):
        raise ParagonSRError(
            f"this node needs a ParagonSR model, got {descriptor.architecture.name}"
        )
    return model


def independent_copy(model: ParagonSR):
    """A descriptor over fresh CPU tensors: node inputs are other nodes' cached outputs (and
    may be inference tensors), so they are never modified or traced in place."""
    return load_descriptor({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})


class FuseParagonSR(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ParagonSRFuse",
            display_name="Fuse ParagonSR",
            category=CATEGORY,
            description="Fold each spatial mixer's three branches into one convolution (the "
            "release form, key for key the original's) and optionally save it.",
            inputs=[
                io.UpscaleModel.Input("upscale_model", tooltip="A ParagonSR model."),
                io.Boolean.Input(
                    "save",
                    default=False,
                    tooltip="Also write the fused .safetensors into models/upscale_models.",
                ),
                io.String.Input(
                    "filename_prefix",
                    default="ParagonSR_fused",
                    tooltip="Name of the saved file, numbered so nothing is overwritten.",
                ),
            ],
            outputs=[io.UpscaleModel.Output(), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, upscale_model, save=False, filename_prefix="ParagonSR_fused"):
        source = paragonsr_model(upscale_model)
        # A new model: the input is a cached output of another node and must stay as it is.
        fused = independent_copy(source)
        fuse_for_release(fused.model)
        note = "already fused" if source.form == "fused" else "fused"
        if save:
            folder = comfy_bridge.upscale_models_directory()
            path = save_checkpoint(
                fused.model,
                comfy_bridge.numbered(folder, filename_prefix, ".safetensors"),
                metadata={"architecture": "ParagonSR", "form": "fused"},
            )
            note += f", saved as {path.name}"
        text = f"{summary(fused)} ({note})"
        return io.NodeOutput(
            comfy_bridge.attach_patcher(fused), text, ui=comfy_bridge.show_text(text)
        )


class ExportParagonSRONNX(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ParagonSRExportONNX",
            display_name="Export ParagonSR (ONNX / NCNN)",
            category=CATEGORY,
            description="Write an ONNX file (chaiNNer, onnxruntime, TensorRT) or an NCNN "
            ".param/.bin pair (Upscayl, realesrgan-ncnn-vulkan, chaiNNer) into the output "
            "folder, verified before it is kept.",
            is_output_node=True,
            inputs=[
                io.UpscaleModel.Input("upscale_model", tooltip="A ParagonSR model."),
                io.String.Input(
                    "filename_prefix",
                    default="ParagonSR",
                    tooltip="File name in the output folder, numbered.",
                ),
                io.Int.Input(
                    "opset",
                    default=17,
                    min=14,
                    max=20,
                    tooltip="14-20; chaiNNer's onnxruntime refuses 21.",
                ),
                io.Boolean.Input(
                    "fp16",
                    default=False,
                    tooltip="Half precision (GroupNorm statistics stay fp32).",
                ),
                io.Int.Input(
                    "static_size",
                    default=0,
                    min=0,
                    max=8192,
                    tooltip="0: dynamic height and width; N: fixed N x N input.",
                ),
                # Last, so that workflows saved before it existed keep their widget order.
                io.Combo.Input(
                    "format",
                    options=["ONNX", "NCNN"],
                    default="ONNX",
                    optional=True,  # workflows saved before it existed must still validate
                    tooltip="ONNX: one .onnx file. NCNN: a .param/.bin pair named "
                    "Nx-<prefix> (Upscayl reads the scale from the name); opset and "
                    "static_size apply to ONNX only.",
                ),
            ],
            outputs=[
                io.String.Output(display_name="path"),
                io.String.Output(display_name="report"),
            ],
        )

    @classmethod
    def execute(
        cls,
        upscale_model,
        filename_prefix="ParagonSR",
        opset=17,
        fp16=False,
        static_size=0,
        format="ONNX",  # noqa: A002 - the input's name in saved workflows
    ):
        model = paragonsr_model(upscale_model)
        if format == "NCNN":
            scale = model.config.scale
            folder = comfy_bridge.output_directory()
            path = comfy_bridge.numbered(folder, f"{scale}x-{filename_prefix}", ".param")
            with torch.inference_mode(False):
                report = export_ncnn(
                    independent_copy(model).model,
                    path,
                    fp16=fp16,
                    tick=comfy_bridge.progress_ticker(),
                )
            text = "\n".join(report.lines())
            return io.NodeOutput(str(path), text, ui=comfy_bridge.show_text(text))
        options = ExportOptions(
            opset=opset, fp16=fp16, static=(static_size, static_size) if static_size else None
        )
        path = comfy_bridge.numbered(comfy_bridge.output_directory(), filename_prefix, ".onnx")
        with torch.inference_mode(False):
            report = export_onnx(
                independent_copy(model).model, path, options, tick=comfy_bridge.progress_ticker()
            )
        text = "\n".join(report.lines())
        return io.NodeOutput(str(path), text, ui=comfy_bridge.show_text(text))


class TrainParagonSR(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ParagonSRTrain",
            display_name="Train ParagonSR (experimental)",
            category=CATEGORY,
            description="Train or fine-tune on a folder of HR images; Cancel saves a resumable "
            "state. Runs every time it is queued.",
            is_experimental=True,
            not_idempotent=True,
            inputs=[
                io.String.Input(
                    "dataset",
                    default=BUNDLED_DATASET,
                    tooltip="Folder of HR images: inside ComfyUI's input folder, an absolute "
                    f"path, or {BUNDLED_DATASET} (the two small photos that ship with the pack, "
                    "enough to try training).",
                ),
                io.Combo.Input(
                    "variant",
                    options=list(VARIANTS),
                    default="nano",
                    tooltip="Network size from the family table.",
                ),
                io.Int.Input("scale", default=2, min=1, max=8, tooltip="Upscaling factor."),
                io.Int.Input(
                    "iterations", default=2000, min=1, max=10_000_000, tooltip="Training steps."
                ),
                io.Int.Input("batch", default=8, min=1, max=256, tooltip="Patches per step."),
                io.Int.Input(
                    "lq_size", default=48, min=8, max=512, tooltip="LR patch size in pixels."
                ),
                io.Float.Input(
                    "learning_rate",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=1e-5,
                    tooltip="0: 5e-4 from scratch, 2e-5 when fine-tuning.",
                ),
                io.Combo.Input(
                    "init_model",
                    options=["none", *comfy_bridge.model_names()],
                    default="none",
                    tooltip="Fine-tune from this training-form "
                    "checkpoint instead of starting fresh.",
                ),
                io.String.Input(
                    "model_name",
                    default="ParagonSR_trained",
                    tooltip="Prefix of the EMA checkpoint written into models/upscale_models.",
                ),
                # Last, so that workflows saved before it existed keep their widget order.
                io.String.Input(
                    "validation",
                    default="",
                    optional=True,
                    tooltip="Folder of held-out HR images for the PSNR report (inside ComfyUI's "
                    "input folder, or an absolute path); its images never train. Empty: a "
                    "seeded tenth of the dataset (at least one image) is held out instead.",
                ),
            ],
            outputs=[io.UpscaleModel.Output(), io.String.Output(display_name="report")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # never equal to itself: training always runs again

    @classmethod
    def execute(
        cls,
        dataset,
        variant="nano",
        scale=2,
        iterations=2000,
        batch=8,
        lq_size=48,
        learning_rate=0.0,
        init_model="none",
        model_name="ParagonSR_trained",
        validation="",
    ):
        from paragonsr.train import TrainConfig, train

        data = (
            SAMPLE_DATASET
            if dataset == BUNDLED_DATASET
            else comfy_bridge.dataset_directory(dataset)
        )
        run = comfy_bridge.numbered(
            comfy_bridge.output_directory() / "paragonsr_runs", model_name, ""
        )
        config = TrainConfig(
            data=str(data),
            out=str(run),
            variant=variant,
            scale=scale,
            iters=iterations,
            batch=batch,
            lq_size=lq_size,
            lr=learning_rate or None,
            init=str(comfy_bridge.model_path(init_model)) if init_model != "none" else None,
            val=str(comfy_bridge.dataset_directory(validation)) if validation.strip() else None,
            val_every=max(1, iterations // 4),
            save_every=max(1, iterations // 4),
        )
        tick = comfy_bridge.progress_ticker()
        # ComfyUI runs every node under inference_mode; training needs autograd back.
        with torch.inference_mode(False), torch.enable_grad():
            result = train(
                config,
                progress=lambda r: tick(r["iteration"], iterations),
                cancelled=comfy_bridge.interrupted,
            )
        if result.cancelled:
            comfy_bridge.raise_if_interrupted()  # the resumable state is saved in the run
        target = comfy_bridge.numbered(
            comfy_bridge.upscale_models_directory(), model_name, ".safetensors"
        )
        descriptor = load_descriptor(result.model_path)
        save_checkpoint(
            descriptor.model, target, metadata={"architecture": "ParagonSR", "form": "training"}
        )
        lines = [
            f"trained {result.iteration} iterations in {result.seconds:.0f} s; "
            f"saved {target.name} (run folder {run}, log {result.log_path.name})",
            f"validation on {result.validation_source}",
        ]
        lines += [
            f"iteration {r['iteration']}: PSNR {r['psnr']:.2f} dB, bicubic "
            f"{r['bicubic']:.2f} dB ({r['psnr'] - r['bicubic']:+.2f} dB)"
            for r in result.validation
        ]
        text = "\n".join(lines)
        return io.NodeOutput(
            comfy_bridge.attach_patcher(descriptor), text, ui=comfy_bridge.show_text(text)
        )


class ParagonSRSampleImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ParagonSRSampleImage",
            display_name="ParagonSR Sample Image",
            category=CATEGORY,
            description="The small CC0 photo that ships with the pack (160x120), so the example "
            "workflows run on a fresh install; use Load Image for your own pictures.",
            inputs=[],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(read_image(SAMPLE_IMAGE).pixels.movedim(1, -1))


NODES = [
    LoadParagonSR,
    FuseParagonSR,
    UpscaleParagonSR,
    ExportParagonSRONNX,
    TrainParagonSR,
    ParagonSRSampleImage,
]
