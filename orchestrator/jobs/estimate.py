"""Back-of-envelope sizing of a training job: DiT parameters and FLOPs, memory per GPU, communication per step.

Pure arithmetic on plain numbers (no torch), so `orch plan` can print it in a fraction of a second.
Every figure is an estimate of the steady state of a training step; what it leaves out is listed
in each function's docstring. Bytes are bytes; "GB" in docstrings is 10**9 bytes (the ZeRO paper's).

Sources
- DiT layout: Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023, and the
  official facebookresearch/DiT models.py, which model/dit.py follows name for name.
- DiT FLOPs: the paper's Table 4 (DiT-XL/2 at 256 px: 118.6 "Gflops" forward). Those are
  multiply-accumulates (fvcore's convention): dit_forward_macs reproduces 118.6e9; FLOPs are 2x.
- Memory: Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter
  Models", SC 2020, Sec. 3.1 (mixed-precision Adam holds 2 + 2 + K bytes/param, K = 12) and
  Figure 1 (7.5B params on 64 GPUs: 120 / 31.4 / 16.6 / 1.9 GB for DDP / P_os / P_os+g / P_os+g+p).
- Activations: Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
  Models", MLSys 2023, Sec. 4.1, eq. (1): s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit.
- Communication: ZeRO paper Sec. 7 (DDP all-reduce = reduce-scatter + all-gather = 2 x model size
  per GPU; ZeRO-1/2 the same; ZeRO-3 1.5x); ring collectives (Patarasuk & Yuan 2009), where each GPU
  sends (N - 1) / N of the data per reduce-scatter or all-gather.
"""

from __future__ import annotations

import math

STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
PRECISIONS = ("fp32", "bf16", "fp16")
OFFLOADS = (None, "optimizer", "optimizer+params")

# Optimizer state in fp32 bytes per trainable parameter: Adam keeps momentum and variance (4 + 4);
# SGD with momentum keeps the momentum (4).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "sgd": 4}

# orch's EMA (model/ema.py) is a float32 copy of every parameter.
EMA_BYTES_PER_PARAM = 4

GB = 10**9


def _precision(precision: str) -> str:
    """The spec spells fp32 `no` (train.mixed_precision); accept both."""
    precision = "fp32" if precision == "no" else precision
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (valid: {', '.join(PRECISIONS)}, or 'no' for fp32)")
    return precision


def _linear(in_features: int, out_features: int) -> int:
    """Parameters of nn.Linear with bias."""
    return in_features * out_features + out_features


#################################################################################
#                         DiT: parameters, FLOPs, activations                   #
#################################################################################


def dit_parameter_count(
    depth: int,
    hidden_size: int,
    patch_size: int,
    in_channels: int,
    input_size: int,
    num_classes: int,
    learn_sigma: bool,
    mlp_ratio: float = 4.0,
    class_dropout_prob: float = 0.1,
    conditioning: str = "adaln_zero",
    condition: str = "class",
    ffn: str = "mlp",
    pos_embed: str = "sincos",
    text_dim: int | None = None,
    frequency_embedding_size: int = 256,
    include_frozen: bool = True,
) -> int:
    """Parameters of model/dit.py's DiT in closed form; equals sum(p.numel() for p in model.parameters()).

    include_frozen=True counts the fixed sin-cos pos_embed, a frozen nn.Parameter (T x D), as
    `model.parameters()` and the official DiT's "DiT Parameters:" print do: DiT-XL/2 at 32x32x4,
    1000 classes, learned sigma has 675,129,632. include_frozen=False gives the trainable ones
    (674,834,720: what gets gradients, optimizer state and all-reduce traffic). A learned pos_embed
    is trainable and always counted. num_heads does not change the count.
    """
    D = hidden_size
    F = int(hidden_size * mlp_ratio)  # make_ffn: hidden_features = int(D * mlp_ratio)
    T = (input_size // patch_size) ** 2  # tokens
    C_out = 2 * in_channels if learn_sigma else in_channels  # learned sigma doubles the output channels
    has_null = class_dropout_prob > 0  # the null class / null caption exists only when labels are dropped

    patch_embed = in_channels * patch_size * patch_size * D + D  # Conv2d(C, D, p, stride p) with bias
    t_embed = _linear(frequency_embedding_size, D) + _linear(D, D)  # TimestepEmbedder: 256 -> D -> D
    if condition == "class":
        y_embed = (num_classes + int(has_null)) * D  # LabelEmbedder table, (K + 1) x D with label dropout
    elif condition == "text":
        if text_dim is None:
            raise ValueError("condition='text' needs text_dim")
        y_embed = _linear(text_dim, D) + (D if has_null else 0)  # TextEmbedder: projection + null caption token
    elif condition == "none":
        y_embed = 0
    else:
        raise ValueError(f"unknown condition {condition!r} (valid: class, text, none)")
    if pos_embed not in ("sincos", "learned"):
        raise ValueError(f"unknown pos_embed {pos_embed!r} (valid: sincos, learned)")
    positions = T * D if (pos_embed == "learned" or include_frozen) else 0  # pos_embed (1, T, D)

    attention = _linear(D, 3 * D) + _linear(D, D)  # fused qkv + output projection
    if ffn == "mlp":
        feed_forward = _linear(D, F) + _linear(F, D)  # fc1, fc2
    elif ffn == "conv":
        feed_forward = _linear(D, F) + (F * 3 * 3 + F) + _linear(F, D)  # fc1, 3x3 depthwise conv, fc2
    else:
        raise ValueError(f"unknown ffn {ffn!r} (valid: mlp, conv)")
    if conditioning in ("adaln_zero", "adaln"):
        block = attention + feed_forward + _linear(D, 6 * D)  # + adaLN: shift, scale, gate for both branches
        final = _linear(D, 2 * D) + _linear(D, patch_size * patch_size * C_out)  # adaLN shift, scale + output
    elif conditioning == "cross_attention":
        cross = _linear(D, D) + _linear(D, 2 * D) + _linear(D, D)  # q, kv, proj
        block = attention + cross + feed_forward + 3 * 2 * D  # + three affine LayerNorms (weight, bias)
        final = _linear(D, 2 * D) + _linear(D, patch_size * patch_size * C_out)  # still adaLN-modulated
    elif conditioning == "in_context":
        block = attention + feed_forward + 2 * 2 * D  # + two affine LayerNorms
        final = 2 * D + _linear(D, patch_size * patch_size * C_out)  # affine LayerNorm + output, no adaLN
    else:
        raise ValueError(
            f"unknown conditioning {conditioning!r} (valid: adaln_zero, adaln, cross_attention, in_context)"
        )

    return patch_embed + t_embed + y_embed + positions + depth * block + final


def dit_forward_macs(
    depth: int,
    hidden_size: int,
    patch_size: int,
    in_channels: int,
    input_size: int,
    learn_sigma: bool,
    mlp_ratio: float = 4.0,
    frequency_embedding_size: int = 256,
    *,
    conditioning: str = "adaln_zero",
    ffn: str = "mlp",
    condition_tokens: int = 1,
    text_dim: int | None = None,
) -> int:
    """Multiply-accumulates of one image's forward pass through model/dit.py's DiT (matmuls and convolutions only).

    With the defaults, the published adaLN-Zero DiT: the DiT paper's Table 4 "Gflops" are these (fvcore
    counts a multiply-add as one flop): DiT-XL/2 at 32x32x4 gives 118.6e9. Multiply by 2 for FLOPs.
    The variants: ffn "conv" adds a 3x3 depthwise convolution over the T patch positions; conditioning
    "cross_attention" drops the blocks' adaLN and adds cross-attention from the T image tokens to the
    S = 1 + condition_tokens condition tokens (the timestep and the class token, or the caption
    tokens; 0 for condition none); "in_context" runs every block over S + T tokens and ends in an
    unmodulated final layer. text_dim (condition text): the projection of the caption tokens and the
    pooled caption to the width. Leaves out norms, activations, softmax and the label lookup (each
    O(T * D), under 0.5 % here).
    """
    D = hidden_size
    F = int(hidden_size * mlp_ratio)
    T = (input_size // patch_size) ** 2
    C_out = 2 * in_channels if learn_sigma else in_channels
    S = 1 + condition_tokens  # the timestep token and the condition tokens (cross-attention and in-context)
    patch_embed = T * (in_channels * patch_size * patch_size) * D  # one (C p p) -> D projection per token
    t_embed = frequency_embedding_size * D + D * D  # once per image
    y_embed = (condition_tokens + 1) * text_dim * D if text_dim else 0  # caption tokens and pooled caption -> D
    per_token = D * 3 * D + D * D + D * F + F * D  # qkv, proj, fc1, fc2 per token
    if ffn not in ("mlp", "conv"):
        raise ValueError(f"unknown ffn {ffn!r} (valid: mlp, conv)")
    depthwise = 9 * F * T if ffn == "conv" else 0  # 3x3 depthwise conv over the patch grid (prefix tokens skip it)
    if conditioning in ("adaln_zero", "adaln"):
        attention = 2 * T * T * D  # q k^T and softmax(.) v, over all heads: T x T x D each
        adaln = D * 6 * D  # once per image, not per token
        block = T * per_token + attention + adaln + depthwise
        final_adaln = D * 2 * D
    elif conditioning == "cross_attention":
        # q and proj per image token, k and v per condition token; attention T x S x D twice
        cross = T * 2 * D * D + S * 2 * D * D + 2 * T * S * D
        block = T * per_token + 2 * T * T * D + cross + depthwise
        final_adaln = D * 2 * D  # the final layer is still modulated
    elif conditioning == "in_context":
        block = (S + T) * per_token + 2 * (S + T) * (S + T) * D + depthwise
        final_adaln = 0  # a plain LayerNorm
    else:
        raise ValueError(
            f"unknown conditioning {conditioning!r} (valid: adaln_zero, adaln, cross_attention, in_context)"
        )
    final = final_adaln + T * D * patch_size * patch_size * C_out
    return patch_embed + t_embed + y_embed + depth * block + final


def training_flops_per_image(forward_macs: int, checkpointing: bool = False) -> int:
    """FLOPs of one image's training step: forward + backward = 3 x forward (backward computes grads of inputs and
    weights, 2 x forward); 4 x with activation checkpointing (the forward runs twice)."""
    passes = 4 if checkpointing else 3
    return passes * 2 * forward_macs  # 2 FLOPs per multiply-accumulate


# Bytes one transformer layer keeps for backward, per token per unit of width, in 16-bit, without
# recomputation: 34 for a GPT layer (Korthikanti et al. 2022, eq. 1: attention 11, MLP 19, two
# LayerNorm inputs 4).
KORTHIKANTI_BYTES_PER_TOKEN_WIDTH = 34
# DiT has no dropout: the two 1-byte dropout masks (after attention, after the MLP) are not kept.
NO_DROPOUT_MASKS = -2
# adaLN-Zero keeps, per branch, the LayerNorm output for modulate's backward (2) and the branch
# output for the gate's backward (2): 2 branches x 4.
ADALN_MODULATE_AND_GATE = 8
DIT_BLOCK_BYTES_PER_TOKEN_WIDTH = KORTHIKANTI_BYTES_PER_TOKEN_WIDTH + NO_DROPOUT_MASKS + ADALN_MODULATE_AND_GATE  # 40


def dit_activation_bytes_per_sample(
    depth: int,
    tokens: int,
    hidden_size: int,
    num_heads: int,
    precision: str = "bf16",
    checkpointing: bool = False,
    flash_attention: bool = True,
) -> int:
    """Activation memory one sample keeps for backward across the DiT blocks: a rough formula.

    Per block, in 16-bit: 40 * T * D bytes (Korthikanti's 34 for a GPT layer, minus 2 for DiT's
    absent dropout masks, plus 8 for adaLN's modulate and gate inputs) and, without fused attention,
    2 * heads * T^2 for the softmax output (Korthikanti's 5 a s^2 minus the 3 that belong to
    attention dropout). model/dit.py calls F.scaled_dot_product_attention, which on an A100/H100
    runs a flash or memory-efficient kernel that stores no T x T matrix: flash_attention=True.
    fp32 doubles everything. With activation checkpointing of every block only the block inputs
    are kept (2 * T * D each, Korthikanti Sec. 4.2) plus one block's full activations while it is
    recomputed in backward. Leaves out the embedders, the final layer, the loss (O(T * D), small),
    autocast's fp32 residual stream and weight casts, and allocator fragmentation.
    """
    element_scale = 2 if _precision(precision) == "fp32" else 1  # the formula counts 16-bit elements
    per_block = DIT_BLOCK_BYTES_PER_TOKEN_WIDTH * tokens * hidden_size
    if not flash_attention:
        per_block += 2 * num_heads * tokens * tokens  # softmax output, (heads, T, T) in 16-bit
    if checkpointing:
        block_inputs = depth * 2 * tokens * hidden_size  # (T, D) in 16-bit per block
        return element_scale * (block_inputs + per_block)
    return element_scale * depth * per_block


#################################################################################
#                              Memory per GPU                                   #
#################################################################################


def bytes_per_param(strategy: str, precision: str, optimizer: str = "adamw") -> dict[str, int]:
    """Bytes each parameter costs in total (summed over ranks, before sharding), by kind.

    DeepSpeed ZeRO (zero1/2/3), mixed precision: 16-bit weights 2 + 16-bit grads 2 + fp32 master
    weights 4 + Adam momentum and variance 8 = 16 (ZeRO paper Sec. 3.1, K = 12 = master + Adam).
    DDP and FSDP with torch autocast / FSDP MixedPrecision (what torch DDP, accelerate and orch's
    engine do): fp32 weights 4 + fp32 grads 4 + Adam 8, no separate master = 16; the 16-bit copies
    the matmuls use are transient. The total equals the ZeRO paper's DDP baseline (2 + 2 + 12).
    fp32 anywhere: 4 + 4 + 8.
    """
    precision = _precision(precision)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (valid: {', '.join(STRATEGIES)})")
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"unknown optimizer {optimizer!r} (valid: {', '.join(OPTIMIZER_STATE_BYTES)})")
    states = OPTIMIZER_STATE_BYTES[optimizer]
    if precision != "fp32" and strategy.startswith("zero"):
        return {"weights": 2, "grads": 2, "master_weights": 4, "optimizer_states": states}
    return {"weights": 4, "grads": 4, "master_weights": 0, "optimizer_states": states}


# Which kinds each strategy splits over the ranks (ZeRO paper Sec. 5: P_os, P_os+g, P_os+g+p).
# ddp replicates everything; fsdp (FULL_SHARD) shards all of it, as ZeRO-3 does.
SHARDED = {
    "ddp": (),
    "zero1": ("master_weights", "optimizer_states"),
    "zero2": ("master_weights", "optimizer_states", "grads"),
    "zero3": ("master_weights", "optimizer_states", "grads", "weights"),
    "fsdp": ("master_weights", "optimizer_states", "grads", "weights"),
}


def memory_per_gpu(
    params: int,
    strategy: str,
    precision: str,
    world_size: int,
    micro_batch: int = 1,
    activation_bytes_per_sample: int | None = None,
    optimizer: str = "adamw",
    ema: bool = True,
    offload: str | None = None,
    frozen_params: int = 0,
    ema_sharded: bool | None = None,
) -> dict[str, int]:
    """Bytes of GPU memory per rank, by kind: weights, grads, master weights, optimizer states, EMA, activations, total.

    params: trainable parameters; frozen_params (e.g. DiT's sin-cos pos_embed) cost weights and EMA
    only. Who holds what (ZeRO paper Sec. 5): ddp replicates everything; zero1 shards master weights
    and optimizer states over the world_size ranks; zero2 also the grads; zero3 and fsdp also the
    weights. Assumption, EMA: a full fp32 copy on every rank (orch's EMA, model/ema.py) under ddp,
    zero1 and zero2; under zero3 and fsdp a shard per rank, updated from the local parameter shard
    (gathering a full copy on every rank would undo the point of sharding; DeepSpeed#2056);
    ema_sharded overrides. offload (DeepSpeed ZeRO-Offload / ZeRO-Infinity, zero stages only):
    "optimizer" moves master weights and optimizer states to CPU memory, "optimizer+params" (zero3
    only) the weight shards too; what moved is reported as cpu_offloaded_bytes, outside the total.
    activations: micro_batch x activation_bytes_per_sample (see dit_activation_bytes_per_sample);
    0 when None. Leaves out the CUDA context (~0.5-1 GB), communication buckets, ZeRO-3/FSDP's
    gathered working copy of the layers in use, the 16-bit weight copies autocast makes and
    autograd keeps for backward under ddp (+2 bytes/param), the optimizer step's temporaries and
    allocator fragmentation. Measured peaks run well above it: fast-DiT reports 27.5 GB for DiT-XL/2
    on one A100 (batch 128, fp16 autocast, checkpointing, EMA on the GPU) where this gives 17.1 GB.
    Read the total as a lower bound and plan for ~1.5x.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if offload not in OFFLOADS:
        raise ValueError(f"unknown offload {offload!r} (valid: {', '.join(map(str, OFFLOADS))})")
    if offload is not None and not strategy.startswith("zero"):
        raise ValueError(
            f"offload is a DeepSpeed ZeRO option; strategy {strategy!r} has none (use zero1, zero2 or zero3)"
        )
    if offload == "optimizer+params" and strategy != "zero3":
        raise ValueError("offloading parameters needs zero3 (DeepSpeed offload_param); use offload='optimizer'")

    per_param = bytes_per_param(strategy, precision, optimizer)
    totals = {
        "weights": (params + frozen_params)
        * per_param["weights"],  # frozen weights are stored (and sharded) like the rest
        "grads": params * per_param["grads"],
        "master_weights": params * per_param["master_weights"],
        "optimizer_states": params * per_param["optimizer_states"],
    }
    sharded = set(SHARDED[strategy])
    on_gpu = {kind: math.ceil(total / world_size) if kind in sharded else total for kind, total in totals.items()}

    offloaded_kinds = {
        None: (),
        "optimizer": ("master_weights", "optimizer_states"),
        "optimizer+params": ("master_weights", "optimizer_states", "weights"),
    }[offload]
    cpu_offloaded = sum(on_gpu[kind] for kind in offloaded_kinds)
    for kind in offloaded_kinds:
        on_gpu[kind] = 0

    if ema_sharded is None:
        ema_sharded = strategy in ("zero3", "fsdp")
    ema_total = (params + frozen_params) * EMA_BYTES_PER_PARAM if ema else 0
    ema_bytes = math.ceil(ema_total / world_size) if ema_sharded else ema_total
    activations = micro_batch * activation_bytes_per_sample if activation_bytes_per_sample is not None else 0

    result = {f"{kind}_bytes": value for kind, value in on_gpu.items()}
    result["ema_bytes"] = ema_bytes
    result["activations_bytes"] = activations
    result["total_bytes"] = sum(on_gpu.values()) + ema_bytes + activations
    result["cpu_offloaded_bytes"] = cpu_offloaded
    return result


#################################################################################
#                          Communication per step                               #
#################################################################################


def collective_payload_bytes_per_step(
    params: int, strategy: str, grad_bytes: int = 2, param_bytes: int | None = None, grad_accum_steps: int = 1
) -> int:
    """Sum of the sizes of the reduce-scatters and all-gathers one optimizer step runs (an all-reduce counts as both).

    ddp: all-reduce of the grads once per step (no_sync while accumulating) = 2 x grads.
    zero1: reduce-scatter of the grads once per step (full grads are kept, so they accumulate
    locally) + all-gather of the updated 16-bit weights = grads + weights.
    zero2: reduce-scatter at every micro step (only a shard of the grads is kept) + one all-gather.
    zero3 / fsdp: at every micro step, all-gather the weights for forward, again for backward, and
    reduce-scatter the grads = 2 x weights + grads (ZeRO paper Sec. 7.2: 1.5x DDP).
    param_bytes defaults to grad_bytes.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (valid: {', '.join(STRATEGIES)})")
    grads = params * grad_bytes
    weights = params * (grad_bytes if param_bytes is None else param_bytes)
    if strategy == "ddp":
        return 2 * grads
    if strategy == "zero1":
        return grads + weights
    if strategy == "zero2":
        return grad_accum_steps * grads + weights
    return grad_accum_steps * (2 * weights + grads)  # zero3, fsdp


def comm_bytes_per_step(
    params: int,
    strategy: str,
    world_size: int,
    grad_bytes: int = 2,
    param_bytes: int | None = None,
    grad_accum_steps: int = 1,
) -> int:
    """Bytes each GPU sends per optimizer step with ring collectives (it receives as many).

    A ring reduce-scatter or all-gather of S bytes over N ranks sends (N - 1) / N x S from each
    rank; an all-reduce is both, 2 (N - 1) / N x S. This is NCCL's "bus bandwidth" convention: the
    time is these bytes over the per-direction link bandwidth. DDP (and ZeRO-1/2) at accumulation 1:
    2 (N - 1) / N x params x grad_bytes; ZeRO-3 and FSDP 1.5x that (ZeRO paper Sec. 7).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    payload = collective_payload_bytes_per_step(params, strategy, grad_bytes, param_bytes, grad_accum_steps)
    return round(payload * (world_size - 1) / world_size)


#################################################################################
#                         Wall time of a whole job                              #
#################################################################################

# Dense peaks of one A100 (NVIDIA A100 Tensor Core GPU datasheet, SXM; "dense": without 2:4 structured
# sparsity, which doubles the tensor-core figures): bf16 and fp16 tensor cores 312 TFLOP/s, TF32 tensor
# cores 156, plain fp32 on the CUDA cores 19.5.
A100_PEAK_FLOPS = {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}

# An assumption, not a measurement: the share of that peak a DiT training step reaches (model FLOPs
# utilisation). No MFU has been measured in this repository yet (bench/gpu_throughput.py measures it on a
# GPU). For scale: fast-DiT's ~108 images/s for DiT-XL/2 on one A100 (fp16, activation checkpointing) is
# ~25 % counting 3 x forward, ~33 % counting the recompute; bench/scaling.py assumes 40 %.
ASSUMED_MFU = 0.35


def matmul_arithmetic(precision: str, tf32: bool) -> str:
    """The A100_PEAK_FLOPS key that bounds a step's matmuls: bf16 / fp16 under autocast, else TF32 when allowed
    (resources.tf32), else fp32."""
    precision = _precision(precision)
    if precision != "fp32":
        return precision
    return "tf32" if tf32 else "fp32"


def training_time_s(
    flops_per_image: int, global_batch: int, steps: int, gpus: int, peak_flops: float, mfu: float = ASSUMED_MFU
) -> float:
    """Seconds the training steps of a whole job take: flops_per_image x global_batch x steps FLOPs done by `gpus`
    GPUs at `mfu` of `peak_flops` each.

    Training steps only: leaves out in-loop evaluation and sample grids, checkpoint writes, data loading
    stalls, start-up and compilation. A formula, not a measurement: the MFU is the assumption that decides it.
    """
    if gpus < 1 or not 0 < mfu <= 1 or peak_flops <= 0:
        raise ValueError(f"bad settings: gpus={gpus}, mfu={mfu}, peak_flops={peak_flops}")
    return flops_per_image * global_batch * steps / (gpus * peak_flops * mfu)
