"""The job spec: one frozen tree of typed sections, parsed and validated once, at the edge.

Every part of orch speaks this vocabulary. Nothing here imports torch: `orch validate` and
`orch submit` check a spec in a fraction of a second.

Precedence is `--set a.b=c` over the YAML file over the defaults below, applied by
`load_spec` (the one function that does it). Unknown keys, wrong types and impossible values
raise `SpecError`, whose message names the YAML path and line and suggests the near miss.
"""

from __future__ import annotations

import hashlib
import json
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from launch.deepspeed import DEFAULT_BUCKET_SIZE
from launch.torchrun import check_host_port
from model.sizes import DIT_PRESETS
from orchestrator.specs.base import (
    CROPS,
    HUB_FIELDS,
    MAX_CLASSES,
    MAX_COUNT,
    MAX_NODES,
    MAX_PROCESSES,
    MAX_RESOLUTION,
    MAX_SEED,
    MAX_TIMEOUT_S,
    MAX_TIMESTEPS,
    MAX_WIDTH,
    Beta,
    Channels,
    HubDatasetFields,
    Section,
    SpecError,
    did_you_mean,
    flatten,
    load_yaml,
    load_yaml_with_lines,
    parse_override,
    read_spec_text,
    set_path,
    validate_tree,
)

SPEC_VERSION = 1


# Short names accepted for a field, rewritten to the field's own name before validation.
ALIASES = {("train", "lr"): "learning_rate"}


def precision_refusal(strategy: str, mixed_precision: str) -> str | None:
    """Why a strategy cannot train in a precision, or None: fp16's loss scaling is the DDP engine's alone here
    (the spec refuses it, and the FSDP and ZeRO engines once more for callers that skip the spec)."""
    if mixed_precision == "fp16" and strategy != "ddp":
        return (
            f"resources.strategy {strategy} trains in bf16 or fp32 here; "
            "fp16 (loss scaling) is supported with ddp only, use bf16"
        )
    return None


def device_precision_refusal(device: str, mixed_precision: str) -> str | None:
    """Why a device cannot train in a precision, or None: fp16 needs a GPU (checked by the plan where the device
    is known there, and by the rank on its node where it is `auto` on a Slurm node)."""
    if mixed_precision == "fp16" and device == "cpu":
        return "train.mixed_precision fp16 needs a GPU; on CPU use bf16 (or no)"
    return None


class UNetSpec(Section):
    down_channels: list[Channels] = Field([32, 64, 128, 256], min_length=1, max_length=16)
    """Channels of each resolution level of the down path (Ho et al. 2020 use 128 x (1, 2, 2, 2) at 32 px)."""
    mid_channels: list[Channels] = Field([256, 256, 128], max_length=16)
    """Channels through the middle block; the first equals the last down channel, the last feeds the up path."""
    down_sample: list[bool] = Field([True, True, False], max_length=15)
    """Whether each down level (one fewer than down_channels) halves the resolution."""
    num_down_layers: int = Field(2, ge=1, le=64)
    """ResNet blocks per down level."""
    num_mid_layers: int = Field(2, ge=1, le=64)
    """ResNet blocks in the middle."""
    num_up_layers: int = Field(2, ge=1, le=64)
    """ResNet blocks per up level."""
    num_heads: int = Field(4, ge=1, le=1024)
    """Heads of the self-attention blocks."""
    time_emb_dim: int = Field(128, ge=8, le=MAX_WIDTH)
    """Width of the timestep embedding."""
    attention: bool = True
    """Self-attention in the down/up levels below full resolution and in the middle."""
    norm_groups: int = Field(8, ge=1, le=MAX_WIDTH)
    """GroupNorm groups; must divide every channel count."""

    @model_validator(mode="after")
    def _consistent_levels(self) -> UNetSpec:
        if len(self.down_sample) != len(self.down_channels) - 1:
            raise ValueError(
                f"down_sample has {len(self.down_sample)} entries; {len(self.down_channels)} down_channels need "
                f"{len(self.down_channels) - 1}"
            )
        if len(self.mid_channels) < 2 or self.mid_channels[0] != self.down_channels[-1]:
            raise ValueError(
                f"mid_channels {self.mid_channels} must have at least 2 entries and start with the last down channel "
                f"{self.down_channels[-1]}"
            )
        bad = [c for c in self.down_channels + self.mid_channels if c % self.norm_groups]
        if bad:
            raise ValueError(f"channels {bad} are not divisible by norm_groups {self.norm_groups}")
        return self


# The model fields that configure a DiT (arch unet takes its layout from model.unet).
DIT_FIELDS = (
    "preset",
    "patch_size",
    "hidden_size",
    "depth",
    "num_heads",
    "mlp_ratio",
    "conditioning",
    "ffn",
    "pos_embed",
    "learn_sigma",
)


class ModelSpec(Section):
    arch: Literal["dit", "unet"] = "dit"
    """Network family: `dit`, the Diffusion Transformer (Peebles & Xie 2023); `unet`, the DDPM U-Net (Ho et al. 2020),
    configured in model.unet."""
    conditioning: Literal["adaln_zero", "adaln", "cross_attention", "in_context"] = "adaln_zero"
    """DiT block conditioning: adaLN-Zero (the paper's best), adaLN (modulation not zero-initialised), cross-attention
    to condition tokens, or condition tokens in context."""
    condition: Literal["class", "text", "none"] = "class"
    """What the model is conditioned on: the class label (with a null class for guidance), a caption's precomputed text
    embeddings (with a learned null caption), or nothing."""
    ffn: Literal["mlp", "conv"] = "mlp"
    """DiT feed-forward: `mlp`, or `conv` (1x1 expand, 3x3 depthwise conv over the patch grid, GELU, 1x1 project;
    LocalViT)."""
    pos_embed: Literal["sincos", "learned"] = "sincos"
    """DiT position embedding: fixed 2-D sin-cos, or learned (initialised from sin-cos)."""
    learn_sigma: bool = False
    """Also predict the variance (twice the output channels), trained with diffusion.loss: hybrid (Nichol & Dhariwal
    2021)."""
    init_from: str | None = None
    """Weights to start from (a .safetensors or a published DiT .pt in the official layout); keys must match exactly."""
    unet: UNetSpec = UNetSpec()
    """U-Net layout (arch: unet only)."""
    preset: str | None = None
    """A named size of the DiT paper (`DiT-S/2`, `DiT-B/4`, `DiT-L/8`, `DiT-XL/2`, ...); sets depth, hidden_size,
    num_heads and patch_size."""
    patch_size: int = Field(2, ge=1, le=MAX_RESOLUTION)
    """Side of the square patches the image (or latent) is cut into; must divide data.resolution."""
    hidden_size: int = Field(384, ge=8, le=MAX_WIDTH)
    """Transformer width D."""
    depth: int = Field(12, ge=1, le=1024)
    """Number of DiT blocks."""
    num_heads: int = Field(6, ge=1, le=1024)
    """Attention heads per block; must divide hidden_size."""
    mlp_ratio: float = Field(4.0, gt=0, le=64)
    """Width of the feed-forward layer as a multiple of hidden_size (int(hidden_size x mlp_ratio) units, at least 1)."""
    class_dropout: float = Field(0.1, ge=0, lt=1)
    """Probability of replacing a label by the null class in training (what classifier-free guidance needs; 0 turns
    guidance off)."""
    num_classes: int | None = Field(None, ge=1, le=MAX_CLASSES)
    """Number of classes; empty means: as many as the data has."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout in training only. DiT: on the output of every attention and feed-forward sublayer (timm's proj_drop and
    Mlp drop: after the activation and after fc2); 0, the DiT paper's, adds no layer. U-Net: in every ResNet block,
    before its second convolution (Ho et al. 2020 use 0.1 on CIFAR-10)."""

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        preset = data["preset"]
        if not isinstance(preset, str) or preset not in DIT_PRESETS:
            return data  # _known_preset names the problem
        merged = dict(data)
        for key, value in DIT_PRESETS[preset].items():
            if key in data and data[key] != value:
                raise ValueError(f"{key}={data[key]} contradicts preset {preset} ({key}={value}); drop one of them")
            merged[key] = value
        return merged

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str | None) -> str | None:
        if preset is not None and preset not in DIT_PRESETS:
            raise ValueError(
                f"unknown preset {preset!r}{did_you_mean(preset, DIT_PRESETS)} (valid: {', '.join(DIT_PRESETS)})"
            )
        return preset

    @model_validator(mode="after")
    def _arch_options(self) -> ModelSpec:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if int(self.hidden_size * self.mlp_ratio) < 1:
            raise ValueError(
                f"mlp_ratio {self.mlp_ratio} x hidden_size {self.hidden_size} leaves the feed-forward layer without a "
                "unit: hidden_size x mlp_ratio must be at least 1 (mlp_ratio 4 is the DiT paper's)"
            )
        defaults = ModelSpec.model_fields
        if self.arch == "unet":
            dit_only = [f for f in DIT_FIELDS if getattr(self, f) != defaults[f].default]
            if dit_only:
                raise ValueError(f"{', '.join(dit_only)} configure a DiT; arch unet takes its layout from model.unet")
        elif self.unet != UNetSpec():
            raise ValueError("model.unet configures arch: unet; remove it or set arch: unet")
        return self


FLOW_SAMPLERS = ("euler", "heun")
DDPM_SAMPLERS = ("ddpm", "ddim", "dpm_solver++")
CONTINUOUS_SAMPLERS = ("ddim", "ddpm")


class DiffusionSpec(Section):
    objective: Literal["ddpm", "flow", "continuous"] = "ddpm"
    """`ddpm`: discrete-time diffusion (Ho et al. 2020) with the beta schedule and prediction below. `flow`: rectified
    flow / flow matching (SiT, Ma et al. 2024; Stable Diffusion 3, Esser et al. 2024): x_t = (1 - t) x0 + t noise, the
    network predicts the velocity noise - x0 and sees t x num_train_timesteps; sampled with `euler` or `heun`.
    `continuous`: variance-preserving diffusion in continuous time, t ~ U(0, 1), alpha and sigma from the cosine
    schedule (Nichol & Dhariwal 2021), the network sees t x num_train_timesteps and predicts `prediction` (default
    there: `sample`, x0); sampled with `ddim` (deterministic) or `ddpm` (ancestral)."""
    num_train_timesteps: int = Field(1000, ge=2, le=MAX_TIMESTEPS)
    """Number of noise levels T of the forward process (`flow`: the scale of the network's time input)."""
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    """Noise schedule: `linear` (Ho et al. 2020), `scaled_linear` (linear in sqrt(beta), Stable Diffusion's) or
    `squaredcos_cap_v2` (the cosine schedule of Nichol & Dhariwal 2021)."""
    beta_start: float = Field(1e-4, gt=0, lt=1)
    """First beta of the linear schedule."""
    beta_end: float = Field(0.02, gt=0, lt=1)
    """Last beta of the linear schedule."""
    prediction: Literal["epsilon", "sample", "v_prediction"] = "epsilon"
    """What the network predicts: `epsilon` (the added noise), `sample` (the clean image x0) or `v_prediction` (Salimans
    & Ho 2022)."""
    loss: Literal["mse", "hybrid"] = "mse"
    """`mse` on the prediction, or `hybrid`: MSE plus 0.001 x the variational bound, which trains a learned variance
    (model.learn_sigma)."""
    min_snr_gamma: float | None = Field(None, gt=0)
    """`ddpm`: weight each sample's loss by min(SNR(t), gamma) in the form of the prediction (Hang et al. 2023, who use
    gamma 5: epsilon min(SNR, g)/SNR, v_prediction min(SNR, g)/(SNR + 1), sample min(SNR, g)); empty: unweighted."""
    timestep_sampling: Literal["uniform", "logit_normal"] | None = None
    """`flow`: how training draws t: `uniform`, or `logit_normal` (SD3's, the default: more weight mid-path)."""
    logit_mean: float | None = Field(None, ge=-20, le=20)
    """`flow` with logit_normal: the mean of the normal whose sigmoid is t (default 0)."""
    logit_std: float | None = Field(None, gt=0, le=20)
    """`flow` with logit_normal: its standard deviation (default 1)."""
    shift: float | None = Field(None, gt=0)
    """`flow`: SD3's time shift t' = s t / (1 + (s - 1) t), in training and sampling (default 1: none; SD3 uses 3 at
    1024 px)."""

    @model_validator(mode="after")
    def _fields_of_the_objective(self) -> DiffusionSpec:
        defaults = {name: field.default for name, field in type(self).model_fields.items()}
        if self.objective == "flow":
            ddpm_only = ["beta_schedule", "beta_start", "beta_end", "prediction", "loss", "min_snr_gamma"]
            given = [name for name in ddpm_only if getattr(self, name) != defaults[name]]
            if given:
                raise ValueError(
                    f"{', '.join(given)} belong(s) to objective ddpm; objective flow takes timestep_sampling, "
                    "logit_mean, logit_std and shift: remove them"
                )
        elif self.objective == "continuous" and any(
            getattr(self, name) != defaults[name] for name in ("beta_schedule", "beta_start", "beta_end", "loss")
        ):
            given = [n for n in ("beta_schedule", "beta_start", "beta_end", "loss") if getattr(self, n) != defaults[n]]
            raise ValueError(
                f"{', '.join(given)} belong(s) to objective ddpm; objective continuous has the cosine schedule and the "
                "mse loss: remove them"
            )
        if self.objective != "flow":
            flow_only = ["timestep_sampling", "logit_mean", "logit_std", "shift"]
            given = [name for name in flow_only if getattr(self, name) is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)} belong(s) to objective flow; set diffusion.objective: flow or remove them"
                )
            if self.min_snr_gamma is not None and self.loss == "hybrid":
                raise ValueError("min_snr_gamma weights the mse loss; the hybrid loss keeps its own weighting")
        if self.timestep_sampling == "uniform" and (self.logit_mean is not None or self.logit_std is not None):
            raise ValueError("logit_mean and logit_std shape timestep_sampling: logit_normal, not uniform")
        return self

    @property
    def samplers(self) -> tuple[str, ...]:
        """The samplers of the objective."""
        return {"flow": FLOW_SAMPLERS, "continuous": CONTINUOUS_SAMPLERS}.get(self.objective, DDPM_SAMPLERS)


class DataSpec(HubDatasetFields):
    source: Literal["digits", "image_folder", "webdataset", "hf_dataset"] = "digits"
    """`digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes). `image_folder`: one
    sub-folder of images per class. `hf_dataset`: images of a Hugging Face `datasets` dataset (a Hub name such as
    `ylecun/mnist`, or a local save_to_disk folder or parquet / arrow files), read with random access from its
    memory-mapped cache. `webdataset`: VAE latents (and caption embeddings) in shards written by `orch prepare`; the
    model then works in latent space."""
    path: str | None = None
    """Folder of an `image_folder` source; for `hf_dataset` the Hub name or local path; for `webdataset`, the folder
    `orch prepare` wrote (shards and index.json) or a brace pattern of some of its shards
    (`data/cats/shard-{000000..000099}.tar`). Relative paths are relative to the spec file."""
    label_column: str | None = None
    """hf_dataset: the column of class labels (a ClassLabel, whose names are the classes, or integers); empty: `label`
    when the dataset has one. An unconditional model (model.condition none) reads none."""
    crop: Literal[CROPS] = "center_crop"
    """image_folder, hf_dataset: how an image becomes resolution x resolution: `center_crop` (ADM's) or `resize` (the
    whole image stretched to the square, as torchvision's Resize((R, R)))."""
    on_bad_sample: Literal["skip", "fail"] = "skip"
    """A sample found unreadable while training (a corrupt image, a damaged shard: everything a shard's damage hides
    counts): `skip` replaces it in its micro batch by the next readable sample of that batch (batch shapes and bitwise
    resume hold), with a warning naming it and `bad_samples` in MLflow and `orch status`; more than max_bad_samples in a
    run fail the job, as does a micro batch with no readable sample (a damaged shard much larger than
    data.shuffle_buffer can fill whole batches). `fail`: the first one fails the job, naming it."""
    max_bad_samples: int = Field(1000, ge=0, le=MAX_COUNT)
    """on_bad_sample skip: the most unreadable samples one run replaces before it fails the job."""
    resolution: int = Field(8, ge=2, le=MAX_RESOLUTION)
    """Side of the square training images, in pixels (for `webdataset`: of the images that were encoded; the latents'
    side is what the model sees)."""
    channels: Literal[1, 3] | None = None
    """1 (grey) or 3 (RGB); empty means the source's own (digits: 1, image_folder: 3; webdataset: the latents'
    channels)."""
    hflip: bool = False
    """Also train on horizontally flipped images (a deterministic flip per sample and epoch); for `webdataset`, flipped
    copies are made by `orch prepare`."""
    shuffle_buffer: int = Field(1000, ge=1, le=MAX_COUNT)
    """`webdataset`: samples each DataLoader worker shuffles among (shards are also shuffled per epoch)."""
    num_workers: int = Field(0, ge=0, le=MAX_PROCESSES)
    """DataLoader worker processes per rank (0 loads in the training process)."""

    @model_validator(mode="after")
    def _source_fields(self) -> DataSpec:
        if self.source in ("image_folder", "webdataset", "hf_dataset") and not self.path:
            what = {
                "image_folder": "a folder with one sub-folder per class",
                "webdataset": "the folder `orch prepare` wrote",
                "hf_dataset": "a Hub dataset name or a local copy",
            }[self.source]
            raise ValueError(f"source {self.source} needs data.path ({what})")
        misplaced = self.hub_fields_misplaced(self.source)
        misplaced += ["label_column"] if self.label_column is not None and self.source != "hf_dataset" else []
        misplaced += (
            ["crop"] if self.crop != "center_crop" and self.source not in ("image_folder", "hf_dataset") else []
        )
        if misplaced:
            raise ValueError(f"data.{', data.'.join(sorted(misplaced))} do(es) not apply to source {self.source}")
        if self.source == "digits" and self.path:
            raise ValueError("source digits ships with scikit-learn and takes no data.path; remove it")
        if self.source == "digits" and self.channels == 3:
            raise ValueError("the digits are grey: data.channels must be 1 (or empty)")
        if self.source == "webdataset" and self.channels is not None:
            raise ValueError("source webdataset takes its channels from the latents; remove data.channels")
        if self.source == "webdataset" and self.hflip:
            raise ValueError(
                "latents cannot be flipped in training; let `orch prepare` add flipped copies (its image.flip) and "
                "remove data.hflip"
            )
        return self

    @property
    def explicit_columns(self) -> tuple[str, ...]:
        """The column fields the spec sets: those must exist in the data."""
        return ("image_column",) + (("label_column",) if self.label_column is not None else ())

    @property
    def latent(self) -> bool:
        """Whether the model works in a VAE's latent space (prepared shards) rather than on pixels."""
        return self.source == "webdataset"

    @property
    def has_text(self) -> bool:
        """Whether the source can carry caption embeddings (what model.condition: text trains on; `orch plan` checks the
        shards have them)."""
        return self.source == "webdataset"

    @property
    def num_channels(self) -> int:
        """Channels of the pixel images (not of latents: those come from the prepared dataset's index)."""
        return self.channels or (1 if self.source == "digits" else 3)


class OneCycleSpec(Section):
    pct_start: float = Field(0.3, gt=0, lt=1)
    """Share of the steps spent rising to the peak learning rate (torch's OneCycleLR pct_start)."""
    div_factor: float = Field(25.0, gt=0)
    """The first learning rate is the peak (train.learning_rate, torch's max_lr) / div_factor."""
    final_div_factor: float = Field(1e4, gt=0)
    """The last learning rate is the first / final_div_factor."""
    anneal: Literal["cos", "linear"] = "cos"
    """How the rate moves between those points (torch's anneal_strategy)."""


class TrainSpec(Section):
    steps: int = Field(ge=1, le=MAX_COUNT)
    """Optimizer steps to train for (the job ends after this many)."""
    global_batch_size: int = Field(128, ge=1, le=MAX_COUNT)
    """Images per optimizer step over all ranks; split as micro batch x ranks x grad_accum_steps."""
    grad_accum_steps: int = Field(1, ge=1, le=MAX_COUNT)
    """Micro batches accumulated before each optimizer step."""
    learning_rate: float = Field(1e-4, gt=0)
    """Peak AdamW learning rate (also accepted as `lr`)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""
    adam_betas: tuple[Beta, Beta] = (0.9, 0.999)
    """AdamW betas (beta1, beta2), each 0 <= beta < 1."""
    adam_eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    warmup_steps: int = Field(0, ge=0, le=MAX_COUNT)
    """Steps of linear learning-rate warmup from 0."""
    lr_schedule: Literal["constant", "cosine", "linear", "one_cycle"] = "constant"
    """Learning rate after warmup: constant, or a cosine / linear decay to min_lr_ratio x peak at the last step; or
    `one_cycle` (Smith & Topin 2017, torch's OneCycleLR over train.steps with train.one_cycle's settings: its own
    rise, so no warmup_steps or min_lr_ratio)."""
    one_cycle: OneCycleSpec = OneCycleSpec()
    """lr_schedule one_cycle: its settings."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Floor of the decaying schedules, as a fraction of the peak learning rate."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; empty turns clipping off."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision: `no` (fp32), `bf16` (CPU or GPU), `fp16` (GPU only, with a gradient scaler)."""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    """Seed of weights, data order and noise; the same seed gives bitwise the same run on the same hardware and thread
    count: always on the CPU, on CUDA with resources.deterministic."""
    max_nonfinite_steps: int = Field(25, ge=1, le=MAX_COUNT)
    """A step whose gradients are not finite (NaN or inf, from any rank's loss) is skipped: no optimizer or EMA update,
    counted as `skipped_steps` in MLflow. After this many skipped steps in a row the job stops as failed ("loss
    not finite since step N"); no checkpoint with non-finite weights is ever written. fp16's loss-scale overflows count
    too (a few in a row are normal while the scale settles)."""

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no_is_a_word(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false


class EmaSpec(Section):
    decay: float = Field(0.9999, ge=0, lt=1)
    """Largest EMA decay, reached once the warmup is over."""
    warmup_power: float = Field(0.75, ge=0)
    """EMA warmup: decay after n updates is min(decay, 1 - (1 + n)^-power); 0 uses `decay` from the start."""
    update_every: int = Field(1, ge=1, le=MAX_COUNT)
    """Update the EMA weights every this many optimizer steps."""


# What each eval.metrics entry logs (MLflow keys, also in JOB/eval/step-N.json), and which keys grow with quality.
EVAL_METRIC_KEYS = {
    "fid": ("eval/fid",),
    "kid": ("eval/kid", "eval/kid_std"),
    "fd_dinov2": ("eval/fd_dinov2",),
    "precision_recall": ("eval/precision", "eval/recall"),
    "fd_digits": ("eval/fd_digits",),
    "digit_accuracy": ("eval/digit_accuracy",),
}
HIGHER_IS_BETTER = frozenset({"eval/precision", "eval/recall", "eval/digit_accuracy"})
PRECISION_RECALL_K = 3  # neighbours of the k-NN manifold estimate (Kynkaanniemi et al. 2019; the ADM suite's k)


class KeepBestSpec(Section):
    metric: str = "eval/fid"
    """The evaluation metric that ranks checkpoints (`eval/fid`, `fid`, `eval/digit_accuracy`, ...): lower is better for
    distances, higher for accuracy, precision and recall."""
    count: int = Field(1, ge=1, le=MAX_COUNT)
    """How many of the best checkpoints to keep, beyond checkpoint.keep newest."""

    @field_validator("metric")
    @classmethod
    def _metric_key(cls, metric: str) -> str:
        key = metric if metric.startswith("eval/") else f"eval/{metric}"
        known = sorted(k for keys in EVAL_METRIC_KEYS.values() for k in keys if not k.endswith("_std"))
        if key not in known:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(known)}")
        return key

    @property
    def higher_is_better(self) -> bool:
        return self.metric in HIGHER_IS_BETTER


class CheckpointSpec(Section):
    every: int = Field(1000, ge=1, le=MAX_COUNT)
    """Write a checkpoint every this many steps (and always at the end and on preemption)."""
    keep: int = Field(3, ge=1, le=MAX_COUNT)
    """How many of the newest checkpoints to keep."""
    keep_best: KeepBestSpec | None = None
    """Also keep the best checkpoints by an evaluation metric (needs eval.every; every evaluation step then writes a
    checkpoint). `orch sample/export/eval JOB --checkpoint best` take the best one; `orch status` names it."""
    on_write_error: Literal["stop", "continue"] = "stop"
    """A checkpoint that cannot be written (a full disk or quota: checked before each write against the size of the
    newest checkpoint) leaves the previous one intact. `stop`: the job fails with the path and the bytes needed.
    `continue`: training goes on without that checkpoint (a warning, `checkpoint_failures` in MLflow and `orch status`)
    and tries again at the next one; the final checkpoint and one on a stop signal must still be written."""


FINAL_PROGRESSION_FRAMES = 8  # the strip at the end of training where sample.progression asks for none with every grid


class SampleSpec(Section):
    every: int = Field(1000, ge=1, le=MAX_COUNT)
    """Draw a sample grid from the EMA weights every this many steps (and at the end)."""
    sampler: Literal["ddpm", "ddim", "dpm_solver++", "euler", "heun"] = "ddim"
    """Reverse process: for objective ddpm `ddpm` (ancestral, Ho et al.), `ddim` (deterministic, Song et al. 2021) or
    `dpm_solver++` (2nd order, Lu et al. 2022); for objective flow the ODE's `euler` (the default there) or `heun` (2nd
    order, two network calls per step but the last)."""
    steps: int = Field(50, ge=1, le=MAX_TIMESTEPS)
    """Denoising steps of the sampler."""
    guidance_scale: float = Field(1.0, ge=1)
    """Classifier-free guidance scale; 1 samples the conditional model without guidance."""
    classes: list[Annotated[int, Field(ge=0, lt=MAX_CLASSES)]] | None = Field(None, min_length=1, max_length=1024)
    """Class of each grid row (0 to num_classes - 1); empty means the first min(10, num_classes) classes."""
    text_rows: int = Field(4, ge=1, le=1024)
    """Text models: grid rows, one per caption of the dataset's first captioned samples (drawn from their stored
    embeddings)."""
    per_class: int = Field(8, ge=1, le=1024)
    """Images per grid row."""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    """Seed of the fixed noise the grids start from, so grids of different steps are comparable."""
    progression: int = Field(0, ge=0, le=MAX_TIMESTEPS)
    """With every grid, also log a strip per grid row (an unconditional model: its first 8 images) of the model's x0
    prediction at this many evenly spaced steps of the grid's own reverse process, the first and the last among them
    (the DDPM paper's Fig. 6): `progression` in MLflow, samples/progression-N.png. 0: only with the grid at the end of
    training, at 8 steps (fewer if the sampler has fewer)."""

    @field_validator("progression")
    @classmethod
    def _progression_fits_the_sampler(cls, progression: int, info: ValidationInfo) -> int:
        steps = info.data.get("steps")  # absent where steps itself is wrong (that error is reported)
        if progression == 1:
            raise ValueError(
                "1 would show the sample alone: a strip needs at least 2 points (the first and the last step); set 2 "
                "or more, or 0 for a strip at the end of training only"
            )
        if steps is not None and progression > steps:
            raise ValueError(
                f"{progression} asks for more x0 predictions than the sampler's {steps} steps (sample.steps) give: "
                f"lower it to at most {steps}, or raise sample.steps"
            )
        return progression


class EvalSpec(Section):
    every: int | None = Field(None, ge=1, le=MAX_COUNT)
    """Evaluate the EMA weights every this many steps and at the end of training; empty: no evaluation."""
    metrics: (
        tuple[Literal["fid", "kid", "fd_dinov2", "precision_recall", "fd_digits", "digit_accuracy"], ...] | None
    ) = None
    """`fid` (Inception-v3 pool features, Heusel et al. 2017), `kid` (Binkowski et al. 2018), `precision_recall`
    (Kynkaanniemi et al. 2019, k=3, on Inception features), `fd_dinov2` (Fréchet distance in DINOv2 ViT-L/14 features,
    Stein et al. 2023): on images of 32 px or more. For the 8x8 digits: `fd_digits`, the Fréchet distance in the
    features of a small digit classifier (trained once, cached; what MNIST diffusion papers do with LeNet), and
    `digit_accuracy`, how many class-conditional samples it reads as their class. Empty: the digits' pair for
    data.source digits, else `fid`."""
    num_samples: int = Field(1000, ge=2, le=MAX_COUNT)
    """Samples drawn per evaluation, split over the ranks; each is seeded by its index, so the images do not depend
    on the number of ranks. Classes take turns (sample i is of class i mod num_classes)."""
    sampler: Literal["ddpm", "ddim", "dpm_solver++", "euler", "heun"] | None = None
    """Reverse process of the evaluation samples; empty: sample.sampler."""
    steps: int | None = Field(None, ge=1, le=MAX_TIMESTEPS)
    """Denoising steps; empty: sample.steps."""
    guidance_scale: float | None = Field(None, ge=1)
    """Classifier-free guidance scale; empty: sample.guidance_scale."""
    batch_size: int = Field(500, ge=1, le=MAX_COUNT)
    """Samples a rank draws at once."""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    """Seed of the evaluation samples' noise (not of training: an evaluation leaves the training run as it was)."""
    reference: str | None = None
    """The real images the samples are compared with: a reference batch in the ADM suite's .npz layout (`arr_0`: uint8
    N x H x W x 3, with `mu` and `sigma` of its Inception features, as the published ImageNet references have; FID then
    uses those statistics), or a folder of images. Empty: the job's own training data (image_folder, hf_dataset,
    digits). Relative paths are relative to the spec file."""
    reference_samples: int = Field(50_000, ge=2, le=MAX_COUNT)
    """At most this many real images make the reference (evenly spread over the training data); their features are
    computed once and cached under $ORCH_CACHE/reference, keyed by the data, the feature network and the resolution."""
    weights_dir: str | None = None
    """Where the feature networks' weights are (Inception-v3: weights-inception-2015-12-05-6726825d.pth; DINOv2:
    dinov2-large/); empty: $ORCH_WEIGHTS, else $ORCH_CACHE/weights, else ~/.cache/orch/weights. Nothing is downloaded
    by a job: `orch validate` names a missing file and the command that fetches it."""

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """The MLflow keys an evaluation logs (besides eval/seconds)."""
        return tuple(key for metric in self.metrics or () for key in EVAL_METRIC_KEYS[metric])


REGISTERED_MODEL_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,255}$"
"""A registered model name orch accepts: a subset of MLflow's (which refuses `/` and `:`) that every registry takes."""


def check_registered_model_name(name: str) -> str:
    """`name` if tracking.register_as takes it (`orch export --register-as`), else SpecError saying what it takes."""
    if not re.fullmatch(REGISTERED_MODEL_NAME, name):
        raise SpecError(
            f"registered model name {name!r}: use 1 to 256 letters, digits, `_`, `-` and `.`, not starting with `-` or "
            "`.`"
        )
    return name


class TrackingSpec(Section):
    enabled: bool = True
    """Log to MLflow (rank 0 only)."""
    uri: str | None = None
    """MLflow tracking URI; empty means $MLFLOW_TRACKING_URI, else sqlite:///<job root>/mlflow.db."""
    experiment: str = "orch"
    """MLflow experiment name."""
    log_every: int = Field(10, ge=1, le=MAX_COUNT)
    """Log metrics every this many steps."""
    system_metrics: bool = True
    """MLflow's system metrics (CPU, memory, disk, network; GPU utilisation and memory through nvidia-ml-py on GPU
    nodes), sampled by each node's first rank under system/node<k>/ (the run's System metrics tab)."""
    system_metrics_every_s: float = Field(10.0, ge=0.5)
    """Seconds between two system-metrics samples (MLflow's default 10; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
    overrides it)."""
    log_model: bool = True
    """At the end of a finished job, log the final checkpoint's EMA weights, the spec and a loader as the run's MLflow
    model `model` (a pyfunc whose predict draws images; see the README). A failure to log is a warning, never a
    failed job."""
    register_as: str | None = Field(None, pattern=REGISTERED_MODEL_NAME)
    """Also register that model as a new version of this MLflow registered model (letters, digits, `_`, `-`, `.`;
    at most 256 characters); empty registers nothing."""


class SlurmSpec(Section):
    partition: str | None = None
    """`sbatch --partition`."""
    account: str | None = None
    """`sbatch --account`."""
    qos: str | None = None
    """`sbatch --qos`."""
    constraint: str | None = None
    """`sbatch --constraint` (node features, e.g. `a100&ib`)."""
    time: str | None = None
    """Time limit per run, Slurm's format (`1-00:00:00`, `12:00:00`, or minutes); empty is the partition's default."""
    signal_seconds: int = Field(300, ge=1, le=65535)
    """Seconds before the time limit when Slurm warns the job (SIGUSR1): the ranks checkpoint and the job requeues
    itself."""
    requeue: bool = True
    """Requeue after a preemption, a node failure or the time-limit warning; the next run resumes from the newest
    checkpoint."""
    cpus_per_task: int | None = Field(None, ge=1, le=MAX_PROCESSES)
    """CPUs for each node's task (its ranks and their DataLoader workers); empty asks for processes x (data.num_workers
    + 2): per rank one CPU per loader worker plus two for the rank itself (8 GPUs with 4 workers each: 48). Not capped:
    if the nodes have fewer CPUs, sbatch refuses the job and this must be set. The ranks' threads are these CPUs divided
    by the ranks (unless threads_per_process is set)."""
    mem: str | None = None
    """Memory per node (`sbatch --mem`), Slurm's format: megabytes, or a size with a K, M, G or T suffix (`256G`); `0`
    asks for all of each node's memory (some sites refuse it). Empty is the partition's default (often memory per CPU,
    so it grows with cpus_per_task)."""
    sbatch_extra: list[str] = []
    """More `#SBATCH` options, each starting with `--` (e.g. `--exclusive`, `--mail-type=END,FAIL`)."""
    setup: list[str] = []
    """Shell lines run before training on each run (module loads, environment activation)."""

    @field_validator("time", mode="before")
    @classmethod
    def _minutes_as_text(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # YAML reads `time: 90` (minutes) as a number; launch.slurm checks the format
        return value

    @field_validator("mem", mode="before")
    @classmethod
    def _memory_size(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # YAML reads `mem: 0` or `mem: 64000` as a number
        if isinstance(value, str) and not re.fullmatch(r"\d+[KMGTkmgt]?", value):
            raise ValueError(
                f"mem {value!r} is not a Slurm memory size; write megabytes (64000) or a size with a K, M, G or T "
                "suffix (256G)"
            )
        return value


class DeepSpeedSpec(Section):
    offload_optimizer: bool = False
    """ZeRO-Offload: the fp32 master weights and AdamW state live in CPU memory and DeepSpeed's CPU Adam steps them
    there (less GPU memory, a slower step). Known limit: a resume continues from the newest checkpoint but is not bit
    for bit the uninterrupted run (measured with ZeRO-3 on CPU; without offload ZeRO resumes bitwise)."""
    offload_params: bool = False
    """ZeRO-3 only: the weight partitions live in CPU memory too and are fetched layer by layer (with
    offload_optimizer)."""
    reduce_bucket_size: int = Field(DEFAULT_BUCKET_SIZE, ge=1, le=MAX_COUNT)
    """Elements per gradient reduce-scatter bucket (DeepSpeed's default); smaller saves memory, larger overlaps
    better."""
    allgather_bucket_size: int = Field(DEFAULT_BUCKET_SIZE, ge=1, le=MAX_COUNT)
    """ZeRO-1/2: elements per all-gather bucket of the updated weights."""
    overlap_comm: bool | None = None
    """Overlap gradient reduction with the backward pass (more memory for buckets); empty is DeepSpeed's default (on for
    ZeRO-3, off for 1/2)."""
    config_file: str | None = None
    """A DeepSpeed JSON of your own, laid over the one orch builds (e.g. `zero_optimization` tuning, `comms_logger`);
    batch sizes, accumulation, clipping, precision and the optimizer come from the spec and may only repeat its values
    (or say "auto")."""


class DdpSpec(Section):
    bucket_mb: int = Field(25, ge=1, le=65536)
    """MiB per gradient all-reduce bucket (torch DDP's bucket_cap_mb)."""


class ResourcesSpec(Section):
    launcher: Literal["auto", "local", "torchrun", "accelerate", "deepspeed", "slurm"] = "auto"
    """How ranks are started: `local` (one plain process), `torchrun`, `accelerate`, `deepspeed` (DeepSpeed's launcher:
    every host of `hosts` / `hostfile` started over ssh from node 0), or `slurm` (an sbatch job of `nodes` nodes,
    torchrun on each); `auto` is local for 1 process on 1 node, torchrun otherwise."""
    hosts: list[str] = []
    """launcher deepspeed: the nodes' host names, node 0 (where `orch submit` runs) first; sets `nodes`. Each needs
    passwordless ssh from node 0, pdsh on node 0, and the job root on a shared filesystem."""
    hostfile: str | None = None
    """launcher deepspeed: a hostfile (`HOST slots=N` per line, DeepSpeed/MPI style) instead of `hosts`; its hosts and
    slots must match `nodes` and `processes`."""
    ssh_port: int | None = Field(None, ge=1, le=65535)
    """launcher deepspeed: the ssh port of the hosts (empty: ssh's own default or ~/.ssh/config)."""
    slurm: SlurmSpec = SlurmSpec()
    """Slurm settings (launcher: slurm)."""
    gpus_per_node: int | None = Field(None, ge=1, le=MAX_PROCESSES)
    """GPUs per node, one rank each (sets `processes`; needs CUDA: device cuda or auto)."""
    processes: int = Field(1, ge=1, le=MAX_PROCESSES)
    """Ranks per node: one per GPU (see gpus_per_node), or on CPU the DDP ranks over gloo."""
    nodes: int = Field(1, ge=1, le=MAX_NODES)
    """Machines, each running `processes` ranks; node 0 runs `orch submit`, every other node `orch join JOB --node-rank
    N` (the job directory on a shared filesystem)."""
    rdzv_endpoint: str | None = None
    """HOST:PORT where the nodes' ranks meet (a free port on node 0): torchrun's c10d rendezvous, required when nodes >
    1; for launcher deepspeed the master address (default: the first host, port 29500)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` uses CUDA when a GPU is visible, else the CPU. With launcher slurm it is decided on the compute node,
    never on the host that submits: `cuda` asks for one GPU per rank (`--gpus-per-node`); `auto` asks for GPUs only when
    gpus_per_node is set, and each node's worker then uses CUDA if its allocation holds a GPU, else the CPU; `cpu` asks
    for none."""
    strategy: Literal["ddp", "fsdp", "zero1", "zero2", "zero3"] = "ddp"
    """How the model is spread over the ranks: `ddp` (replicated, accelerate's DDP), `fsdp` (PyTorch FSDP2: weights,
    gradients and optimizer states sharded per block) or DeepSpeed ZeRO stage 1 (optimizer states sharded), 2 (and
    gradients), 3 (and weights); the EMA is kept of the full weights on every rank."""
    ddp: DdpSpec = DdpSpec()
    """Settings of strategy ddp."""
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    """Settings of the ZeRO strategies (zero1, zero2, zero3)."""
    activation_checkpointing: bool = False
    """Recompute each transformer / U-Net block's activations in the backward pass instead of keeping them: about a
    third more compute for much less activation memory (any strategy)."""
    compile: bool = False
    """torch.compile each transformer / U-Net block (blocks of one shape share one compiled graph; DDP and FSDP keep
    overlapping their communication with the backward pass block by block). The first step takes longer while it
    compiles; the weights train within float rounding of eager. Not with strategy zero3 (its gather hooks run inside
    each block)."""
    tf32: bool = True
    """On CUDA (Ampere and newer): fp32 matmuls and convolutions run on TF32 tensor cores, as the DiT reference training
    does; false for strict fp32. No effect on CPU."""
    collective_timeout_s: int = Field(600, ge=10, le=MAX_TIMEOUT_S)
    """Seconds a collective may wait for the other ranks (a stuck or vanished rank on another node) before the job
    fails, resumable, instead of hanging."""
    hang_timeout_s: float | None = Field(1800, ge=10, le=MAX_TIMEOUT_S)
    """Seconds without a finished training step after which every rank writes its threads' Python stacks into the job's
    log and the job stops (and starts again from its newest checkpoint while max_restarts remain): a rank stuck in a
    collective or a data read. Checkpoints, sample grids, evaluations and the first step (compiling) are not watched;
    they have their own timeouts. Empty: no watchdog."""
    max_restarts: int = Field(0, ge=0, le=MAX_COUNT)
    """Times a failed run (a crash, a lost or hung rank) starts again by itself from the newest checkpoint: torchrun's
    elastic restarts (--max-restarts, all ranks) for launcher torchrun and, in the same allocation, for launcher slurm
    (a lost node ends the allocation: Slurm requeues the job, see resources.slurm.requeue); the supervisor for local
    and deepspeed. Counted in the job's state (`restarts`, shown by `orch status`) and the MLflow tag `orch.restarts`.
    The supervisor does not restart a spec error or a loss that is not finite (it would fail again the same way)."""
    rank0_timeout_s: int = Field(3600, ge=10, le=MAX_TIMEOUT_S)
    """Seconds the other ranks wait while rank 0 works alone (drawing a sample grid, converting a ZeRO checkpoint to
    another world size), outside NCCL's collective timeout; a DDPM-1000 grid of a large model can take minutes."""
    deterministic: bool = False
    """On CUDA: deterministic algorithms only (torch.use_deterministic_algorithms, cuDNN deterministic and without
    autotuning, cuBLAS with a fixed workspace), so that a resumed run repeats the uninterrupted one bit for bit, as it
    always does on the CPU. Costs speed (measured in bench/results/); an op without a deterministic kernel stops the job
    with torch's error naming it."""
    threads_per_process: int | None = Field(None, ge=1, le=MAX_PROCESSES)
    """CPU threads per rank (OMP_NUM_THREADS); empty means the machine's cores divided by the ranks (launcher slurm: the
    compute node's allocated CPUs, slurm.cpus_per_task, divided by its ranks)."""

    @model_validator(mode="before")
    @classmethod
    def _gpus_set_processes(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and isinstance(raw.get("hosts"), list) and raw["hosts"]:
            hosts, nodes = raw["hosts"], raw.get("nodes")
            if nodes is not None and nodes != len(hosts):
                raise ValueError(
                    f"nodes {nodes} and hosts ({len(hosts)} listed) disagree: hosts sets the node count; set only hosts"
                )
            raw = {**raw, "nodes": len(hosts)}
        if isinstance(raw, dict) and raw.get("gpus_per_node") is not None:
            gpus, processes = raw["gpus_per_node"], raw.get("processes")
            if processes is not None and processes != gpus:
                raise ValueError(
                    f"gpus_per_node {gpus} and processes {processes} disagree: one rank runs per GPU; set only "
                    "gpus_per_node"
                )
            if raw.get("device") == "cpu":
                raise ValueError("gpus_per_node needs device cuda (or auto); on CPU set processes instead")
            raw = {**raw, "processes": gpus}
        return raw

    @model_validator(mode="after")
    def _launcher_fits(self) -> ResourcesSpec:
        if self.launcher == "local" and self.processes > 1:
            raise ValueError(
                f"launcher local starts one process; use torchrun or accelerate for processes={self.processes}"
            )
        if self.strategy.startswith("zero") and self.launcher == "accelerate":
            raise ValueError(
                f"strategy {self.strategy} starts through torchrun (or local, deepspeed, slurm): accelerate launch "
                "would switch DeepSpeed off on CPU"
            )
        if self.slurm != SlurmSpec() and self.launcher != "slurm":
            raise ValueError("resources.slurm configures launcher: slurm; set it, or remove the slurm section")
        if self.deepspeed != DeepSpeedSpec() and not self.strategy.startswith("zero"):
            raise ValueError(
                f"resources.deepspeed configures the ZeRO strategies, not {self.strategy}; set strategy zero1, zero2 "
                "or zero3, or remove the deepspeed section"
            )
        if self.ddp != DdpSpec() and self.strategy != "ddp":
            raise ValueError(
                f"resources.ddp configures strategy ddp, not {self.strategy}; remove the ddp section (bucket sizes of "
                "ZeRO are under resources.deepspeed)"
            )
        if self.compile and self.strategy == "zero3":
            raise ValueError(
                "compile is not supported with strategy zero3: ZeRO-3's weight-gathering hooks inside every block "
                "break torch.compile's graphs (2 blocks gave 18 graphs and 29 breaks); use zero2 or fsdp, or compile: "
                "false"
            )
        if self.deepspeed.offload_params and self.strategy != "zero3":
            raise ValueError(
                "deepspeed.offload_params needs strategy zero3 (only ZeRO-3 partitions the weights), not "
                f"{self.strategy}"
            )
        if self.deepspeed.offload_params and not self.deepspeed.offload_optimizer:
            raise ValueError(
                "deepspeed.offload_params goes with deepspeed.offload_optimizer: true (weights in CPU memory and the "
                "optimizer on the GPU would ship every update across); set both"
            )
        if (self.hosts or self.hostfile or self.ssh_port) and self.launcher != "deepspeed":
            raise ValueError(
                "hosts, hostfile and ssh_port configure launcher: deepspeed (ssh-style multi-node); set it, or remove "
                "them"
            )
        if self.hosts and self.hostfile:
            raise ValueError("give the nodes either as hosts or as a hostfile, not both")
        if len(set(self.hosts)) != len(self.hosts):
            raise ValueError(f"hosts lists a host twice: {self.hosts}")
        if self.launcher == "deepspeed" and self.nodes > 1 and not (self.hosts or self.hostfile):
            raise ValueError(
                f"launcher deepspeed on {self.nodes} nodes needs their names: resources.hosts (node 0 first) or "
                "resources.hostfile"
            )
        if self.nodes > 1 and self.launcher not in ("auto", "torchrun", "deepspeed", "slurm"):
            raise ValueError(
                f"launcher {self.launcher} runs on one node; multi-node jobs start through torchrun, deepspeed or slurm"
            )
        if self.nodes > 1 and self.launcher not in ("slurm", "deepspeed") and not self.rdzv_endpoint:
            raise ValueError(
                f"{self.nodes} nodes need resources.rdzv_endpoint: HOST:PORT of node 0, where the ranks meet (e.g. "
                "node0.cluster:29400)"
            )
        if self.rdzv_endpoint is not None:
            check_host_port("rdzv_endpoint", self.rdzv_endpoint)
        return self

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes


class JobSpec(Section):
    version: Literal[1] = SPEC_VERSION
    """Spec format version."""
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    """Job name: letters, digits, `_`, `-`, `.`; the start of the job id."""
    description: str = ""
    """Free text, shown in MLflow."""
    model: ModelSpec = ModelSpec()
    diffusion: DiffusionSpec = DiffusionSpec()
    data: DataSpec = DataSpec()
    train: TrainSpec
    ema: EmaSpec = EmaSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    sample: SampleSpec = SampleSpec()
    eval: EvalSpec = EvalSpec()
    tracking: TrackingSpec = TrackingSpec()
    resources: ResourcesSpec = ResourcesSpec()

    @model_validator(mode="after")
    def _cross_section_checks(self) -> JobSpec:
        m = self.model
        t = self.train
        if t.lr_schedule == "one_cycle" and (t.warmup_steps or t.min_lr_ratio):
            raise ValueError(
                "train.lr_schedule one_cycle rises and falls on its own: remove train.warmup_steps and min_lr_ratio"
            )
        if t.lr_schedule != "one_cycle" and t.one_cycle != OneCycleSpec():
            raise ValueError("train.one_cycle shapes lr_schedule one_cycle: set lr_schedule: one_cycle or remove it")
        if self.data.label_column is not None and m.condition == "none":
            raise ValueError(
                f"data.label_column {self.data.label_column!r} gives labels, but model.condition is none (an "
                "unconditional model reads none): remove label_column, or set model.condition: class"
            )
        if m.learn_sigma and self.diffusion.objective == "flow":
            raise ValueError("model.learn_sigma trains a DDPM variance; objective flow has none: remove it")
        if m.arch == "dit" and not self.data.latent and self.data.resolution % m.patch_size:
            raise ValueError(f"model.patch_size {m.patch_size} does not divide data.resolution {self.data.resolution}")
        if m.arch == "unet" and not self.data.latent and self.data.resolution % 2 ** sum(m.unet.down_sample):
            raise ValueError(
                f"data.resolution {self.data.resolution} cannot be halved {sum(m.unet.down_sample)} times "
                "(model.unet.down_sample)"
            )
        if m.learn_sigma != (self.diffusion.loss == "hybrid"):
            raise ValueError(
                "model.learn_sigma and diffusion.loss: hybrid go together: the variational bound is what trains the "
                "variance"
            )
        if m.learn_sigma and self.sample.sampler != "ddpm":
            raise ValueError(
                f"sample.sampler {self.sample.sampler} cannot use a learned variance; use ddpm (or learn_sigma: false)"
            )
        if m.learn_sigma and self.diffusion.prediction != "epsilon":
            raise ValueError(
                "a learned variance is trained with epsilon prediction (Nichol & Dhariwal 2021); set "
                "diffusion.prediction: epsilon"
            )
        split = self.resources.world_size * self.train.grad_accum_steps
        if self.train.global_batch_size % split:
            raise ValueError(
                f"train.global_batch_size {self.train.global_batch_size} does not split over "
                f"{self.resources.world_size} rank(s) x {self.train.grad_accum_steps} accumulation step(s); "
                f"use a multiple of {split}"
            )
        classes = m.num_classes or (10 if self.data.source == "digits" else None)
        beyond = [c for c in self.sample.classes or () if classes is not None and c >= classes]
        if beyond:
            raise ValueError(
                f"sample.classes {', '.join(map(str, beyond))} do(es) not exist: the model has classes 0..{classes - 1}"
            )
        if self.sample.steps > self.diffusion.num_train_timesteps:
            raise ValueError(
                f"sample.steps {self.sample.steps} exceeds diffusion.num_train_timesteps "
                f"{self.diffusion.num_train_timesteps}"
            )
        refusal = precision_refusal(self.resources.strategy, self.train.mixed_precision)
        if refusal:
            raise ValueError(refusal)
        if m.condition == "text" and not self.data.has_text:
            raise ValueError(
                f"model.condition: text needs precomputed text embeddings, which data.source {self.data.source} does "
                "not carry; "
                "train on shards prepared with captions by `orch prepare` (data.source: webdataset), or use condition: "
                "class"
            )
        d = self.diffusion
        for where, sampler in (("sample.sampler", self.sample.sampler), ("eval.sampler", self.eval.sampler)):
            if sampler is not None and sampler not in d.samplers:
                raise ValueError(
                    f"{where} {sampler} does not sample objective {d.objective}; use {', '.join(d.samplers)}"
                )
        self._check_eval()
        if self.sample.guidance_scale != 1 and (m.class_dropout == 0 or m.condition == "none"):
            raise ValueError(
                "sample.guidance_scale > 1 needs a condition with a null class or caption: model.condition class or "
                "text and model.class_dropout > 0 (0.1 is usual)"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _default_eval_metrics(cls, raw: Any) -> Any:
        """eval.metrics left empty: the digits' pair on the digits, FID elsewhere."""
        if not isinstance(raw, dict) or not isinstance(raw.get("eval", {}), dict):
            return raw  # the field validators say what is wrong
        diffusion, sample = raw.get("diffusion"), raw.get("sample", {})
        flow = isinstance(diffusion, dict) and diffusion.get("objective") == "flow"
        if flow and isinstance(sample, dict) and sample.get("sampler") is None:
            raw = {**raw, "sample": {**sample, "sampler": "euler"}}  # the flow's sampler unless one is named
        if isinstance(diffusion, dict) and diffusion.get("objective") == "continuous" and "prediction" not in diffusion:
            raw = {**raw, "diffusion": {**diffusion, "prediction": "sample"}}  # x0, as the continuous write-ups do
        section = raw.get("eval", {})
        if section.get("metrics") is None:
            data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
            digits = data.get("source", "digits") == "digits"
            raw = {**raw, "eval": {**section, "metrics": ["fd_digits", "digit_accuracy"] if digits else ["fid"]}}
        return raw

    def _check_eval(self) -> None:
        """The eval section against the model and the data (the files it names are checked by `orch plan`)."""
        e, m, keep_best = self.eval, self.model, self.checkpoint.keep_best
        if keep_best is not None and e.every is None:
            raise ValueError("checkpoint.keep_best ranks checkpoints by evaluations: set eval.every (and eval.metrics)")
        if e.every is None:
            return
        if m.condition == "text":
            raise ValueError(
                "eval draws class-conditional samples; a text-conditioned model needs captions to sample from, which "
                "the evaluation does not take yet: remove eval.every (evaluate its samples with `orch sample --prompt`)"
            )
        if keep_best is not None and keep_best.metric not in e.metric_keys:
            logged = ", ".join(key for key in e.metric_keys if not key.endswith("_std"))
            raise ValueError(
                f"checkpoint.keep_best.metric {keep_best.metric} is not evaluated; eval.metrics "
                f"{', '.join(e.metrics)} log {logged}"
            )
        digit_metrics = [name for name in e.metrics if name in ("fd_digits", "digit_accuracy")]
        if digit_metrics and self.data.source != "digits":
            raise ValueError(
                f"eval.metrics {', '.join(digit_metrics)} read 8x8 digits (a digit classifier's features); data.source "
                f"is {self.data.source}: use fid, kid, fd_dinov2 or precision_recall"
            )
        image_metrics = [name for name in e.metrics if name not in ("fd_digits", "digit_accuracy")]
        side = self.data.resolution
        if image_metrics and side < 32:
            hint = "; for the digits use fd_digits and digit_accuracy" if self.data.source == "digits" else ""
            raise ValueError(
                f"eval.metrics {', '.join(image_metrics)} compare Inception-v3 / DINOv2 features of natural images, "
                f"which {side}x{side} images do not have (32 px, CIFAR-10's size, is the smallest the field reports "
                f"them at){hint}"
            )
        if image_metrics and self.data.latent and e.reference is None:
            raise ValueError(
                "a webdataset source holds latents, not the real images the samples are compared with: set "
                "eval.reference to an ADM .npz reference batch or to the image folder the shards were prepared from"
            )
        if "precision_recall" in e.metrics and e.num_samples <= PRECISION_RECALL_K:
            raise ValueError(
                f"eval.metrics precision_recall estimates manifolds from each sample's {PRECISION_RECALL_K} nearest "
                f"neighbours: eval.num_samples must exceed {PRECISION_RECALL_K} (the field uses 10,000 or more)"
            )
        if "digit_accuracy" in e.metrics and m.condition != "class":
            raise ValueError("eval.metrics digit_accuracy needs a class-conditional model (model.condition: class)")
        if (e.steps or self.sample.steps) > self.diffusion.num_train_timesteps:
            raise ValueError(
                f"eval.steps {e.steps or self.sample.steps} exceeds diffusion.num_train_timesteps "
                f"{self.diffusion.num_train_timesteps}"
            )
        if (e.guidance_scale or 1) != 1 and (m.class_dropout == 0 or m.condition == "none"):
            raise ValueError("eval.guidance_scale > 1 needs a class-conditional model with model.class_dropout > 0")
        if m.learn_sigma and (e.sampler or self.sample.sampler) != "ddpm":
            raise ValueError(f"eval.sampler {e.sampler} cannot use a learned variance; use ddpm")

    @property
    def micro_batch_size(self) -> int:
        """Images per rank per forward pass."""
        return self.train.global_batch_size // (self.resources.world_size * self.train.grad_accum_steps)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """The spec as dotted keys (`train.learning_rate`), as MLflow params."""
        return flatten(self.to_dict())

    def applicable_params(self) -> dict[str, Any]:
        """The flat spec without the fields that do not apply to this job (a DiT's model.unet, the other objective's
        fields, another launcher's or strategy's settings, eval settings without evaluations...): the run's params in
        MLflow, where 100 fields of which a third mean nothing for the job hide the ones that do."""
        m, d, t, data, r = self.model, self.diffusion, self.train, self.data, self.resources
        skip = {"description", "tracking.enabled"}  # the run's description tag; a run that exists is tracked
        if not self.tracking.system_metrics:
            skip.add("tracking.system_metrics_every_s")
        if not self.tracking.log_model:
            skip.add("tracking.register_as")
        if m.arch == "dit":
            skip.add("model.unet.")
        else:
            skip.update(f"model.{f}" for f in DIT_FIELDS)
        if d.objective == "flow":
            skip.update(f"diffusion.{f}" for f in ("beta_schedule", "beta_start", "beta_end", "prediction", "loss"))
            skip.add("diffusion.min_snr_gamma")
        else:
            skip.update(f"diffusion.{f}" for f in ("timestep_sampling", "logit_mean", "logit_std", "shift"))
        if d.objective == "continuous":
            skip.update(("diffusion.beta_schedule", "diffusion.loss"))
        if d.objective == "continuous" or d.beta_schedule != "linear":
            skip.update(("diffusion.beta_start", "diffusion.beta_end"))
        if data.source != "hf_dataset":
            skip.update(f"data.{f}" for f in (*HUB_FIELDS, "label_column"))
        if data.source != "webdataset":
            skip.add("data.shuffle_buffer")
        if data.source not in ("image_folder", "hf_dataset"):
            skip.add("data.crop")
        if t.lr_schedule != "one_cycle":
            skip.add("train.one_cycle.")
        if t.lr_schedule in ("constant", "one_cycle"):
            skip.add("train.min_lr_ratio")
        if self.eval.every is None:
            skip.update(f"eval.{f}" for f in EvalSpec.model_fields if f != "every")
        if m.condition != "text":
            skip.add("sample.text_rows")
        if r.launcher != "slurm":
            skip.add("resources.slurm.")
        if not r.strategy.startswith("zero"):
            skip.add("resources.deepspeed.")
        if r.strategy != "ddp":
            skip.add("resources.ddp.")
        if r.launcher != "deepspeed":
            skip.update(("resources.hosts", "resources.hostfile", "resources.ssh_port"))
        if r.nodes == 1:
            skip.add("resources.rdzv_endpoint")
        prefixes = tuple(s for s in skip if s.endswith("."))
        return {k: v for k, v in self.flat().items() if k not in skip and not k.startswith(prefixes)}

    def digest(self) -> str:
        """A short hash of the resolved spec."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Loading: YAML with line numbers, overrides, validation, messages
# ---------------------------------------------------------------------------------------------


def spec_kind(path: str | Path) -> str:
    """ "prepare" for a spec of `orch prepare` (top-level `kind: prepare`), "sweep" for one of `orch sweep`, else
    "job"; an unreadable file counts as a job spec (load_spec says why)."""
    try:
        text = read_spec_text(path)
        raw = (
            load_yaml(text, str(path)) if "kind" in text else None
        )  # the word is needed; most specs are not read twice
    except SpecError:
        return "job"
    kind = raw.get("kind") if isinstance(raw, dict) else None
    return kind if kind in ("prepare", "sweep") else "job"


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read a YAML spec, apply `--set key.path=value` overrides, validate; SpecError if anything is wrong."""
    path = Path(path)
    return parse_spec(read_spec_text(path), source=str(path), overrides=overrides, base_dir=path.parent)


def parse_spec(text: str, source: str = "<spec>", overrides=(), base_dir: Path | None = None) -> JobSpec:
    """Validate spec text; see load_spec."""
    raw, lines = load_yaml_with_lines(text, source, empty_hint="it needs at least `name:` and `train: {steps: N}`")
    if raw.get("kind") == "prepare":
        raise SpecError(f"{source} is a data-preparation spec (kind: prepare), not a job: run `orch prepare {source}`")
    if raw.get("kind") == "sweep":
        raise SpecError(f"{source} is a sweep spec (kind: sweep), not a job: run `orch sweep {source}`")
    raw = _canonical_keys(raw)
    origins = {key: f"line {line}" for key, line in lines.items()}
    for override in overrides:
        key_path, value = parse_override(override, ALIASES)
        set_path(raw, key_path, value, override)
        origins[key_path] = f"--set {override}"
    spec = validate_tree(JobSpec, raw, source, origins)
    for key_path, value in (
        ("data.path", spec.data.path),
        ("model.init_from", spec.model.init_from),
        ("resources.deepspeed.config_file", spec.resources.deepspeed.config_file),
        ("resources.hostfile", spec.resources.hostfile),
        ("eval.reference", spec.eval.reference),
        ("eval.weights_dir", spec.eval.weights_dir),
    ):
        if base_dir is None or not value or Path(value).is_absolute():
            continue
        if key_path == "data.path" and spec.data.source == "hf_dataset" and not (base_dir / value).exists():
            continue  # a Hub name, unless such a file or folder exists beside the spec
        spec = replace(spec, key_path, str((base_dir / value).resolve()))  # relative to the spec file
    return spec


def spec_from_dict(raw: dict[str, Any], source: str = "<spec>") -> JobSpec:
    """Validate an already-resolved spec dict (as written into a job directory)."""
    return validate_tree(JobSpec, _canonical_keys(raw), source, {})


def replace(spec: JobSpec, key_path: str, value: Any) -> JobSpec:
    """A copy of the spec with one dotted field changed (validated again)."""
    raw = spec.to_dict()
    set_path(raw, tuple(key_path.split(".")), value, key_path)
    return validate_tree(JobSpec, raw, "<replace>", {})


def spec_changes(old: JobSpec, new: JobSpec) -> list[str]:
    """Lines `key: old -> new` for every field that differs."""
    before, after = old.flat(), new.flat()
    return [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]


def json_schema() -> dict[str, Any]:
    """The spec's JSON Schema, for editors' autocompletion and validation."""
    schema = JobSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "orch job spec"
    return schema


def reference_markdown() -> str:
    """The spec reference (every field, its type, default and meaning) as Markdown tables, for the README."""
    header = ["| field | type | default | meaning |", "|---|---|---|---|"]
    out: list[str] = []

    def table(cls: type[BaseModel], prefix: str, title: str) -> None:
        rows, nested = [], []
        for name, field in cls.model_fields.items():
            section = next((a for a in (field.annotation, *get_args(field.annotation)) if _is_section(a)), None)
            if section is not None:  # a section, or an optional one (checkpoint.keep_best)
                nested.append((section, f"{prefix}{name}"))
                continue
            meaning = " ".join((field.description or "").split())  # a docstring that wraps over lines, as one
            kind = _type_name(field.annotation, field.metadata)
            rows.append(f"| `{prefix}{name}` | {kind} | {_default_text(field)} | {meaning} |")
        out.extend([f"**{title}**", "", *header, *rows, ""])
        for sub, path in nested:
            table(sub, f"{path}.", f"`{path}`")

    table(JobSpec, "", "top level")
    return "\n".join(out).rstrip() + "\n"


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Section)


def _type_name(annotation: Any, metadata: list[Any] = ()) -> str:
    """A field's type as the reference shows it, with its range (`int, 1 to 2147483647`; `float, 0 <= x < 1`)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{value}`" for value in args)
    if origin is Annotated:  # Annotated[int, Field(ge=0)]: the Field's constraints are in its metadata
        extra = [item for arg in args[1:] for item in getattr(arg, "metadata", [arg])]
        return _type_name(args[0], [*extra, *metadata])
    if origin in (types.UnionType, Union):
        return " or ".join(_type_name(arg, metadata) if arg is not type(None) else "empty" for arg in args)
    if origin in (list, tuple):
        inner = ", ".join(_item_name(arg) for arg in args if arg is not Ellipsis)
        return f"{origin.__name__}[{inner}]" + ("" if origin is tuple else _length_text(metadata))
    name = getattr(annotation, "__name__", repr(annotation))
    bounds = _range_text(metadata) if annotation in (int, float) else ""
    return f"{name}{bounds}"


def _item_name(annotation: Any) -> str:
    """An item type of a list or tuple, its range in brackets: `int (1 to 64)`."""
    text = _type_name(annotation)
    base, sep, bounds = text.partition(", ")
    return f"{base} ({bounds})" if sep and not text.startswith("one of") else text


def _range_text(metadata: list[Any]) -> str:
    """`, 1 to 64`, `, 0 <= x < 1`, `, > 0` from a field's Ge/Gt/Le/Lt constraints ('' when it has none)."""
    found = {kind: getattr(item, kind) for item in metadata for kind in ("ge", "gt", "le", "lt") if hasattr(item, kind)}
    low = (">=", found["ge"]) if "ge" in found else (">", found["gt"]) if "gt" in found else None
    high = ("<=", found["le"]) if "le" in found else ("<", found["lt"]) if "lt" in found else None
    if low and high and low[0] == ">=" and high[0] == "<=":
        return f", {low[1]} to {high[1]}"
    if low and high:
        return f", {low[1]} {'<=' if low[0] == '>=' else '<'} x {high[0]} {high[1]}"
    return "".join(f", {bound[0]} {bound[1]}" for bound in (low, high) if bound)


def _length_text(metadata: list[Any]) -> str:
    found = {
        kind: getattr(item, kind) for item in metadata for kind in ("min_length", "max_length") if hasattr(item, kind)
    }
    if not found:
        return ""
    return f", {found.get('min_length', 0)} to {found['max_length']} items" if "max_length" in found else ""


def _default_text(field: Any) -> str:
    if field.is_required():
        return "required"
    default = field.default
    return "empty" if default is None else f"`{default!r}`" if default == "" else f"`{default}`"


def _canonical_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """Rewrite accepted short names (`train.lr`) to the field names."""
    for (section, alias), name in ALIASES.items():
        block = raw.get(section)
        if isinstance(block, dict) and alias in block:
            if name in block:
                raise SpecError(f"{section}.{alias} and {section}.{name} are the same field; give only one")
            block[name] = block.pop(alias)
    return raw
