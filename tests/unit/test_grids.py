"""The grids a job draws while it trains (orchestrator/train/grids.py): the x0 progression strip comes from the grid's
own reverse process, leaves the grid as it was, has a row per grid row and a column per chosen step, and is decoded
through the VAE as the grid is."""

from __future__ import annotations

import pytest
import torch
import yaml

from orchestrator.components.images import make_grid
from orchestrator.components.model import build_model
from orchestrator.components.model_input import LatentSpace, ModelInput, pixel_input
from orchestrator.specs.job import JobSpec, spec_from_dict
from orchestrator.train import grids
from orchestrator.train.grids import GridMaker
from tests.helpers import tiny_spec, write_tiny_vae

CPU = torch.device("cpu")


def make_spec(tmp_path, diffusion: dict | None = None, **sample) -> JobSpec:
    """The tiny digits spec (3 grid rows of 2 images) with a linear schedule, which every objective accepts."""
    diffusion = {"num_train_timesteps": 100, "beta_schedule": "linear", **(diffusion or {})}
    path = tiny_spec(tmp_path, diffusion=diffusion, sample=sample)
    return spec_from_dict(yaml.safe_load(path.read_text()))


def noisy_model(spec: JobSpec, model_input: ModelInput) -> torch.nn.Module:
    """The spec's network with its weights jittered: a fresh DiT's zero-initialised output layer predicts nothing."""
    torch.manual_seed(0)
    model = build_model(spec, model_input)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


@pytest.fixture
def grid_tensors(monkeypatch) -> list[torch.Tensor]:
    """The image tensors each grid is made of, (N, C, H, W) in the order drawn."""
    made = []

    def recording_make_grid(images, rows):
        made.append(images.clone())
        return make_grid(images, rows=rows)

    monkeypatch.setattr(grids, "make_grid", recording_make_grid)
    return made


@pytest.mark.parametrize(
    "objective, sampler",
    [("ddpm", "ddpm"), ("ddpm", "dpm_solver++"), ("flow", "heun"), ("continuous", "ddpm")],
)
def test_the_progression_strip_leaves_the_grid_bitwise_unchanged_and_shows_rows_by_steps(
    tmp_path, one_thread, grid_tensors, objective, sampler
):
    off = make_spec(tmp_path, {"objective": objective}, sampler=sampler, steps=4, progression=0)
    on = make_spec(tmp_path, {"objective": objective}, sampler=sampler, steps=4, progression=3)
    model_input = pixel_input(off, 10)
    model = noisy_model(off, model_input)

    without = GridMaker(off, model_input, CPU).draw(model)
    with_strip = GridMaker(on, model_input, CPU).draw(model)
    assert set(without) == {"samples"} and set(with_strip) == {"samples", "progression"}
    grid_off, grid_on, strip = grid_tensors  # (6, 1, 8, 8), (6, 1, 8, 8), (3 rows x 3 steps, 1, 8, 8)
    assert torch.equal(grid_on, grid_off), "recording the x0 predictions changed the grid"
    assert with_strip["samples"].tobytes() == without["samples"].tobytes()

    rows = strip.unflatten(0, (3, 3))  # (R, K, C, H, W)
    assert torch.equal(rows[:, -1], grid_on[[0, 2, 4]])  # the last step is each row's first grid image itself
    assert (rows[:, 0] - rows[:, -1]).abs().max() > 0.05  # the first x0 prediction is not the sample yet
    assert with_strip["progression"].size == make_grid(torch.zeros(9, 1, 8, 8), rows=3).size  # 3 x 3 tiles of 8 px


def test_a_latent_models_strip_is_decoded_through_the_vae_as_its_grid_is(tmp_path, one_thread):
    vae = write_tiny_vae(tmp_path / "vae", resolution=16)  # 4 x 8 x 8 latents of 16-px RGB images
    spec = make_spec(tmp_path, sampler="ddim", steps=3, progression=2)
    latent = LatentSpace(vae=str(vae), scaling_factor=0.5, image_channels=3, image_resolution=16)
    model_input = ModelInput(channels=4, size=8, num_classes=3, latent=latent)

    drawn = GridMaker(spec, model_input, CPU).draw(noisy_model(spec, model_input))
    strip = drawn["progression"]
    assert strip.mode == "RGB" and strip.size == make_grid(torch.zeros(6, 3, 16, 16), rows=3).size  # not 4-ch latents
    assert drawn["samples"].mode == "RGB"


def test_an_unconditional_strip_shows_the_grids_first_images_and_the_end_of_training_draws_one_by_default(tmp_path):
    spec = spec_from_dict(
        yaml.safe_load(
            tiny_spec(
                tmp_path,
                model={"condition": "none", "class_dropout": 0.0},
                sample={"steps": 4, "per_class": 10, "classes": None, "progression": 2},
            ).read_text()
        )
    )
    maker = GridMaker(spec, pixel_input(spec, 1), CPU)
    assert maker.rows == 1 and maker.strip_rows.tolist() == list(range(8))  # the first 8 of its one row of 10
    assert maker.progression_frames(final=False) == maker.progression_frames(final=True) == 2

    default = GridMaker(make_spec(tmp_path, steps=4), pixel_input(spec, 10), CPU)
    assert default.progression_frames(final=False) == 0  # sample.progression 0: no strip with the grids on the way,
    assert default.progression_frames(final=True) == 4  # one at the end: 8 steps, or all of fewer
    assert GridMaker(make_spec(tmp_path, steps=1), pixel_input(spec, 10), CPU).progression_frames(final=True) == 0
