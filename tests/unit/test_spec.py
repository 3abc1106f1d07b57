"""The job spec: defaults, validation messages, overrides, schema."""

import json
from pathlib import Path

import pytest
import yaml

from orchestrator.specs.job import (
    DIT_PRESETS,
    JobSpec,
    SpecError,
    check_registered_model_name,
    json_schema,
    load_spec,
    parse_spec,
    spec_changes,
    spec_from_dict,
)

REPO = Path(__file__).resolve().parents[2]
MINIMAL = "name: tiny\ntrain:\n  steps: 10\n"


def problems(text: str, overrides=()) -> str:
    with pytest.raises(SpecError) as caught:
        parse_spec(text, source="job.yaml", overrides=overrides)
    return str(caught.value)


def test_minimal_spec_gets_documented_defaults():
    spec = parse_spec(MINIMAL)
    assert spec.model.arch == "dit" and spec.model.patch_size == 2
    assert spec.train.global_batch_size == 128 and spec.train.mixed_precision == "no"
    assert spec.ema.decay == 0.9999 and spec.checkpoint.every == 1000
    assert spec.resources.processes == 1 and spec.micro_batch_size == 128


def test_every_field_has_a_docstring_for_the_reference():
    def walk(cls):
        for name, field in cls.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, JobSpec.__mro__[1]):
                walk(annotation)
            else:
                assert field.description, f"{cls.__name__}.{name} has no docstring"

    walk(JobSpec)


def test_unknown_key_names_line_and_suggests_the_near_miss():
    message = problems("name: t\ntrain:\n  steps: 10\n  lerning_rate: 3e-4\n")
    assert "line 4: train.lerning_rate: unknown key; did you mean 'learning_rate'?" in message


def test_wrong_type_and_impossible_values_are_all_reported_with_lines():
    message = problems("name: t\ntrain:\n  steps: many\n  mixed_precision: fp32\nema:\n  decay: 1.5\n")
    assert "3 problems" in message
    assert "line 3: train.steps" in message
    assert "line 4: train.mixed_precision: input should be 'no', 'bf16' or 'fp16', got 'fp32'" in message
    assert "line 6: ema.decay" in message


def test_missing_required_fields_are_named():
    message = problems("name: t\n")
    assert "train: required, missing" in message


def test_cross_field_checks_explain_the_fix():
    message = problems(
        MINIMAL, overrides=["train.global_batch_size=100", "resources.processes=3", "resources.launcher=torchrun"]
    )
    assert "does not split over 3 rank(s)" in message and "multiple of 3" in message
    assert "does not divide data.resolution" in problems(MINIMAL + "model: {patch_size: 3}\n")
    assert "not divisible by num_heads" in problems(MINIMAL + "model: {hidden_size: 100, num_heads: 3}\n")
    assert "launcher local starts one process" in problems(
        MINIMAL, ["resources.launcher=local", "resources.processes=2"]
    )


def test_a_progression_strip_needs_two_to_sample_steps_points_and_says_so():
    assert parse_spec(MINIMAL, overrides=["sample.steps=4", "sample.progression=4"]).sample.progression == 4
    assert parse_spec(MINIMAL).sample.progression == 0  # the strip at the end of training only
    message = problems(MINIMAL, ["sample.steps=4", "sample.progression=5"])
    assert "--set sample.progression=5: sample.progression: 5 asks for more x0 predictions than" in message
    assert "lower it to at most 4, or raise sample.steps" in message
    message = problems(MINIMAL + "sample:\n  progression: 1\n")
    assert "line 5: sample.progression: 1 would show the sample alone" in message and "set 2 or more" in message


def test_overrides_beat_yaml_which_beats_defaults():
    spec = parse_spec(MINIMAL + "  learning_rate: 1e-3\n", overrides=["train.lr=3e-4", "resources.processes=2"])
    assert spec.train.learning_rate == 3e-4  # --set (through the `lr` alias) beats the YAML
    assert spec.resources.processes == 2  # --set beats the default
    assert spec.train.steps == 10  # YAML beats the default


def test_bad_override_names_its_origin():
    message = problems(MINIMAL, overrides=["train.stepz=5"])
    assert "--set train.stepz=5: train.stepz: unknown key; did you mean 'steps'?" in message
    assert "expected KEY.PATH=VALUE" in problems(MINIMAL, overrides=["train.steps"])


def test_yaml_no_means_no_mixed_precision():
    assert parse_spec(MINIMAL + "  mixed_precision: no\n").train.mixed_precision == "no"


def test_presets_fill_the_paper_sizes_and_contradictions_are_refused():
    spec = parse_spec(MINIMAL + "model: {preset: DiT-B/4}\ndata: {resolution: 32}\n")
    assert (spec.model.depth, spec.model.hidden_size, spec.model.num_heads, spec.model.patch_size) == (12, 768, 12, 4)
    assert "contradicts preset DiT-B/4" in problems(MINIMAL + "model: {preset: DiT-B/4, depth: 3}\n")
    assert "did you mean 'DiT-XL/2'" in problems(MINIMAL + "model: {preset: DiT-XXL/2}\n")
    assert len(DIT_PRESETS) == 12


def test_spec_reads_with_a_safe_loader_only():
    message = problems("name: !!python/object/apply:os.system ['echo hacked']\ntrain: {steps: 1}\n")
    assert "not valid YAML" in message


def test_duplicate_keys_are_refused():
    assert "appears twice" in problems("name: a\nname: b\ntrain: {steps: 1}\n")


def test_image_folder_path_is_resolved_next_to_the_spec(tmp_path):
    (tmp_path / "jobs").mkdir()
    spec_file = tmp_path / "jobs" / "x.yaml"
    spec_file.write_text(MINIMAL + "data: {source: image_folder, path: ../images, resolution: 8}\n")
    assert load_spec(spec_file).data.path == str((tmp_path / "images").resolve())


def test_resolved_spec_round_trips_and_diffs():
    spec = parse_spec(MINIMAL)
    again = spec_from_dict(yaml.safe_load(spec.to_yaml()))
    assert again == spec and again.digest() == spec.digest()
    changed = parse_spec(MINIMAL, overrides=["train.steps=20"])
    assert spec_changes(spec, changed) == ["train.steps: 10 -> 20"]
    assert changed.digest() != spec.digest()


def test_schema_is_json_schema_that_forbids_unknown_keys():
    schema = json_schema()
    json.dumps(schema)
    assert schema["additionalProperties"] is False
    assert "learning_rate" in schema["$defs"]["TrainSpec"]["properties"]
    assert schema["$defs"]["TrainSpec"]["properties"]["learning_rate"]["description"]


@pytest.mark.parametrize("name", ["dit_digits.yaml", "dit_cats.yaml", "dit_text.yaml", "ddpm_mnist.yaml"])
def test_shipped_job_specs_validate(name):
    spec = load_spec(REPO / "jobs" / name)
    assert spec.train.steps > 0


@pytest.mark.parametrize("name", ["prepare_cats.yaml", "prepare_text.yaml"])
def test_shipped_prepare_specs_validate_and_are_refused_as_jobs(name):
    from orchestrator.specs.prepare import load_prepare_spec

    assert load_prepare_spec(REPO / "jobs" / name).image.resolution == 256
    with pytest.raises(SpecError, match="is a data-preparation spec"):
        load_spec(REPO / "jobs" / name)


def test_cats_spec_is_the_production_shape():
    spec = load_spec(REPO / "jobs" / "dit_cats.yaml")
    assert (spec.model.depth, spec.model.num_heads, spec.model.hidden_size, spec.model.patch_size) == (12, 12, 768, 2)
    assert spec.micro_batch_size == 32 and spec.resources.world_size == 8
    assert spec.train.learning_rate == 1e-4 and spec.ema.decay == 0.9999 and spec.train.mixed_precision == "bf16"


def test_readme_spec_reference_matches_the_code():
    from orchestrator.specs.job import reference_markdown

    readme = (REPO / "README.md").read_text()
    start, end = "<!-- spec-reference:start -->\n", "<!-- spec-reference:end -->"
    section = readme[readme.index(start) + len(start) : readme.index(end)]
    assert section == reference_markdown(), "README spec reference is stale: run scripts/update_readme_reference.py"


def test_gpus_per_node_sets_the_ranks_per_node_and_contradictions_are_refused():
    spec = parse_spec(
        "name: big\ntrain: {steps: 10, global_batch_size: 256}\nresources: {gpus_per_node: 8, nodes: 4, rdzv_endpoint: "
        "'n0:29400', launcher: torchrun}\n"
    )
    assert spec.resources.processes == 8 and spec.resources.world_size == 32 and spec.micro_batch_size == 8
    assert spec_from_dict(spec.to_dict()) == spec, "the recorded spec (both fields set) reads back"
    assert "gpus_per_node 8 and processes 4 disagree" in problems(
        MINIMAL, ["resources.gpus_per_node=8", "resources.processes=4"]
    )
    assert "gpus_per_node needs device cuda" in problems(MINIMAL, ["resources.gpus_per_node=8", "resources.device=cpu"])


def test_strategy_settings_belong_to_their_strategy():
    assert "resources.deepspeed configures the ZeRO strategies" in problems(
        MINIMAL, ["resources.deepspeed.offload_optimizer=true"]
    )
    assert "resources.ddp configures strategy ddp, not zero2" in problems(
        MINIMAL, ["resources.strategy=zero2", "resources.ddp.bucket_mb=50"]
    )
    assert "offload_params needs strategy zero3" in problems(
        MINIMAL, ["resources.strategy=zero2", "resources.deepspeed.offload_params=true"]
    )
    assert "set both" in problems(MINIMAL, ["resources.strategy=zero3", "resources.deepspeed.offload_params=true"])
    spec = parse_spec(
        MINIMAL,
        overrides=[
            "resources.strategy=zero3",
            "resources.deepspeed.offload_params=true",
            "resources.deepspeed.offload_optimizer=true",
            "resources.activation_checkpointing=true",
        ],
    )
    assert spec.resources.deepspeed.offload_params and spec.resources.activation_checkpointing


def test_compile_and_tf32_are_shown_as_they_apply_and_compile_is_refused_under_zero3():
    from orchestrator.jobs.plan import compute_description

    assert "compile is not supported with strategy zero3" in problems(
        MINIMAL, ["resources.strategy=zero3", "resources.compile=true"]
    )
    spec = parse_spec(MINIMAL, overrides=["resources.compile=true", "train.mixed_precision=bf16"])
    assert compute_description(spec, "cuda") == "bf16 autocast, fp32 matmuls in TF32, torch.compile per block"
    assert compute_description(spec, "cpu") == "bf16 autocast, fp32 matmuls in fp32, torch.compile per block"
    strict = parse_spec(MINIMAL, overrides=["resources.tf32=false"])
    assert compute_description(strict, "cuda") == "fp32, fp32 matmuls in strict fp32, torch.compile off"


def test_deepspeed_config_file_is_resolved_next_to_the_spec(tmp_path):
    (tmp_path / "ds.json").write_text("{}")
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(MINIMAL + "resources: {strategy: zero2, deepspeed: {config_file: ds.json}}\n")
    assert load_spec(spec_file).resources.deepspeed.config_file == str(tmp_path / "ds.json")


def test_hosts_set_the_node_count_for_the_deepspeed_launcher():
    spec = parse_spec(
        "name: ssh\ntrain: {steps: 10, global_batch_size: 32}\nresources: {launcher: deepspeed, hosts: [n0, n1], "
        "processes: 2}\n"
    )
    assert spec.resources.nodes == 2 and spec.resources.world_size == 4
    assert spec_from_dict(spec.to_dict()) == spec
    assert "nodes 3 and hosts (2 listed) disagree" in problems(
        MINIMAL, ["resources.launcher=deepspeed", "resources.hosts=[a, b]", "resources.nodes=3"]
    )
    assert "lists a host twice" in problems(MINIMAL, ["resources.launcher=deepspeed", "resources.hosts=[a, a]"])
    assert "either as hosts or as a hostfile" in problems(
        MINIMAL, ["resources.launcher=deepspeed", "resources.hosts=[a, b]", "resources.hostfile=h"]
    )
    assert "configure launcher: deepspeed" in problems(MINIMAL, ["resources.ssh_port=2222"])


def test_fsdp_is_a_strategy_without_deepspeed_settings_or_fp16():
    assert (
        parse_spec(MINIMAL, overrides=["resources.strategy=fsdp", "resources.launcher=accelerate"]).resources.strategy
        == "fsdp"
    )
    assert "configures the ZeRO strategies, not fsdp" in problems(
        MINIMAL, ["resources.strategy=fsdp", "resources.deepspeed.overlap_comm=true"]
    )
    assert "fp16 (loss scaling) is supported with ddp only" in problems(
        MINIMAL, ["resources.strategy=fsdp", "train.mixed_precision=fp16"]
    )


def test_a_text_conditioned_model_is_not_evaluated_with_class_labels():
    text = """
name: t2i
model: {condition: text, patch_size: 2}
data: {source: webdataset, path: /data/shards, resolution: 256}
train: {steps: 10}
eval: {every: 5, reference: /data/ref.npz}
"""
    with pytest.raises(SpecError, match="a text-conditioned model needs captions"):
        parse_spec(text)


def test_hf_dataset_fields_belong_to_their_source_and_labels_to_a_conditional_model(tmp_path):
    base = "name: x\ntrain: {steps: 1}\n"
    spec = parse_spec(
        base + "data: {source: hf_dataset, path: ylecun/mnist, channels: 1, crop: resize}", base_dir=tmp_path
    )
    assert spec.data.path == "ylecun/mnist", "a Hub name is not a path beside the spec"
    assert (spec.data.split, spec.data.image_column, spec.data.label_column) == ("train", "image", None)
    (tmp_path / "mnist").mkdir()
    local = parse_spec(base + "data: {source: hf_dataset, path: mnist}", base_dir=tmp_path)
    assert local.data.path == str(tmp_path / "mnist"), "a local copy beside the spec is made absolute"
    assert spec_from_dict(spec.to_dict()) == spec, "the recorded spec (every field written out) reads back"

    with pytest.raises(SpecError, match="data.label_column 'label' gives labels, but model.condition is none"):
        parse_spec(base + "model: {condition: none}\ndata: {source: hf_dataset, path: m, label_column: label}")
    with pytest.raises(SpecError, match=r"data.split do\(es\) not apply to source digits"):
        parse_spec(base + "data: {source: digits, split: test}")
    with pytest.raises(SpecError, match=r"data.crop do\(es\) not apply to source webdataset"):
        parse_spec(base + "data: {source: webdataset, path: d, crop: resize}")
    with pytest.raises(SpecError, match="source hf_dataset needs data.path"):
        parse_spec(base + "data: {source: hf_dataset}")


def test_mlflow_params_leave_out_the_fields_that_do_not_apply_to_the_job():
    dit = parse_spec("name: d\ntrain: {steps: 1}\n").applicable_params()
    assert "model.hidden_size" in dit and "diffusion.beta_schedule" in dit
    assert not [key for key in dit if key.startswith(("model.unet.", "resources.slurm.", "resources.deepspeed."))]
    assert "diffusion.shift" not in dit and "eval.num_samples" not in dit and "train.one_cycle.pct_start" not in dit
    unet = parse_spec("name: u\nmodel: {arch: unet}\ndata: {resolution: 32}\ntrain: {steps: 1}\n").applicable_params()
    assert "model.unet.down_channels" in unet and "model.hidden_size" not in unet
    flow = parse_spec("name: f\ndiffusion: {objective: flow}\ntrain: {steps: 1}\neval: {every: 5}\n")
    assert "diffusion.shift" in flow.applicable_params() and "diffusion.beta_schedule" not in flow.applicable_params()
    assert "eval.num_samples" in flow.applicable_params()


def test_a_registered_model_name_is_checked_where_it_is_given():
    spec = parse_spec("name: t\ntrain: {steps: 1}\ntracking: {register_as: digits.dit-v2}\n")
    assert spec.tracking.register_as == "digits.dit-v2" and spec.tracking.log_model
    assert "line 3: tracking.register_as" in problems("name: t\ntrain: {steps: 1}\ntracking: {register_as: a/b}\n")
    assert check_registered_model_name("cats_1") == "cats_1"
    for bad in ("", "a:b", "-x", "x" * 257):
        with pytest.raises(SpecError, match="registered model name"):
            check_registered_model_name(bad)
    quiet = parse_spec("name: t\ntrain: {steps: 1}\ntracking: {log_model: false, register_as: x}\n")
    assert "tracking.register_as" not in quiet.applicable_params()
