"""The model family through real jobs: U-Net, DiT variants, learned sigma, predictions, samplers, init_from."""

import pytest
from safetensors.torch import load_file

from tests.helpers import log_text, only_job, orch, state, tiny_spec

pytestmark = pytest.mark.slow


def run_job(tmp_path, name, **sections):
    root = tmp_path / name
    result = orch("submit", str(tiny_spec(tmp_path, name=name, **sections)), root=root)
    job = only_job(root)
    return result, job


def test_ddpm_unet_trains_and_samples(tmp_path):
    unet = {
        "down_channels": [8, 16, 32],
        "mid_channels": [32, 32, 16],
        "down_sample": [True, False],
        "num_heads": 2,
        "time_emb_dim": 16,
        "norm_groups": 4,
        "num_down_layers": 1,
        "num_mid_layers": 1,
        "num_up_layers": 1,
    }
    result, job = run_job(
        tmp_path,
        "unet",
        model={"arch": "unet", "unet": unet, "patch_size": 2, "hidden_size": 384, "depth": 12, "num_heads": 6},
        train={"steps": 2},
        sample={"sampler": "ddpm", "steps": 5},
    )
    assert result.returncode == 0, log_text(job)
    weights = load_file(job / "checkpoints" / "step-0000002" / "ema.safetensors")
    assert not any(key.startswith("blocks.") for key in weights)  # a U-Net, not a DiT


@pytest.mark.parametrize(
    "model, diffusion, sampler",
    [
        (
            {"conditioning": "cross_attention", "ffn": "conv", "pos_embed": "learned"},
            {"prediction": "v_prediction"},
            "dpm_solver++",
        ),
        ({"conditioning": "in_context"}, {"prediction": "sample", "beta_schedule": "scaled_linear"}, "ddim"),
        ({"learn_sigma": True}, {"loss": "hybrid", "beta_schedule": "linear"}, "ddpm"),
        ({"condition": "none", "class_dropout": 0.0}, {}, "ddim"),
    ],
)
def test_dit_variants_train_through_a_job(tmp_path, model, diffusion, sampler):
    result, job = run_job(
        tmp_path,
        "variant",
        model=model,
        diffusion=diffusion,
        train={"steps": 2},
        sample={"sampler": sampler, "steps": 5},
    )
    assert result.returncode == 0, log_text(job)
    assert 0 < state(job)["loss"] < 100


def test_impossible_model_combinations_are_refused_at_validation(tmp_path):
    spec = str(tiny_spec(tmp_path))
    cases = {
        "model.learn_sigma=true": "go together",
        "diffusion.loss=hybrid": "go together",
        "model.arch=unet": "configure a DiT",  # the tiny spec sets DiT fields
        "model.condition=text": "needs precomputed text embeddings, which data.source digits does not carry",
        "model.patch_size=3": "model.patch_size 3 does not divide data.resolution 8",
    }
    for override, message in cases.items():
        result = orch("validate", spec, "--set", override, root=tmp_path)
        assert result.returncode == 2 and message in result.stderr, (override, result.stderr)
    unet = tiny_spec(
        tmp_path,
        "unet",
        model={"arch": "unet", "unet": {"down_channels": [16, 32, 64], "down_sample": [True, True, False]}},
    )
    wrong_length = orch("validate", str(unet), root=tmp_path)
    assert wrong_length.returncode == 2 and "down_sample has 3 entries; 3 down_channels need 2" in wrong_length.stderr
    sigma_ddim = orch(
        "validate", spec, "--set", "model.learn_sigma=true", "--set", "diffusion.loss=hybrid", root=tmp_path
    )
    assert sigma_ddim.returncode == 2 and "cannot use a learned variance; use ddpm" in sigma_ddim.stderr


def test_init_from_loads_weights_by_exact_keys_and_names_a_mismatch(tmp_path):
    first, job = run_job(tmp_path, "source", train={"steps": 2})
    assert first.returncode == 0, log_text(job)
    weights = job / "checkpoints" / "step-0000002" / "model.safetensors"

    second, finetuned = run_job(
        tmp_path,
        "finetune",
        model={"init_from": str(weights)},
        train={"steps": 1, "learning_rate": 1e-12, "warmup_steps": 0},
    )
    assert second.returncode == 0, log_text(finetuned)
    start, end = load_file(weights), load_file(finetuned / "checkpoints" / "step-0000001" / "model.safetensors")
    assert all((start[k] - end[k]).abs().max() < 1e-6 for k in start)  # started from the given weights

    third, mismatched = run_job(tmp_path, "mismatch", model={"init_from": str(weights), "depth": 3}, train={"steps": 1})
    assert third.returncode == 1
    message = state(mismatched)["message"]
    assert (
        "does not fit the model the spec builds" in message
        and "unexpected" not in message
        and "missing (blocks.2." in message
    )
