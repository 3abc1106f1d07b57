"""The network and the diffusion process a spec describes: what training, sampling, export and evaluation all build."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from model.continuous import ContinuousVP
from model.diffusion import make_noise_scheduler
from model.dit import DiT
from model.flow import FlowMatching
from model.unet import UNet
from orchestrator.components.model_input import ModelInput
from orchestrator.specs.job import JobSpec


def build_model(spec: JobSpec, model_input: ModelInput) -> torch.nn.Module:
    """The network a spec describes, for the inputs the data gives (weights from the global RNG: seed it first)."""
    m, num_classes = spec.model, model_input.num_classes
    if m.arch == "unet":
        u = m.unet
        return UNet(
            in_channels=model_input.channels,
            down_channels=u.down_channels,
            mid_channels=u.mid_channels,
            down_sample=u.down_sample,
            num_down_layers=u.num_down_layers,
            num_mid_layers=u.num_mid_layers,
            num_up_layers=u.num_up_layers,
            num_heads=u.num_heads,
            time_emb_dim=u.time_emb_dim,
            attention=tuple(u.attention and level > 0 for level in range(len(u.down_sample))),
            num_classes=None if m.condition == "none" else num_classes,
            class_dropout_prob=m.class_dropout,
            norm_groups=u.norm_groups,
            dropout=m.dropout,
        )
    return DiT(
        input_size=model_input.size,
        patch_size=m.patch_size,
        in_channels=model_input.channels,
        hidden_size=m.hidden_size,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        class_dropout_prob=m.class_dropout,
        num_classes=num_classes,
        learn_sigma=m.learn_sigma,
        conditioning=m.conditioning,
        condition=m.condition,
        ffn=m.ffn,
        pos_embed=m.pos_embed,
        text_dim=model_input.text_dim,
        text_tokens=model_input.text_tokens or 77,
        dropout=m.dropout,
    )


def make_diffusion(spec: JobSpec) -> DDPMScheduler | FlowMatching | ContinuousVP:
    """The forward process of a spec: a diffusers DDPMScheduler (objective ddpm), a FlowMatching (flow) or a
    ContinuousVP (continuous)."""
    d = spec.diffusion
    if d.objective == "continuous":
        return ContinuousVP(prediction=d.prediction, time_scale=d.num_train_timesteps)
    if d.objective == "flow":
        return FlowMatching(
            num_train_timesteps=d.num_train_timesteps,
            timestep_sampling=d.timestep_sampling or "logit_normal",
            logit_mean=0.0 if d.logit_mean is None else d.logit_mean,
            logit_std=d.logit_std or 1.0,
            shift=d.shift or 1.0,
        )
    return make_noise_scheduler(
        d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end, prediction_type=d.prediction
    )
