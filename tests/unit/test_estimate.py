"""Sizing estimates: DiT parameter count and FLOPs in closed form, memory per GPU (ZeRO paper figures), communication
per step."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.dit import DiT, DiT_models
from orchestrator.jobs.estimate import (
    A100_PEAK_FLOPS,
    ASSUMED_MFU,
    GB,
    comm_bytes_per_step,
    dit_activation_bytes_per_sample,
    dit_forward_macs,
    dit_parameter_count,
    matmul_arithmetic,
    memory_per_gpu,
    training_flops_per_image,
    training_time_s,
)

REPO = Path(__file__).resolve().parents[2]
XL_2 = dict(depth=28, hidden_size=1152, patch_size=2, in_channels=4, input_size=32)


def real_counts(**kwargs) -> tuple[int, int]:
    """(all, trainable) parameters of model/dit.py's DiT, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = DiT(**kwargs)
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad)


def closed_form(kwargs: dict, include_frozen: bool = True) -> int:
    arguments = {k: v for k, v in kwargs.items() if k not in ("num_heads", "text_tokens")}  # neither changes the count
    return dit_parameter_count(**arguments, include_frozen=include_frozen)


TINY = dict(
    input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10, learn_sigma=False
)
VARIANTS = [
    {},
    {"learn_sigma": True},
    {"class_dropout_prob": 0.0},
    {"mlp_ratio": 2.5},
    {"patch_size": 4, "input_size": 16, "in_channels": 1},
    {"conditioning": "adaln"},
    {"conditioning": "cross_attention"},
    {"conditioning": "in_context"},
    {"ffn": "conv"},
    {"pos_embed": "learned"},
    {"condition": "none"},
    {"condition": "text", "text_dim": 24},
    {"condition": "text", "text_dim": 24, "class_dropout_prob": 0.0, "conditioning": "cross_attention"},
    {"condition": "text", "text_dim": 24, "conditioning": "in_context", "ffn": "conv", "pos_embed": "learned"},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) or "default")
def test_parameter_count_matches_the_module_for_every_variant(variant):
    kwargs = {**TINY, **variant}
    total, trainable = real_counts(**kwargs)
    assert closed_form(kwargs) == total
    assert closed_form(kwargs, include_frozen=False) == trainable


@pytest.mark.parametrize("name", ["DiT-XL/2", "DiT-L/4", "DiT-B/8", "DiT-S/2"])
def test_parameter_count_matches_the_named_configs_at_256px(name):
    with torch.device("meta"):
        model = DiT_models[name](input_size=32, num_classes=1000, learn_sigma=True)
    kwargs = dict(
        depth=len(model.blocks),
        hidden_size=model.pos_embed.shape[-1],
        patch_size=model.patch_size,
        in_channels=4,
        input_size=32,
        num_classes=1000,
        learn_sigma=True,
    )
    assert dit_parameter_count(**kwargs) == sum(p.numel() for p in model.parameters())


def test_dit_xl_2_has_675_1m_parameters_of_which_674_8m_trainable():
    # 675,129,632 is what the official DiT's train.py prints (it counts the frozen sin-cos pos_embed);
    # without the pos_embed (256 tokens x 1152) it is the 674.83M that get gradients.
    assert dit_parameter_count(**XL_2, num_classes=1000, learn_sigma=True) == 675_129_632
    assert dit_parameter_count(**XL_2, num_classes=1000, learn_sigma=True, include_frozen=False) == 674_834_720


def test_forward_macs_reproduce_the_dit_paper_gflops():
    # DiT paper Table 4: DiT-XL/2 118.6 Gflops at 256 px; 524.6 at 512 px (fast-DiT's README rounds to 119 and 525).
    assert dit_forward_macs(**XL_2, learn_sigma=True) / 1e9 == pytest.approx(118.6, rel=5e-3)
    assert dit_forward_macs(**{**XL_2, "input_size": 64}, learn_sigma=True) / 1e9 == pytest.approx(524.6, rel=5e-3)
    assert training_flops_per_image(1000) == 6000  # 3 passes x 2 FLOPs per multiply-add
    assert training_flops_per_image(1000, checkpointing=True) == 8000


FLOP_VARIANTS = [
    {},
    {"learn_sigma": True, "mlp_ratio": 2.5},
    {"ffn": "conv"},
    {"conditioning": "adaln"},
    {"conditioning": "cross_attention"},
    {"conditioning": "cross_attention", "condition": "none"},
    {"conditioning": "in_context", "ffn": "conv"},
    {"conditioning": "cross_attention", "condition": "text", "text_dim": 24, "ffn": "conv"},
    {"conditioning": "in_context", "condition": "text", "text_dim": 24},
]


@pytest.mark.parametrize("variant", FLOP_VARIANTS, ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) or "default")
def test_forward_macs_match_torchs_flop_counter_for_every_variant(variant):
    from torch.utils.flop_counter import FlopCounterMode

    kwargs = {**TINY, **variant}
    n, text_tokens = 3, 5
    with torch.device("meta"):  # shapes only; attention runs as the math path, whose two bmm the counter counts
        model = DiT(**kwargs, text_tokens=text_tokens if kwargs.get("condition") == "text" else None)
        x = torch.zeros(n, kwargs["in_channels"], kwargs["input_size"], kwargs["input_size"])
        t = torch.zeros(n, dtype=torch.long)
        y = {
            "class": torch.zeros(n, dtype=torch.long),
            "text": {"tokens": torch.zeros(n, text_tokens, 24), "pooled": torch.zeros(n, 24)},
            "none": None,
        }[kwargs.get("condition", "class")]
        with FlopCounterMode(display=False) as counter:
            model(x, t, y)
    condition_tokens = {"class": 1, "text": text_tokens, "none": 0}[kwargs.get("condition", "class")]
    macs = dit_forward_macs(
        kwargs["depth"],
        kwargs["hidden_size"],
        kwargs["patch_size"],
        kwargs["in_channels"],
        kwargs["input_size"],
        kwargs["learn_sigma"],
        kwargs.get("mlp_ratio", 4.0),
        conditioning=kwargs.get("conditioning", "adaln_zero"),
        ffn=kwargs.get("ffn", "mlp"),
        condition_tokens=condition_tokens,
        text_dim=kwargs.get("text_dim"),
    )
    assert counter.get_total_flops() == 2 * n * macs  # the counter counts 2 FLOPs per multiply-add


def test_job_time_of_dit_xl_2_is_the_hand_computation():
    # DiT-XL/2 at 256 px, the paper's 400K steps of batch 256, bf16 on one node of 8 A100s at 35 % MFU:
    # 3 passes x 2 FLOPs x 118.6e9 multiply-adds (DiT paper Table 4) = 711.6 GFLOPs per image,
    # x 256 x 400,000 = 7.287e19 FLOPs, / (8 x 312e12 x 0.35 = 8.736e14 FLOP/s) = 83,411 s = 23.2 h.
    per_image = training_flops_per_image(dit_forward_macs(**XL_2, learn_sigma=True))
    seconds = training_time_s(per_image, 256, 400_000, 8, A100_PEAK_FLOPS["bf16"])
    assert ASSUMED_MFU == 0.35
    assert seconds == pytest.approx(3 * 2 * 118.6e9 * 256 * 400_000 / (8 * 312e12 * 0.35), rel=5e-3)
    assert seconds / 3600 == pytest.approx(23.2, abs=0.1)
    assert training_time_s(per_image, 256, 400_000, 8, A100_PEAK_FLOPS["bf16"], mfu=0.7) == pytest.approx(seconds / 2)
    with pytest.raises(ValueError, match="mfu"):
        training_time_s(per_image, 256, 1, 8, A100_PEAK_FLOPS["bf16"], mfu=35)


def test_the_a100_peak_follows_autocast_and_the_tf32_switch():
    assert matmul_arithmetic("bf16", tf32=False) == "bf16" and matmul_arithmetic("fp16", tf32=True) == "fp16"
    assert matmul_arithmetic("no", tf32=True) == "tf32" and matmul_arithmetic("no", tf32=False) == "fp32"
    # NVIDIA A100 datasheet, dense: bf16/fp16 tensor cores 312 TFLOP/s, TF32 156, fp32 19.5
    assert A100_PEAK_FLOPS == {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}


def test_memory_matches_figure_1_of_the_zero_paper():
    # Rajbhandari et al. 2020, Figure 1: 7.5B parameters, 64 GPUs, mixed-precision Adam (K = 12).
    def total_gb(strategy):
        return memory_per_gpu(7_500_000_000, strategy, "fp16", world_size=64, ema=False)["total_bytes"] / GB

    assert total_gb("ddp") == pytest.approx(120.0)
    assert round(total_gb("zero1"), 1) == 31.4
    assert round(total_gb("zero2"), 1) == 16.6
    assert round(total_gb("zero3"), 1) == 1.9
    assert total_gb("fsdp") == pytest.approx(total_gb("zero3"))


def test_who_holds_what_under_each_stage():
    psi, n = 1000, 4
    ddp = memory_per_gpu(psi, "ddp", "bf16", n, ema=False)
    assert (ddp["weights_bytes"], ddp["grads_bytes"], ddp["master_weights_bytes"], ddp["optimizer_states_bytes"]) == (
        4000,
        4000,
        0,
        8000,
    )
    zero1 = memory_per_gpu(psi, "zero1", "bf16", n, ema=False)
    assert (
        zero1["weights_bytes"],
        zero1["grads_bytes"],
        zero1["master_weights_bytes"],
        zero1["optimizer_states_bytes"],
    ) == (2000, 2000, 1000, 2000)
    zero2 = memory_per_gpu(psi, "zero2", "bf16", n, ema=False)
    assert (zero2["weights_bytes"], zero2["grads_bytes"]) == (2000, 500)
    zero3 = memory_per_gpu(psi, "zero3", "bf16", n, ema=False)
    assert zero3["total_bytes"] == 16 * psi // n
    fp32 = memory_per_gpu(psi, "zero1", "no", n, ema=False)  # the spec's spelling of fp32
    assert (
        fp32["weights_bytes"],
        fp32["grads_bytes"],
        fp32["master_weights_bytes"],
        fp32["optimizer_states_bytes"],
    ) == (4000, 4000, 0, 2000)
    sgd = memory_per_gpu(psi, "ddp", "fp32", 1, optimizer="sgd", ema=False)
    assert sgd["optimizer_states_bytes"] == 4000


def test_ema_is_a_full_fp32_copy_unless_the_weights_are_sharded():
    psi, n = 1000, 4
    assert memory_per_gpu(psi, "zero2", "bf16", n)["ema_bytes"] == 4 * psi
    assert memory_per_gpu(psi, "zero3", "bf16", n)["ema_bytes"] == 4 * psi // n
    assert memory_per_gpu(psi, "zero3", "bf16", n, ema_sharded=False)["ema_bytes"] == 4 * psi
    assert memory_per_gpu(psi, "ddp", "bf16", n, ema=False)["ema_bytes"] == 0


def test_frozen_parameters_cost_weights_and_ema_only():
    with_frozen = memory_per_gpu(1000, "ddp", "bf16", 2, frozen_params=100)
    without = memory_per_gpu(1000, "ddp", "bf16", 2)
    assert with_frozen["total_bytes"] - without["total_bytes"] == 100 * (4 + 4)  # fp32 weight + fp32 EMA
    assert with_frozen["grads_bytes"] == without["grads_bytes"]


def test_offload_moves_optimizer_and_parameters_to_cpu():
    on_gpu = memory_per_gpu(1000, "zero3", "bf16", 4, ema=False)
    optimizer = memory_per_gpu(1000, "zero3", "bf16", 4, ema=False, offload="optimizer")
    assert optimizer["master_weights_bytes"] == optimizer["optimizer_states_bytes"] == 0
    assert optimizer["cpu_offloaded_bytes"] == 12 * 1000 // 4
    assert optimizer["total_bytes"] == on_gpu["total_bytes"] - optimizer["cpu_offloaded_bytes"]
    params = memory_per_gpu(1000, "zero3", "bf16", 4, ema=False, offload="optimizer+params")
    assert params["total_bytes"] == 2 * 1000 // 4  # only the 16-bit grad shard stays
    with pytest.raises(ValueError, match="zero3"):
        memory_per_gpu(1000, "zero2", "bf16", 4, offload="optimizer+params")
    with pytest.raises(ValueError, match="DeepSpeed"):
        memory_per_gpu(1000, "ddp", "bf16", 4, offload="optimizer")


def test_unknown_names_are_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="ddp, fsdp, zero1, zero2, zero3"):
        memory_per_gpu(1000, "zero4", "bf16", 4)
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        memory_per_gpu(1000, "ddp", "int8", 4)
    with pytest.raises(ValueError, match="adamw"):
        memory_per_gpu(1000, "ddp", "bf16", 4, optimizer="lion")


def test_activations_follow_korthikanti_adapted_to_dit_blocks():
    s, h, a, L = 256, 1152, 16, 28
    flash = dit_activation_bytes_per_sample(L, s, h, a, "bf16")
    assert flash == L * 40 * s * h  # 34 s h (Korthikanti eq. 1) - 2 (no dropout masks) + 8 (adaLN modulate and gate)
    assert dit_activation_bytes_per_sample(L, s, h, a, "bf16", flash_attention=False) == flash + L * 2 * a * s * s
    assert dit_activation_bytes_per_sample(L, s, h, a, "fp32") == 2 * flash
    checkpointed = dit_activation_bytes_per_sample(L, s, h, a, "bf16", checkpointing=True)
    assert checkpointed == L * 2 * s * h + 40 * s * h  # block inputs + one block recomputed
    memory = memory_per_gpu(100, "ddp", "bf16", 1, micro_batch=32, activation_bytes_per_sample=flash)
    assert memory["activations_bytes"] == 32 * flash
    assert memory_per_gpu(100, "ddp", "bf16", 1, micro_batch=32)["activations_bytes"] == 0  # not estimated


def test_comm_volume_is_ring_all_reduce_for_ddp_and_zero12_and_1_5x_for_zero3():
    psi, n = 1_000_000, 8
    ddp = comm_bytes_per_step(psi, "ddp", n, grad_bytes=2)
    assert ddp == round(2 * (n - 1) / n * psi * 2)
    assert comm_bytes_per_step(psi, "zero1", n) == ddp
    assert comm_bytes_per_step(psi, "zero2", n) == ddp
    assert comm_bytes_per_step(psi, "zero3", n) == round(1.5 * ddp)
    assert comm_bytes_per_step(psi, "fsdp", n) == round(1.5 * ddp)
    assert comm_bytes_per_step(psi, "ddp", 1) == 0
    assert comm_bytes_per_step(psi, "ddp", n, grad_bytes=4) == 2 * ddp


def test_gradient_accumulation_multiplies_only_per_micro_step_collectives():
    psi, n = 1_000_000, 8
    ring = (n - 1) / n
    # no_sync until the last micro step
    assert comm_bytes_per_step(psi, "ddp", n, grad_accum_steps=4) == comm_bytes_per_step(psi, "ddp", n)
    assert comm_bytes_per_step(psi, "zero1", n, grad_accum_steps=4) == comm_bytes_per_step(psi, "zero1", n)
    assert comm_bytes_per_step(psi, "zero2", n, grad_accum_steps=4) == round(ring * (4 * 2 * psi + 2 * psi))
    assert comm_bytes_per_step(psi, "zero3", n, grad_accum_steps=4) == 4 * comm_bytes_per_step(psi, "zero3", n)


def test_estimate_imports_without_torch():
    code = "import sys; import orchestrator.jobs.estimate; assert 'torch' not in sys.modules, 'estimate imported torch'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_scaling_bench_prints_the_table_and_its_assumptions_without_torch():
    code = (
        "import runpy, sys; sys.argv = ['scaling.py', '--markdown']; runpy.run_path('bench/scaling.py', "
        "run_name='__main__'); "
        "assert 'torch' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
    table = [line for line in result.stdout.splitlines() if line.startswith("| ") and "GB |" in line]
    assert len(table) == 4 * 4  # 1, 2, 8, 32 nodes x ddp, zero2, zero3, fsdp
    assert "675,129,632 parameters" in result.stdout and "Assumptions" in result.stdout


def test_orch_plan_prints_the_parameter_count_of_the_network_the_job_builds(tmp_path):
    from orchestrator.components.model import build_model
    from orchestrator.components.model_input import pixel_input
    from orchestrator.specs.job import load_spec
    from tests.helpers import orch, tiny_spec

    spec_file = tiny_spec(tmp_path)
    planned = orch("plan", str(spec_file), root=tmp_path / "runs")
    assert planned.returncode == 0, planned.stderr
    model = build_model(load_spec(spec_file), pixel_input(load_spec(spec_file), 10))
    assert f"parameters      {sum(p.numel() for p in model.parameters()):,} (" in planned.stdout
    assert "memory/rank     ~" in planned.stdout


def test_the_readme_scaling_table_is_what_bench_scaling_prints():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    printed = subprocess.run(
        [sys.executable, str(repo / "bench" / "scaling.py"), "--markdown"], capture_output=True, text=True, check=True
    ).stdout
    readme = (repo / "README.md").read_text()
    start, end = "<!-- scaling:start -->\n", "<!-- scaling:end -->"
    assert readme[readme.index(start) + len(start) : readme.index(end)] == printed, (
        "run bench/scaling.py --write-readme"
    )
