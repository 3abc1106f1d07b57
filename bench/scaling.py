"""Expected scaling of DiT-XL/2 training (256 px: 32x32x4 latents) over 1-32 nodes of 8x A100 80GB, for DDP, ZeRO-2 and
ZeRO-3 in bf16.

    .venv/bin/python bench/scaling.py [--markdown] [--micro-batch 32 | --global-batch 256] [--mfu 0.4]

Computed, not measured: pure arithmetic from orchestrator/jobs/estimate.py (no torch, no GPU), in well
under a second. Per optimizer step and per GPU it prints the bytes sent, the compute time, the
communication time, the scaling efficiency T_compute / T_step at both overlap bounds, and the
memory per GPU. Every assumption is printed with the table.

Model of a step
- Compute: micro_batch x 3 x forward FLOPs / (MFU x peak). Forward = 2 x 118.6e9 multiply-adds for
  DiT-XL/2 at 256 px (DiT paper Table 4 lists 118.6 "Gflops", which are multiply-adds; estimate.py
  recomputes them); training = forward + backward = 3 x forward.
- Communication: the collectives of estimate.collective_payload_bytes_per_step, each a
  reduce-scatter or all-gather run hierarchically: inside the node over NVLink (each GPU sends
  (G - 1) / G of the payload), then between nodes over each GPU's own 200 Gb/s NIC (each GPU sends
  (M - 1) / M of its 1 / G slice). The two phases are added, not overlapped. The bytes are those of
  a flat ring over all M x G GPUs, (MG - 1) / MG of the payload, split between the two links.
- Step time, two bounds. No overlap: T_compute + T_comm (lower bound on efficiency). Full
  overlap: every collective that can run during a pass hides behind it, T_forward +
  max(T_backward, comm in backward) + comm after backward, with T_forward = 1/3 and T_backward =
  2/3 of T_compute. What can overlap: DDP's gradient all-reduce and ZeRO-2's reduce-scatter run in
  backward (bucketed); ZeRO-2's all-gather of the updated weights follows the optimizer step and
  does not; ZeRO-3 prefetches its forward gathers during forward and its backward gathers and
  reduce-scatters during backward.
- Not modelled: collective latency (per-bucket start-up), stragglers, the optimizer step, data
  loading, switch congestion between nodes, SHARP in-network reduction.

Sources
- Peebles & Xie, "Scalable Diffusion Models with Transformers" (DiT), ICCV 2023: Table 4 (Gflops),
  batch 256.
- Rajbhandari et al., "ZeRO", SC 2020: Sec. 5 (memory per stage), Sec. 7 (communication volume).
- NVIDIA A100 Tensor Core GPU datasheet: 312 TFLOPS dense bf16, 80 GB HBM2e, NVLink 600 GB/s
  (bidirectional: 300 GB/s each way); DGX A100: 8x 200 Gb/s HDR InfiniBand for compute traffic.
- chuanyangjin/fast-DiT README: DiT-XL/2 on one A100, batch 128, fp16 + checkpointing: 0.84
  steps/s, 27.5 GB; i.e. ~108 images/s, ~25 % MFU counting 3x forward (33 % with the recompute).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.jobs.estimate import (  # noqa: E402
    GB,
    collective_payload_bytes_per_step,
    comm_bytes_per_step,
    dit_activation_bytes_per_sample,
    dit_forward_macs,
    dit_parameter_count,
    memory_per_gpu,
    training_flops_per_image,
)

# DiT-XL/2 at 256 px (model/dit.py DIT_SIZES["XL"], patch 2): 32x32x4 latents, 1000 classes, learned sigma.
DIT_XL_2 = dict(depth=28, hidden_size=1152, patch_size=2, in_channels=4, input_size=32)
NUM_HEADS = 16
NUM_CLASSES = 1000
TOKENS = (32 // 2) ** 2  # 256

# The machine: DGX A100-like nodes (NVIDIA A100 datasheet; DGX A100 system).
GPUS_PER_NODE = 8
PEAK_BF16_FLOPS = 312e12  # A100 dense bf16 tensor-core peak
GPU_MEMORY_BYTES = 80 * 2**30  # "80GB" is 81,920 MiB
NVLINK_BYTES_PER_S = 300e9  # 600 GB/s bidirectional = 300 GB/s each way, per GPU
NIC_BYTES_PER_S = 200e9 / 8  # one 200 Gb/s HDR InfiniBand port per GPU = 25 GB/s each way (8 per node = 200 GB/s)
LINK_EFFICIENCY = 0.8  # achieved / nominal bandwidth of NCCL collectives, assumed for both links

NODES = (1, 2, 8, 32)
STRATEGIES = ("ddp", "zero2", "zero3", "fsdp")
# Bytes per element sent. torch DDP under autocast keeps fp32 grads and all-reduces them in fp32
# (orch's engine; a bf16 compression hook would halve it). DeepSpeed bf16 reduces and gathers in
# bf16 (its communication_data_type defaults to the model's dtype). orch's FSDP gathers bf16
# weights and reduce-scatters fp32 grads (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)).
GRAD_BYTES = {"ddp": 4, "zero2": 2, "zero3": 2, "fsdp": 4}
PARAM_BYTES = {"ddp": 4, "zero2": 2, "zero3": 2, "fsdp": 2}
# orch's EMA follows the full fp32 weights (orchestrator/train/zero.py, fsdp.py): under ZeRO and FSDP every EMA
# update gathers them, after the optimizer step, in fp32. ZeRO-1/2 (DeepSpeed's safe_get_full_fp32_param) all-reduce
# each rank's fragment over zeros: 2 payloads; ZeRO-3 and FSDP all-gather: 1 payload. DDP holds them already.
EMA_GATHER_PAYLOADS = {"ddp": 0, "zero2": 2, "zero3": 1, "fsdp": 1}


def overlap_phases(params: int, strategy: str) -> dict[str, int]:
    """Collective payload bytes of one step by the pass they can hide behind: forward, backward, or none (after
    backward)."""
    grads = params * GRAD_BYTES[strategy]
    weights = params * PARAM_BYTES[strategy]
    phases = {
        "ddp": {
            "forward": 0,
            "backward": 2 * grads,
            "after": 0,
        },  # all-reduce of gradient buckets as backward produces them
        "zero2": {
            "forward": 0,
            "backward": grads,
            "after": weights,
        },  # reduce-scatter in backward; all-gather after the optimizer step
        "zero3": {
            "forward": weights,
            "backward": weights + grads,
            "after": 0,
        },  # prefetched gathers; reduce-scatter in backward
        "fsdp": {
            "forward": weights,
            "backward": weights + grads,
            "after": 0,
        },  # the same schedule (FSDP2 prefetches the next block)
    }[strategy]
    assert sum(phases.values()) == collective_payload_bytes_per_step(
        params, strategy, GRAD_BYTES[strategy], PARAM_BYTES[strategy]
    )
    return phases


def hierarchical_sent_bytes(payload_bytes: float, nodes: int) -> tuple[float, float]:
    """Bytes each GPU sends over NVLink and over its NIC for reduce-scatters / all-gathers totalling payload_bytes."""
    g, m = GPUS_PER_NODE, nodes
    nvlink_bytes = (g - 1) / g * payload_bytes  # ring inside the node: each GPU sends (G-1)/G of the data
    nic_bytes = (m - 1) / m * payload_bytes / g  # ring across nodes on one rail: each GPU carries 1/G of the data
    return nvlink_bytes, nic_bytes


def collective_seconds(payload_bytes: float, nodes: int) -> float:
    """Time of reduce-scatters / all-gathers totalling payload_bytes: the NVLink phase, then the InfiniBand phase."""
    nvlink_bytes, nic_bytes = hierarchical_sent_bytes(payload_bytes, nodes)
    return nvlink_bytes / (NVLINK_BYTES_PER_S * LINK_EFFICIENCY) + nic_bytes / (NIC_BYTES_PER_S * LINK_EFFICIENCY)


def rows(micro_batch: int | None, global_batch: int | None, mfu: float, checkpointing: bool) -> list[dict]:
    trainable = dit_parameter_count(**DIT_XL_2, num_classes=NUM_CLASSES, learn_sigma=True, include_frozen=False)
    total = dit_parameter_count(**DIT_XL_2, num_classes=NUM_CLASSES, learn_sigma=True)
    flops_per_image = training_flops_per_image(dit_forward_macs(**DIT_XL_2, learn_sigma=True), checkpointing)
    activation_bytes = dit_activation_bytes_per_sample(
        DIT_XL_2["depth"], TOKENS, DIT_XL_2["hidden_size"], NUM_HEADS, "bf16", checkpointing
    )
    out = []
    for nodes in NODES:
        gpus = nodes * GPUS_PER_NODE
        if global_batch is not None:
            if global_batch % gpus:
                raise SystemExit(f"--global-batch {global_batch} does not split over {gpus} GPUs")
            batch = global_batch // gpus
        else:
            batch = micro_batch
        compute_s = batch * flops_per_image / (mfu * PEAK_BF16_FLOPS)
        for strategy in STRATEGIES:
            phases = overlap_phases(trainable, strategy)
            ema_payload = EMA_GATHER_PAYLOADS[strategy] * trainable * 4  # fp32, once per step (ema.update_every: 1)
            phases["after"] += ema_payload
            nvlink_bytes, nic_bytes = hierarchical_sent_bytes(sum(phases.values()), nodes)
            phases_s = {phase: collective_seconds(payload, nodes) for phase, payload in phases.items()}
            comm_s = sum(phases_s.values())
            forward_s, backward_s = compute_s / 3, 2 * compute_s / 3  # backward = 2x forward
            overlapped_step_s = (
                max(forward_s, phases_s["forward"]) + max(backward_s, phases_s["backward"]) + phases_s["after"]
            )
            memory = memory_per_gpu(
                trainable,
                strategy,
                "bf16",
                gpus,
                batch,
                activation_bytes,
                frozen_params=total - trainable,
                ema_sharded=False,  # orch keeps the EMA of the full weights on every rank, under every strategy
            )
            out.append(
                {
                    "nodes": nodes,
                    "gpus": gpus,
                    "strategy": strategy,
                    "micro_batch": batch,
                    "ring_sent_bytes": comm_bytes_per_step(
                        trainable, strategy, gpus, GRAD_BYTES[strategy], PARAM_BYTES[strategy]
                    )
                    + (gpus - 1) / gpus * ema_payload,
                    "nvlink_sent_bytes": nvlink_bytes,
                    "nic_sent_bytes": nic_bytes,
                    "compute_s": compute_s,
                    "comm_s": comm_s,
                    "efficiency_no_overlap": compute_s / (compute_s + comm_s),
                    "efficiency_full_overlap": compute_s / overlapped_step_s,
                    "images_per_s_no_overlap": gpus * batch / (compute_s + comm_s),
                    "memory_bytes": memory["total_bytes"],
                }
            )
    return out


def assumptions(micro_batch: int | None, global_batch: int | None, mfu: float, checkpointing: bool) -> list[str]:
    trainable = dit_parameter_count(**DIT_XL_2, num_classes=NUM_CLASSES, learn_sigma=True, include_frozen=False)
    total = dit_parameter_count(**DIT_XL_2, num_classes=NUM_CLASSES, learn_sigma=True)
    macs = dit_forward_macs(**DIT_XL_2, learn_sigma=True)
    flops = training_flops_per_image(macs, checkpointing)
    batch = (
        (
            f"micro batch {micro_batch} per GPU (global {micro_batch * GPUS_PER_NODE} per node, the DiT paper's batch "
            "256 on one 8-GPU node; "
            f"weak scaling: the global batch grows with the nodes)"
        )
        if global_batch is None
        else f"global batch {global_batch} fixed (strong scaling): the micro batch per GPU shrinks with the nodes"
    )
    return [
        f"Model: DiT-XL/2, 32x32x4 latents (256 px), 1000 classes, learned sigma: {total:,} parameters ({trainable:,} "
        "trainable; "
        f"the sin-cos pos_embed is frozen); forward {macs / 1e9:.1f} G multiply-adds = {2 * macs / 1e9:.1f} GFLOPs per "
        "image "
        f"(DiT paper Table 4: 118.6 'Gflops'); training {'4x (activation checkpointing)' if checkpointing else '3x'} "
        f"forward = {flops / 1e9:.0f} GFLOPs per image.",
        f"Compute: {mfu:.0%} MFU of the A100's {PEAK_BF16_FLOPS / 1e12:.0f} TFLOPS dense bf16 = "
        f"{mfu * PEAK_BF16_FLOPS / flops:.0f} images/s per GPU "
        "(fast-DiT measured ~108 images/s on one A100 with fp16 and checkpointing, ~25 % MFU; lower MFU makes "
        "scaling look better).",
        f"Batch: {batch}.",
        f"Network: NVLink {NVLINK_BYTES_PER_S / 1e9:.0f} GB/s per GPU each way (600 GB/s bidirectional), InfiniBand 8x "
        "200 Gb/s per node "
        f"= {NIC_BYTES_PER_S * GPUS_PER_NODE / 1e9:.0f} GB/s each way, one NIC per GPU; both at {LINK_EFFICIENCY:.0%} "
        "efficiency. "
        "Collectives hierarchical (NVLink ring in the node, then a ring across nodes per rail), phases added.",
        "Traffic per step (ZeRO paper Sec. 7): DDP all-reduces the grads (2x model); ZeRO-2 reduce-scatters grads and "
        "all-gathers "
        "weights (2x model); ZeRO-3 gathers weights twice and reduce-scatters grads (3x model). DDP's grads are fp32 "
        "(torch autocast keeps "
        "fp32 grads; a bf16 compression hook would halve DDP's traffic); DeepSpeed communicates in bf16; FSDP (FSDP2 "
        "in orch) "
        "follows ZeRO-3's schedule with bf16 weight gathers and fp32 gradient reduce-scatters. No gradient "
        "accumulation.",
        "EMA: orch keeps it of the full fp32 weights on the GPU, so under ZeRO and FSDP every update gathers them "
        "after the optimizer "
        "step, not overlapped: ZeRO-2 by an all-reduce of each rank's fragment over zeros (2x the fp32 model), ZeRO-3 "
        "and FSDP by an "
        "all-gather (1x); counted here with ema.update_every 1 (k divides it by k). It runs as one collective per "
        "parameter tensor "
        "(about 290 for XL/2), whose latency is not modelled; a sharded EMA (each rank averaging its own shard) would "
        "remove it.",
        "Efficiency = T_compute / T_step. 'No overlap': T_step = T_compute + T_comm. 'Full overlap': collectives hide "
        "behind the pass they "
        "belong to (forward = 1/3, backward = 2/3 of T_compute): DDP's all-reduce and ZeRO-2's reduce-scatter behind "
        "backward, ZeRO-2's weight "
        "all-gather after the optimizer step (not hidden), ZeRO-3's gathers prefetched in forward and backward. "
        "Not modelled: collective latency, stragglers, optimizer step, data loading, congestion.",
        "Memory per GPU (estimate.memory_per_gpu): weights, grads, fp32 master + AdamW states, a fp32 EMA (full on "
        "every rank, as orch keeps it "
        "under every strategy; a sharded EMA would save 2.5 GB under ZeRO-3 and FSDP), activations "
        f"{'with' if checkpointing else 'without'} checkpointing and with flash/SDPA attention (Korthikanti et al. "
        "2022, eq. 1, adapted to DiT blocks); without the CUDA context, buckets, ZeRO-3's gathered layers, autocast's "
        "weight copies and "
        "fragmentation: a lower bound (fast-DiT measured 27.5 GB where the same formula gives 17.1 GB). An A100 80GB "
        f"holds {GPU_MEMORY_BYTES / GB:.1f} GB.",
    ]


def print_text(table: list[dict], notes: list[str]) -> None:
    print("Expected scaling of DiT-XL/2 (256 px) training, bf16, on 8x A100 80GB nodes: computed, not measured.")
    print(
        "Sent per GPU per step: over a flat ring (estimate.comm_bytes_per_step), and hierarchically over NVLink and "
        "over the GPU's InfiniBand NIC.\n"
    )
    print(
        f"{'nodes':>5} {'GPUs':>5} {'strategy':>8} {'batch/GPU':>9} {'ring sent':>10} {'NVLink sent':>12} "
        f"{'IB sent':>9} {'compute':>9} {'comm':>9} "
        f"{'eff. no overlap':>16} {'eff. full overlap':>18} {'img/s no overlap':>17} {'memory/GPU':>11}"
    )
    for r in table:
        print(
            f"{r['nodes']:>5} {r['gpus']:>5} {r['strategy']:>8} {r['micro_batch']:>9} "
            f"{r['ring_sent_bytes'] / GB:>7.2f} GB {r['nvlink_sent_bytes'] / GB:>9.2f} GB "
            f"{r['nic_sent_bytes'] / GB:>6.2f} GB {r['compute_s'] * 1e3:>6.0f} ms {r['comm_s'] * 1e3:>6.1f} ms "
            f"{r['efficiency_no_overlap']:>16.1%} {r['efficiency_full_overlap']:>18.1%} "
            f"{r['images_per_s_no_overlap']:>17,.0f} {r['memory_bytes'] / GB:>8.1f} GB"
        )
    print("\nAssumptions:")
    for note in notes:
        print(f"- {note}")


def print_markdown(table: list[dict], notes: list[str]) -> None:
    print(
        "| nodes (GPUs) | strategy | batch per GPU | sent per GPU per step: ring / NVLink / InfiniBand | compute | "
        "communication | "
        "efficiency, no overlap | efficiency, full overlap | images/s, no overlap | memory per GPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['nodes']} ({r['gpus']}) | {r['strategy']} | {r['micro_batch']} | "
            f"{r['ring_sent_bytes'] / GB:.2f} / {r['nvlink_sent_bytes'] / GB:.2f} / {r['nic_sent_bytes'] / GB:.2f} GB "
            "| "
            f"{r['compute_s'] * 1e3:.0f} ms | {r['comm_s'] * 1e3:.1f} ms | {r['efficiency_no_overlap']:.1%} | "
            f"{r['efficiency_full_overlap']:.1%} | "
            f"{r['images_per_s_no_overlap']:,.0f} | {r['memory_bytes'] / GB:.1f} GB |"
        )
    print("\nComputed by `bench/scaling.py`, not measured (GB = 10^9 bytes). Assumptions:\n")
    for note in notes:
        print(f"- {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a README-ready Markdown table")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--micro-batch", type=int, default=32, help="images per GPU per step (weak scaling; default 32)")
    batch.add_argument("--global-batch", type=int, default=None, help="images per step over all GPUs (strong scaling)")
    parser.add_argument(
        "--mfu", type=float, default=0.4, help="model FLOPs utilisation of the A100's bf16 peak (default 0.4)"
    )
    parser.add_argument(
        "--checkpointing", action="store_true", help="activation checkpointing: 4x forward compute, block inputs kept"
    )
    parser.add_argument(
        "--write-readme",
        action="store_true",
        help="write the Markdown table into README.md between the scaling markers",
    )
    args = parser.parse_args()
    micro_batch = None if args.global_batch is not None else args.micro_batch
    table = rows(micro_batch, args.global_batch, args.mfu, args.checkpointing)
    notes = assumptions(micro_batch, args.global_batch, args.mfu, args.checkpointing)
    if not args.write_readme:
        (print_markdown if args.markdown else print_text)(table, notes)
        return
    import contextlib
    import io
    import re

    markdown = io.StringIO()
    with contextlib.redirect_stdout(markdown):
        print_markdown(table, notes)
    readme = Path(__file__).resolve().parents[1] / "README.md"
    start, end = "<!-- scaling:start -->\n", "<!-- scaling:end -->"
    text = readme.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start.strip()} ... {end} markers")
    readme.write_text(
        re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: start + markdown.getvalue() + end, text, flags=re.S)
    )
    print(f"scaling table written into {readme}")


if __name__ == "__main__":
    main()
