"""`orch sample` and `orch export` through the real command on a trained tiny job."""

import pytest
from PIL import Image
from safetensors.torch import load_file

from tests.helpers import log_text, only_job, orch, tiny_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trained")
    root = tmp_path / "runs"
    result = orch("submit", str(tiny_spec(tmp_path, train={"steps": 2}, sample={"progression": 3})), root=root)
    job = only_job(root)
    assert result.returncode == 0, log_text(job)
    return root, job


def test_orch_sample_writes_images_and_a_grid_and_the_same_seed_repeats(tmp_path, trained):
    root, job = trained
    args = [
        "sample",
        job.name,
        "--num",
        "2",
        "--class",
        "3",
        "--class",
        "5",
        "--sampler",
        "ddim",
        "--steps",
        "4",
        "--seed",
        "11",
    ]
    first = orch(*args, "--out", str(tmp_path / "a"), "--progression", root=root)
    assert first.returncode == 0, first.stderr
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [
        "0000_class3.png",
        "0001_class3.png",
        "0002_class5.png",
        "0003_class5.png",
        "grid.png",
        "progression.png",
    ]
    # the strip has the frames the job's strips had (sample.progression 3)
    assert "progression (3 x0 predictions a row)" in first.stdout, first.stdout
    width, height = Image.open(tmp_path / "a" / "progression.png").size
    assert width * (2 * 9 + 1) == height * (3 * 9 + 1)  # 2 rows (classes 3, 5) x 3 frames of 8 px, 1 px apart
    orch(*args, "--out", str(tmp_path / "b"), "--batch-size", "1", root=root, check=True)
    for name in names[:4]:
        assert Image.open(tmp_path / "a" / name).tobytes() == Image.open(tmp_path / "b" / name).tobytes(), name
    raw = orch(*args, "--out", str(tmp_path / "raw"), "--no-ema", root=root, check=True)
    assert "raw weights" in raw.stdout


def test_orch_sample_of_an_unknown_job_is_one_line_exit_2(tmp_path, trained):
    root, _ = trained
    result = orch("sample", "no-such-job", "--out", str(tmp_path / "x"), root=root)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_orch_sample_refuses_a_condition_the_model_does_not_have(tmp_path, trained):
    root, job = trained
    prompt = orch("sample", job.name, "--prompt", "a three", "--out", str(tmp_path / "p"), root=root)
    assert (
        prompt.returncode == 2
        and "--prompt needs a text-conditioned model; this one is conditioned on class: use --class" in prompt.stderr
    )
    out_of_range = orch("sample", job.name, "--class", "10", "--out", str(tmp_path / "c"), root=root)
    assert (
        out_of_range.returncode == 2 and "class(es) 10 out of range: this model has classes 0..9" in out_of_range.stderr
    )
    assert not (tmp_path / "p").exists() and not (tmp_path / "c").exists()


def test_orch_export_safetensors_and_diffusers(tmp_path, trained):
    root, job = trained
    orch("export", job.name, "--format", "safetensors", "--out", str(tmp_path / "st"), root=root, check=True)
    exported = load_file(tmp_path / "st" / "model.safetensors")
    ema = load_file(job / "checkpoints" / "step-0000002" / "ema.safetensors")
    assert exported.keys() == ema.keys() and all(exported[k].equal(ema[k]) for k in ema)
    assert (tmp_path / "st" / "spec.yaml").is_file()

    orch("export", job.name, "--format", "diffusers", "--out", str(tmp_path / "hf"), root=root, check=True)
    from diffusers import DiTTransformer2DModel

    transformer = DiTTransformer2DModel.from_pretrained(tmp_path / "hf" / "transformer")
    assert transformer.config.sample_size == 8 and transformer.config.in_channels == 1


@pytest.mark.parametrize(
    ("diffusion", "samplers", "other"),
    [
        ({"objective": "flow", "timestep_sampling": "logit_normal"}, ("euler", "heun"), "ddim"),
        ({"objective": "continuous", "prediction": "v_prediction"}, ("ddim", "ddpm"), "euler"),
    ],
    ids=["flow", "continuous"],
)
def test_a_job_of_another_objective_draws_grids_evaluates_and_samples_with_its_own_samplers_only(
    tmp_path, diffusion, samplers, other
):
    root = tmp_path / "runs"
    first, second = samplers
    spec = tiny_spec(
        tmp_path,
        diffusion=diffusion,
        train={"steps": 2},
        sample={"every": 2, "sampler": first, "steps": 4, "per_class": 2, "classes": [0, 1]},
        eval={"every": 2, "num_samples": 10, "steps": 4, "batch_size": 10},
    )
    spec.write_text(spec.read_text().replace("beta_schedule: squaredcos_cap_v2", "beta_schedule: linear"))
    done = orch("submit", str(spec), root=root)
    job = only_job(root)
    assert done.returncode == 0, done.stderr + log_text(job)
    assert (job / "samples" / "samples-0000002.png").is_file() and (
        job / "samples" / "progression-0000002.png"
    ).is_file()
    assert "evaluation of step 2: eval/fd_digits" in log_text(job)

    drawn = orch(
        "sample", job.name, "--sampler", second, "--steps", "3", "--num", "1", "--out", str(tmp_path / "s"), root=root
    )
    assert drawn.returncode == 0 and f"{second}-3" in drawn.stdout, drawn.stderr
    refused = orch("sample", job.name, "--sampler", other, "--num", "1", "--out", str(tmp_path / "d"), root=root)
    objective = diffusion["objective"]
    assert refused.returncode == 2, refused.stderr
    assert f"does not sample this model (objective {objective}): use {', '.join(samplers)}" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "d").exists()
