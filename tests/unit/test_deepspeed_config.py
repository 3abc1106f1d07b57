"""launch/deepspeed.py: the DeepSpeed config a ZeRO job trains with, and a user's JSON laid over it."""

import json

import pytest

from launch.deepspeed import deepspeed_config, lay_over, read_user_config

BASE = dict(stage=2, mixed_precision="bf16", micro_batch_size=4, grad_accum_steps=2, world_size=8, grad_clip=1.0)


def test_config_splits_the_global_batch_and_carries_clipping_and_precision():
    config = deepspeed_config(**BASE)
    assert (
        config["train_batch_size"] == 64
        and config["train_micro_batch_size_per_gpu"] == 4
        and config["gradient_accumulation_steps"] == 2
    )
    assert (
        config["gradient_clipping"] == 1.0
        and config["zero_optimization"]["stage"] == 2
        and config["bf16"] == {"enabled": True}
    )
    assert "optimizer" not in config and "scheduler" not in config, "the trainer's AdamW and LR schedule are used"
    assert deepspeed_config(**{**BASE, "grad_clip": None})["gradient_clipping"] == 0.0


def test_offload_and_buckets_reach_zero_optimization():
    zero = deepspeed_config(
        **BASE, offload_optimizer=True, reduce_bucket_size=1000, allgather_bucket_size=2000, overlap_comm=True
    )["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert zero["reduce_bucket_size"] == 1000 and zero["allgather_bucket_size"] == 2000 and zero["overlap_comm"] is True
    assert "offload_param" not in zero
    zero3 = deepspeed_config(**{**BASE, "stage": 3}, offload_optimizer=True, offload_params=True, pin_memory=True)[
        "zero_optimization"
    ]
    assert (
        zero3["offload_param"] == {"device": "cpu", "pin_memory": True}
        and zero3["offload_optimizer"]["pin_memory"] is True
    )
    assert "allgather_bucket_size" not in zero3, (
        "ZeRO-3 gathers by prefetch buckets, not the stage-1/2 all-gather bucket"
    )
    assert "overlap_comm" not in deepspeed_config(**BASE)["zero_optimization"], "unset means DeepSpeed's own default"


@pytest.mark.parametrize(
    "bad",
    [
        {"stage": 0},
        {"mixed_precision": "fp16"},
        {"micro_batch_size": 0},
        {"reduce_bucket_size": 0},
        {"offload_params": True},
    ],
)
def test_bad_values_are_refused(bad):
    with pytest.raises(ValueError):
        deepspeed_config(**{**BASE, **bad})


def test_a_user_config_is_merged_key_by_key_and_auto_takes_the_spec_value():
    user = {
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 12345, "contiguous_gradients": False},
        "comms_logger": {"enabled": True},
    }
    merged = deepspeed_config(**BASE, user_config=user)
    assert (
        merged["train_batch_size"] == 64 and merged["gradient_clipping"] == 1.0 and merged["bf16"] == {"enabled": True}
    )
    assert merged["zero_optimization"] == {
        "stage": 2,
        "reduce_bucket_size": 12345,
        "allgather_bucket_size": 500_000_000,
        "contiguous_gradients": False,
    }
    assert merged["comms_logger"] == {"enabled": True}
    assert user["train_batch_size"] == "auto", "the user's dict is not modified"


def test_a_user_config_that_contradicts_the_spec_names_each_key_and_its_spec_field():
    user = {
        "train_batch_size": 32,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "Adam"},
        "bf16": {"enabled": False},
    }
    with pytest.raises(ValueError) as err:
        lay_over(deepspeed_config(**BASE), user)
    message = str(err.value)
    for expected in (
        "train_batch_size is 32 but the spec gives 64 (train.global_batch_size)",
        "zero_optimization.stage is 3",
        "resources.strategy",
        "'optimizer'",
        "bf16.enabled is False",
        "train.mixed_precision",
    ):
        assert expected in message
    assert (
        lay_over(deepspeed_config(**BASE), {"train_batch_size": 64.0, "zero_optimization": {"stage": 2}})[
            "train_batch_size"
        ]
        == 64.0
    )


def test_read_user_config_says_what_is_wrong_with_the_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_user_config(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ValueError, match=r"not valid JSON: .* at line 1"):
        read_user_config(broken)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        read_user_config(listed)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}}))
    assert read_user_config(good) == {"zero_optimization": {"overlap_comm": True}}
