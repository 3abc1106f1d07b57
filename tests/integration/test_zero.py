"""DeepSpeed ZeRO 1/2/3 through ZeroEngine on CPU: 2 ranks over gloo train a tiny DiT, resume bitwise, consolidate,
reshard.

Each run is tests/zero_train_probe.py under torchrun (the Trainer's loop in miniature: accumulation,
clipping, an LR warmup, EMA, checkpoints); its global batch is 4 per micro batch x 2 ranks x 2
accumulation steps (or x 1 rank x 4 after a world-size change). DeepSpeed compiles its
`deepspeed_shm_comm` op at the first collective: the session fixture builds it once, in one process,
into the venv's cache (30-40 s on 2 cores; about twice that when two ranks start on an empty cache),
and prints how long it took. Warm, the file takes about 1.5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "tests" / "zero_train_probe.py"
STEPS, SAVE_AT = 6, 3


def _env() -> dict:
    from orchestrator.train.zero import extensions_dir

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    # One thread per rank: 2 ranks share 2 cores, and the thread count changes results.
    return {
        **env,
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": str(extensions_dir()),
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": str(ROOT),
    }


@pytest.fixture(scope="session")
def deepspeed_ops(pytestconfig):
    """DeepSpeed's CPU comm op, compiled once into the venv's extension cache (a no-op when it is there)."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        pytest.fail(
            "DeepSpeed is not installed: DS_BUILD_OPS=0 .venv/bin/pip install --no-build-isolation deepspeed==0.19.8 "
            "'torch==2.13.0'"
        )
    code = (
        "import time; t = time.perf_counter()\n"
        "from deepspeed.accelerator import get_accelerator\n"
        "get_accelerator().create_op_builder('ShareMemCommBuilder').load()\n"
        "print(f'BUILT {time.perf_counter() - t:.1f}')\n"
    )
    began = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=600, check=False
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    load_s = float(out.stdout.split("BUILT ")[-1])
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(
            f"\n[test_zero] deepspeed_shm_comm ready in {load_s:.1f} s ({time.perf_counter() - began:.1f} s with "
            "imports; "
            f"over 10 s means it was compiled now, into {_env()['TORCH_EXTENSIONS_DIR']})"
        )


def probe(out: Path, *args: str, processes: int = 2) -> dict:
    """Run the probe (torchrun with 2 ranks, or plain python for 1); its result.json."""
    if processes == 1:
        argv = [sys.executable, str(PROBE), "--world-size", "1"]
    else:
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
            str(PROBE),
        ]
    began = time.perf_counter()
    done = subprocess.run(
        [*argv, "--out", str(out), *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, f"probe {args} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    result = json.loads((out / "result.json").read_text())
    result["wall_s"] = time.perf_counter() - began
    return result


@pytest.fixture(scope="module")
def runs(deepspeed_ops, tmp_path_factory):
    """Uninterrupted 2-rank runs of STEPS steps, by (stage, precision), made on first use and shared by the tests."""
    cache: dict = {}

    def get(stage: int, precision: str) -> tuple[Path, dict]:
        if (stage, precision) not in cache:
            out = tmp_path_factory.mktemp(f"zero{stage}-{precision}")
            # ZeRO-3 bf16 checkpoints every step: the test of its EMA rebuilds the EMA from them.
            saves = range(1, STEPS + 1) if (stage, precision) == (3, "bf16") else (SAVE_AT, STEPS)
            args = ["--stage", str(stage), "--precision", precision, "--steps", str(STEPS), "--ema-reference"]
            cache[stage, precision] = out, probe(out, *args, *[a for s in saves for a in ("--save-at", str(s))])
        return cache[stage, precision]

    return get


def tiny_dit():
    sys.path.insert(0, str(PROBE.parent))
    from tests.zero_train_probe import tiny_dit as make

    return make()


def assert_bitwise_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: other tensors ({sorted(a.keys() ^ b.keys())[:5]})"
    different = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a if not a[k].equal(b[k])}
    assert not different, f"{what}: {len(different)} of {len(a)} tensors differ, e.g. {list(different.items())[:3]}"


# ZeRO-1 is left out: DeepSpeed runs it with ZeRO-2's optimizer class and checkpoint layout (gradients not partitioned).
CASES = [(2, "bf16"), (3, "bf16"), (3, "no")]
# Resume is checked where the checkpoint formats differ (ZeRO-2 and ZeRO-3).
RESUME_CASES = [(2, "bf16"), (3, "bf16")]


@pytest.mark.slow
@pytest.mark.parametrize("stage,precision", CASES, ids=[f"zero{s}-{p}" for s, p in CASES])
def test_zero_trains_with_ranks_agreeing(runs, stage, precision):
    _, result = runs(stage, precision)
    print(f"zero{stage}-{precision}: {result['wall_s']:.1f} s, eval loss {result['eval_losses']}")
    assert result["world_size"] == 2
    assert result["ranks_agree"], "EMA or final weights differ across ranks"
    assert result["module_dtype"] == ("torch.bfloat16" if precision == "bf16" else "torch.float32")
    evals = {int(k): v for k, v in result["eval_losses"].items()}
    assert evals[STEPS] < 0.9 * evals[0], f"the loss on a fixed batch did not go down: {evals}"
    assert all(math.isfinite(v) and v > 0 for v in result["grad_norms"].values())
    assert [round(result["lrs"][str(s)], 6) for s in range(3)] == [0.001, 0.002, 0.003], (
        "the LR warmup did not reach DeepSpeed's optimizer"
    )


@pytest.mark.slow
@pytest.mark.parametrize("stage,precision", RESUME_CASES, ids=[f"zero{s}-{p}" for s, p in RESUME_CASES])
def test_zero_resume_from_checkpoint_is_bitwise_exact(runs, stage, precision, tmp_path):
    out, uninterrupted = runs(stage, precision)
    resumed = probe(
        tmp_path,
        "--stage",
        str(stage),
        "--precision",
        precision,
        "--steps",
        str(STEPS),
        "--resume",
        str(out / f"step-{SAVE_AT}"),
        "--ema-reference",
    )
    assert resumed["losses"] == {k: v for k, v in uninterrupted["losses"].items() if int(k) > SAVE_AT}
    assert_bitwise_equal(
        load_file(tmp_path / "final.safetensors"), load_file(out / "final.safetensors"), "weights after resume"
    )
    assert_bitwise_equal(
        load_file(tmp_path / "ema.safetensors"), load_file(out / "ema.safetensors"), "EMA after resume"
    )


@pytest.mark.slow
@pytest.mark.parametrize("stage,precision", CASES, ids=[f"zero{s}-{p}" for s, p in CASES])
def test_zero_full_weights_equal_the_consolidated_checkpoint(runs, stage, precision):
    from orchestrator.train.zero import ZeroEngine

    out, _ = runs(stage, precision)
    consolidated = ZeroEngine.consolidated_weights(out / f"step-{STEPS}")  # zero_to_fp32, in this one process
    assert_bitwise_equal(load_file(out / "final.safetensors"), consolidated, "full_state_dict vs zero_to_fp32")
    assert_bitwise_equal(
        load_file(out / f"step-{STEPS}" / "model.safetensors"), consolidated, "the checkpoint's model.safetensors"
    )


@pytest.mark.slow
def test_zero3_consolidated_weights_load_into_a_plain_dit(runs):
    from orchestrator.train.zero import ZeroEngine

    out, _ = runs(3, "bf16")
    weights = ZeroEngine.consolidated_weights(out / f"step-{STEPS}")
    model = tiny_dit()
    model.load_state_dict(weights, strict=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        y = model(torch.randn(2, 1, 8, 8), torch.tensor([3, 50]), torch.tensor([1, 2]))
    assert y.shape == (2, 1, 8, 8) and torch.isfinite(y).all()
    assert y.abs().sum() > 0, (
        "the output layer is zero-initialised: an all-zero output means the trained weights did not load"
    )


@pytest.mark.slow
def test_zero3_fp32_ema_equals_an_ema_of_the_gathered_parameters(runs):
    """fp32: the module's weights are the master weights, so an EMA of them (gathered independently) must match bit for
    bit."""
    out, _ = runs(3, "no")
    assert_bitwise_equal(
        load_file(out / "ema.safetensors"),
        load_file(out / "ema_reference.safetensors"),
        "EMA vs GatheredParameters EMA",
    )


@pytest.mark.slow
def test_zero3_bf16_ema_equals_an_ema_of_the_consolidated_fp32_weights(runs):
    """bf16: the EMA follows the fp32 master weights; rebuilt offline from every step's consolidated checkpoint, it
    matches bit for bit."""
    from model.ema import EMA
    from orchestrator.train.zero import ZeroEngine

    out, _ = runs(3, "bf16")
    torch.manual_seed(5)  # the probe's seed: the EMA starts from the initial weights
    reference = EMA(tiny_dit(), decay=0.9, warmup_power=0)
    plain = tiny_dit()
    for step in range(1, STEPS + 1):
        plain.load_state_dict(ZeroEngine.consolidated_weights(out / f"step-{step}"))
        reference.update(plain, step)
    assert_bitwise_equal(
        load_file(out / "ema.safetensors"), reference.module.state_dict(), "EMA vs EMA of consolidated checkpoints"
    )
    # An EMA of the bf16 module weights (what a gather of the module gives) is only close: bf16 rounding.
    rounded = load_file(out / "ema_reference.safetensors")
    ema = load_file(out / "ema.safetensors")
    assert max((ema[k] - rounded[k]).abs().max().item() for k in ema) < 1e-2


RESHARD_CASES = [(2, "universal"), (3, "universal"), (2, "weights")]


@pytest.mark.slow
@pytest.mark.parametrize("stage,reshard", RESHARD_CASES, ids=[f"zero{s}-{r}" for s, r in RESHARD_CASES])
def test_zero_checkpoint_of_two_ranks_continues_on_one_process(runs, tmp_path, stage, reshard):
    """A world-size change: 2 ranks' shards -> 1 process with 4 accumulation steps, which sees the same global batches.

    universal: DeepSpeed's universal checkpoint carries the AdamW state over, so the continuation
    follows the 2-rank run up to summation order (bf16 gradients summed in another order: close, not
    bitwise). weights: the consolidated fp32 weights only; the AdamW moments restart from zero and
    the continuation visibly departs from the 2-rank run (which is what makes the first check mean something).
    """
    out, two_ranks = runs(stage, "bf16")
    args = [
        "--stage",
        str(stage),
        "--precision",
        "bf16",
        "--accum",
        "4",
        "--steps",
        str(STEPS),
        "--resume",
        str(out / f"step-{SAVE_AT}"),
        "--reshard",
        reshard,
    ]
    result = probe(tmp_path, *args, processes=1)
    print(f"zero{stage} 2 ranks -> 1 process ({reshard}): {result['wall_s']:.1f} s")
    assert result["world_size"] == 1
    assert result["init_exact"], "the fp32 master weights are not the consolidated ones"
    assert result["eval_losses"][str(SAVE_AT)] == two_ranks["eval_losses"][str(SAVE_AT)], (
        "the 1-process model does not compute what the 2-rank model did"
    )
    assert result["lrs"][str(SAVE_AT)] == two_ranks["lrs"][str(SAVE_AT)], (
        "the learning rate did not continue from the schedule"
    )

    start = load_file(out / f"step-{SAVE_AT}" / "model.safetensors")
    reference, continued = load_file(out / "final.safetensors"), load_file(tmp_path / "final.safetensors")
    update = torch.cat([(reference[k] - start[k]).flatten() for k in reference]).norm()
    departure = torch.cat([(continued[k] - reference[k]).flatten() for k in reference]).norm() / update
    if reshard == "universal":
        assert departure < 0.03, (
            f"the 1-process continuation departs from the 2-rank run by {departure:.1%} of its update"
        )
        for step, loss in two_ranks["losses"].items():
            if int(step) > SAVE_AT:
                assert abs(result["losses"][step] - loss) < 1e-4, (step, result["losses"][step], loss)
    else:
        assert departure > 0.1, f"restarting AdamW from zero changed the continuation by only {departure:.1%}"
        assert result["eval_losses"][str(STEPS)] < result["eval_losses"][str(SAVE_AT)], (
            "training did not go on from the consolidated weights"
        )
