"""What one in-loop evaluation of DiT-XL/2 at 256 px costs on G GPUs (default: 10,000 class-conditional samples on 8
A100s), computed, not measured, and its share of the training time between two evaluations.

    .venv/bin/python bench/eval_cost.py [--samples 10000] [--gpus 8] [--sampler-steps 250] [--guidance-scale 1.5]
                                        [--peak-tflops 312] [--mfu 0.4] [--train-mfu 0.4]
                                        [--train-steps-between-evals 50000] [--global-batch 256]

An evaluation here is what an FID/FD_DINOv2 evaluation of a latent DiT does per sample: sample 32x32x4 latents with
the DiT (sampler steps x 1 forward, or 2 with classifier-free guidance, which batches a conditional and an
unconditional half), decode them with the sd-vae-ft-mse VAE decoder to 256x256, and read each image with Inception-v3
(299x299, for FID) and DINOv2 ViT-L/14 (224x224, for FD_DINOv2). It counts model FLOPs (2 per multiply-add) and turns
them into seconds at an assumed MFU of the dense bf16 peak; it runs in a few seconds on a CPU, no GPU, no weights.

Where each figure comes from
- DiT forward: orchestrator/jobs/estimate.dit_forward_macs (reproduces the DiT paper's Table 4, 118.6 G multiply-adds
  for DiT-XL/2 at 256 px; matmuls only), x 2 for FLOPs. Training per image: estimate.training_flops_per_image
  (3 x forward, 4 x with activation checkpointing).
- VAE decoder, Inception-v3, DINOv2: counted by torch.utils.flop_counter.FlopCounterMode on one image, with the
  networks built on the `meta` device (shapes only, no weights, no arithmetic). The counter counts matmuls,
  convolutions and attention (2 FLOPs per multiply-add); norms, activations, pooling and resizing are left out.
  - VAE: diffusers AutoencoderKL with the stabilityai/sd-vae-ft-mse config (block_out_channels 128/256/512/512,
    layers_per_block 2, 4 latent channels, 3 image channels, sample_size 256), `decode` of one 1x4x32x32 latent
    (post_quant_conv + decoder).
  - Inception-v3: torch-fidelity's FID Inception (FeatureExtractorInceptionV3, the TF-FID graph) where torch-fidelity
    is importable; its forward to the 2048-d pool features. Otherwise the commonly quoted 5.71 G multiply-adds at
    299x299 (torchvision's model table for Inception_V3_Weights.IMAGENET1K_V1, "GFLOPS 5.71"; timm's card "GMACs
    5.7"), which the count reproduces.
  - DINOv2 ViT-L/14: transformers Dinov2Model from a Dinov2Config with facebook/dinov2-large's sizes (hidden 1024,
    24 layers, 16 heads, MLP ratio 4 = intermediate 4096, patch 14) at image_size 224 (257 tokens with CLS; the
    published config says 518, which only changes the stored position table, interpolated to 224 in use). Checked
    against the ViT formula printed beside it.
- Peaks: NVIDIA datasheets, dense bf16: A100 312 TFLOPS, H100 SXM / H200 989 (pass --peak-tflops).

How to compare with a measured evaluation
Run a DiT-XL/2 job (256 px latents of sd-vae-ft-mse) on the same G GPUs with eval.num_samples 10000, eval.sampler
ddpm, eval.steps 250, eval.guidance_scale 1.5, eval.metrics [fid, fd_dinov2], and read `eval/seconds` from MLflow
(rank 0 logs it at each evaluation: the wall time of the whole evaluation, the gathering of features and the metrics
included); the trainer's `step_time_s` is the training side. Then
    measured evaluation MFU = this script's total TFLOP / (eval/seconds x G x peak TFLOPS)
    measured overhead       = eval/seconds / (step_time_s x train-steps-between-evals)
and likewise per line where the evaluation logs its parts. Compare like with like: without fd_dinov2 leave out the
DINOv2 line (kid and precision_recall reuse the Inception features); an evaluator that does not decode latents or run
a feature network (at commit 8f56f4f it reads 8x8 digits with a small classifier only) is held against the
generation line alone. Left out here: the Frechet distances themselves (matrix square roots of 2048x2048 and
1024x1024, seconds on rank 0), KID's and precision/recall's kernels and neighbours, the all-gather of the features,
the resize to 299 / 224 px, and evaluation batches too small to fill the GPU.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from model.sizes import DIT_PRESETS  # noqa: E402
from orchestrator.jobs.estimate import dit_forward_macs, training_flops_per_image  # noqa: E402

NUM_CLASSES = 1000
VAE_DOWNSAMPLE = 8  # sd-vae-ft-mse halves 3 times: 256 px -> 32x32 latents
LATENT_CHANNELS = 4
# stabilityai/sd-vae-ft-mse config.json (the AutoencoderKL fields that change the work)
SD_VAE_FT_MSE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=LATENT_CHANNELS,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=256,
)
INCEPTION_SIZE = 299
INCEPTION_V3_MACS_QUOTED = 5.71e9  # torchvision's model table (Inception_V3_Weights.IMAGENET1K_V1), at 299x299
DINOV2_SIZE = 224
# facebook/dinov2-large: ViT-L/14
DINOV2_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14)


def counted_flops(forward) -> int:
    """FLOPs of `forward()` (a closure over a network built on the meta device) as FlopCounterMode counts them."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward()
    return counter.get_total_flops()


def vae_decoder_flops(latent_side: int) -> int:
    """FLOPs of decoding one 4 x side x side latent with sd-vae-ft-mse's AutoencoderKL (post_quant_conv + decoder)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE_FT_MSE).eval()
        latent = torch.empty(1, LATENT_CHANNELS, latent_side, latent_side)
        return counted_flops(lambda: vae.decode(latent).sample)


def inception_flops(image_side: int) -> tuple[int, str]:
    """FLOPs of torch-fidelity's FID Inception-v3 on one image (it resizes to 299 first), and where the figure is from.
    Its constructor loads weights: that step is stubbed out, the network is built on meta."""
    from unittest import mock

    from orchestrator.errors import UserError
    from orchestrator.evaluation.features import inception_extractor_class

    try:
        extractor_class = inception_extractor_class()
    except UserError:
        return round(2 * INCEPTION_V3_MACS_QUOTED), "quoted 5.71 G multiply-adds (torch-fidelity not installed)"
    module = sys.modules[extractor_class.__module__]
    with (
        mock.patch.object(extractor_class, "load_state_dict", lambda self, state_dict: None),
        mock.patch.object(module, "load_state_dict_from_url", lambda *args, **kwargs: {}),
        torch.device("meta"),
    ):
        net = extractor_class("inception-v3-compat", ["2048"])
        images = torch.empty(1, 3, image_side, image_side, dtype=torch.uint8)
        flops = counted_flops(lambda: net(images))
    return flops, (
        "counted: torch-fidelity FeatureExtractorInceptionV3 to the 2048-d features; commonly quoted: 5.71 G "
        "multiply-adds = 11.4 GFLOP"
    )


def dinov2_flops(image_side: int) -> int:
    """FLOPs of transformers' Dinov2Model with ViT-L/14's sizes on one image_side x image_side image."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(**DINOV2_LARGE, image_size=image_side)
    with torch.device("meta"):
        net = Dinov2Model(config).eval()
        images = torch.empty(1, 3, image_side, image_side)
        return counted_flops(lambda: net(pixel_values=images))


def vit_forward_macs(depth: int, hidden: int, patch: int, image_side: int, mlp_ratio: int, cls_tokens: int = 1) -> int:
    """Multiply-adds of a plain ViT encoder (patch embedding, qkv, proj, MLP, attention; no head): the cross-check."""
    patches = (image_side // patch) ** 2
    tokens = patches + cls_tokens
    per_token = hidden * 3 * hidden + hidden * hidden + 2 * hidden * mlp_ratio * hidden
    return patches * 3 * patch * patch * hidden + depth * (tokens * per_token + 2 * tokens * tokens * hidden)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="DiT-XL/2", choices=sorted(DIT_PRESETS))
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (latents are 1/8 of it)")
    parser.add_argument("--samples", type=int, default=10_000, help="samples per evaluation (eval.num_samples)")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--sampler-steps", type=int, default=250, help="DDPM steps (the DiT paper's FID-50K: 250)")
    parser.add_argument("--guidance-scale", type=float, default=1.5, help="> 1: two DiT forwards per step (cfg)")
    parser.add_argument("--peak-tflops", type=float, default=312, help="dense bf16 peak per GPU (A100: 312)")
    parser.add_argument("--mfu", type=float, default=0.4, help="MFU of the evaluation (all its networks)")
    parser.add_argument("--train-mfu", type=float, default=0.4, help="MFU of training")
    parser.add_argument("--train-steps-between-evals", type=int, default=50_000)
    parser.add_argument("--global-batch", type=int, default=256, help="training images per optimizer step")
    parser.add_argument("--checkpointing", action="store_true", help="training with activation checkpointing (4x fwd)")
    args = parser.parse_args()

    dims = DIT_PRESETS[args.model]
    latent_side = args.resolution // VAE_DOWNSAMPLE
    dit_macs = dit_forward_macs(
        dims["depth"], dims["hidden_size"], dims["patch_size"], LATENT_CHANNELS, latent_side, learn_sigma=True
    )
    forwards_per_step = 2 if args.guidance_scale > 1 else 1
    generation_per_image = args.sampler_steps * forwards_per_step * 2 * dit_macs
    vae_per_image = vae_decoder_flops(latent_side)
    inception_per_image, inception_source = inception_flops(args.resolution)
    dinov2_per_image = dinov2_flops(DINOV2_SIZE)
    dinov2_formula = 2 * vit_forward_macs(
        DINOV2_LARGE["num_hidden_layers"],
        DINOV2_LARGE["hidden_size"],
        DINOV2_LARGE["patch_size"],
        DINOV2_SIZE,
        DINOV2_LARGE["mlp_ratio"],
    )

    peak = args.peak_tflops * 1e12
    per_rank = math.ceil(args.samples / args.gpus)  # orch: sample i on rank i mod G; the busiest rank sets the time
    rate = args.mfu * peak  # FLOP/s per GPU

    train_per_image = training_flops_per_image(dit_macs, args.checkpointing)
    train_per_step = args.global_batch * train_per_image
    train_between = args.train_steps_between_evals * train_per_step
    train_seconds = train_between / (args.gpus * args.train_mfu * peak)

    print(f"In-loop evaluation cost of {args.model} at {args.resolution} px: computed, not measured.\n")
    print("Assumptions:")
    for note in (
        f"Model: {args.model}, {LATENT_CHANNELS}x{latent_side}x{latent_side} latents, {NUM_CLASSES} classes, learned "
        f"sigma, class-conditional; forward {dit_macs / 1e9:.1f} G multiply-adds = {2 * dit_macs / 1e9:.1f} GFLOP "
        "(estimate.dit_forward_macs; DiT paper Table 4: 118.6 for XL/2 at 256 px).",
        f"Evaluation: {args.samples:,} samples on {args.gpus} GPUs ({per_rank:,} on the busiest rank), "
        f"DDPM {args.sampler_steps} steps, guidance scale {args.guidance_scale:g} = {forwards_per_step} DiT "
        f"forward{'s' if forwards_per_step > 1 else ''} per step (cfg batches a conditional and a null-class half).",
        f"Decode: sd-vae-ft-mse decoder, {latent_side}x{latent_side}x4 -> {args.resolution}x{args.resolution}x3, once "
        "per sample (after guidance): FlopCounterMode on meta.",
        f"Features: Inception-v3 at {INCEPTION_SIZE}x{INCEPTION_SIZE} ({inception_source}); DINOv2 ViT-L/14 at "
        f"{DINOV2_SIZE}x{DINOV2_SIZE}, 257 tokens (FlopCounterMode on meta; ViT formula: "
        f"{dinov2_formula / 1e9:.1f} GFLOP). Real-data statistics are precomputed, not part of an evaluation.",
        f"GPU: {args.peak_tflops:g} TFLOPS dense bf16 peak; evaluation at {args.mfu:.0%} MFU = "
        f"{rate / 1e12:.1f} TFLOP/s per GPU, for every network alike (the VAE decoder's convolutions and group norms "
        "likely run below it).",
        f"Training: global batch {args.global_batch}, {train_per_image / 1e9:.0f} GFLOP per image "
        f"({'4' if args.checkpointing else '3'} x forward, estimate.training_flops_per_image), "
        f"{args.train_steps_between_evals:,} steps between evaluations, {args.train_mfu:.0%} MFU.",
        "FLOPs: 2 per multiply-add; matmuls, convolutions and attention only (norms, activations, resizing left out). "
        "TFLOP = 1e12 FLOPs.",
    ):
        print(f"- {note}")

    components = [
        (
            f"generation ({args.sampler_steps} steps x {forwards_per_step} DiT fwd)",
            generation_per_image,
        ),
        ("VAE decode (sd-vae-ft-mse)", vae_per_image),
        (f"Inception-v3 features ({INCEPTION_SIZE} px)", inception_per_image),
        (f"DINOv2 ViT-L/14 features ({DINOV2_SIZE} px)", dinov2_per_image),
    ]
    total_per_image = sum(flops for _, flops in components)
    eval_seconds = per_rank * total_per_image / rate

    print()
    print(f"{'component':<40} {'GFLOP/image':>12} {'TFLOP/eval':>12} {f'seconds on {args.gpus} GPUs':>18} {'share':>7}")
    for name, flops in components + [("total evaluation", total_per_image)]:
        if name == "total evaluation":
            print("-" * 93)
        seconds = per_rank * flops / rate
        print(
            f"{name:<40} {flops / 1e9:>12,.1f} {args.samples * flops / 1e12:>12,.0f} {seconds:>18,.1f} "
            f"{flops / total_per_image:>7.1%}"
        )

    print()
    print(f"{'training between evaluations':<40} {'':>12} {train_between / 1e12:>12,.0f} {train_seconds:>18,.0f}")
    print(
        f"  per step: {train_per_step / 1e12:,.1f} TFLOP = {train_per_step / (args.gpus * args.train_mfu * peak):.3f} "
        f"s on {args.gpus} GPUs; {args.train_steps_between_evals:,} steps = {train_seconds / 3600:.2f} h"
    )
    print(
        f"evaluation overhead: {eval_seconds:,.0f} s ({eval_seconds / 60:.1f} min) per evaluation = "
        f"{eval_seconds / train_seconds:.1%} of the training time between evaluations "
        f"({eval_seconds / (eval_seconds + train_seconds):.1%} of the wall time)"
    )


if __name__ == "__main__":
    main()
