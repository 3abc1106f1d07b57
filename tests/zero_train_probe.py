"""Train a tiny DiT on random 8x8 inputs through ZeroEngine, as the Trainer's loop does; for
tests/integration/test_zero.py.

    torchrun --standalone --nproc_per_node 2 tests/zero_train_probe.py --stage 3 --precision bf16 \
        --steps 6 --save-at 3 --out OUT [--resume OUT/step-3]  [--ema-reference]

Each micro batch reseeds the global RNG and draws its data from (seed, step, rank * accum + micro),
so a resumed run sees the same data and noise as an uninterrupted one, and 1 rank with 4 accumulation
steps sees the same global batch as 2 ranks with 2 (what a world-size change keeps).
Rank 0 writes OUT/result.json (global loss and grad norm per step, whether the ranks agreed, how long
DeepSpeed's start took), OUT/final.safetensors (the consolidated fp32 weights), OUT/ema.safetensors and,
with --ema-reference, OUT/ema_reference.safetensors: an EMA of the module's own weights, gathered by
deepspeed.zero.GatheredParameters (ZeRO-3) or read as they are (ZeRO-1/2), independently of ZeroEngine.
Checkpoints go to OUT/step-N (engine.save_state plus ema.safetensors and trainer.json from rank 0).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from safetensors.torch import load_file, save_file

from model.diffusion import diffusion_loss, make_noise_scheduler
from model.dit import DiT
from model.ema import EMA

MICRO_BATCH, NUM_CLASSES = 4, 10


def tiny_dit() -> DiT:
    return DiT(
        input_size=8,
        patch_size=2,
        in_channels=1,
        hidden_size=32,
        depth=2,
        num_heads=2,
        num_classes=NUM_CLASSES,
        learn_sigma=False,
    )


def seed_of(*parts: int) -> int:
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "little") >> 1


def batch(seed: int, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro batch `index` of a step (rank * accum + micro): 'images' (B, 1, 8, 8), a fixed pattern per class, and
    labels (B,)."""
    g = torch.Generator().manual_seed(seed_of(seed, step, index, 1))
    labels = torch.randint(0, NUM_CLASSES, (MICRO_BATCH,), generator=g)
    patterns = torch.linspace(-1, 1, NUM_CLASSES)[:, None, None, None] * torch.ones(1, 1, 8, 8)
    noise = 0.1 * torch.randn(MICRO_BATCH, 1, 8, 8, generator=g)
    return (patterns[labels] + noise).clamp(-1, 1), labels


def lr_factor(step: int) -> float:
    return min(1.0, (step + 1) / 3)  # a warmup, so that a resume must restore the schedule


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--precision", choices=["no", "bf16"], default="bf16")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--save-at", type=int, action="append", default=[])
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    p.add_argument("--resume", type=Path)
    p.add_argument(
        "--reshard",
        choices=["universal", "weights"],
        default="universal",
        help="how --resume crosses a world-size change",
    )
    p.add_argument("--ema-decay", type=float, default=0.9)
    p.add_argument("--ema-reference", action="store_true")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)

    from launch.deepspeed import deepspeed_config
    from orchestrator.train.zero import ZeroEngine, saved_world_size

    started = time.perf_counter()
    config = deepspeed_config(args.stage, args.precision, MICRO_BATCH, args.accum, args.world_size, grad_clip=1.0)
    engine = ZeroEngine("cpu", args.precision, args.world_size, config=config)
    torch.manual_seed(args.seed)
    model = tiny_dit()
    ema = EMA(model, decay=args.ema_decay, warmup_power=0)
    reference = EMA(model, decay=args.ema_decay, warmup_power=0) if args.ema_reference else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model, optimizer = engine.prepare(model, optimizer)
    prepare_s = time.perf_counter() - started
    noise_scheduler = make_noise_scheduler(100, "squaredcos_cap_v2")

    step, init_exact = 0, None
    if args.resume:
        engine.load_state(str(args.resume), reshard=args.reshard)
        if saved_world_size(args.resume) != engine.world_size:
            initial = load_file(str(args.resume / "model.safetensors"))
            loaded = engine.full_state_dict(model)
            init_exact = all(loaded[k].equal(initial[k]) for k in initial)
        saved = json.loads((args.resume / "trainer.json").read_text())
        step = saved["step"]
        scheduler.load_state_dict(saved["lr_scheduler"])
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # what the optimizer state restores at the same world size, and nothing does on another
        ema.load_state_dict(
            {"weights": load_file(str(args.resume / "ema.safetensors")), "num_updates": saved["ema_num_updates"]}
        )
        if reference is not None:
            reference.load_state_dict(
                {
                    "weights": load_file(str(args.resume / "ema_reference.safetensors")),
                    "num_updates": saved["ema_num_updates"],
                }
            )

    losses, norms, lrs, agree = {}, {}, {}, True
    evals = {step: eval_loss(engine, model, noise_scheduler, args.seed)}
    first_step_s = None
    while step < args.steps:
        began = time.perf_counter()
        model.train()
        loss_sum = torch.zeros(())
        for micro in range(args.accum):
            index = engine.rank * args.accum + micro  # the same global batch on 2 ranks x 2 or 1 rank x 4
            torch.manual_seed(seed_of(args.seed, step, index))  # timesteps, noise, label dropout of this micro batch
            x, y = batch(args.seed, step, index)
            last = micro == args.accum - 1
            with nullcontext() if last else engine.no_sync(model):
                with engine.autocast():
                    loss = diffusion_loss(model, x, y, noise_scheduler)
                engine.backward(loss / args.accum)
            loss_sum += loss.detach().float() / args.accum
        lrs[step] = optimizer.param_groups[0]["lr"]
        norm = engine.step(model, optimizer, 1.0)  # the loop's call: clip, step, zero the grads
        scheduler.step()
        step += 1
        engine.update_ema(ema, model, step)
        if reference is not None:
            update_reference(engine, reference, model, step)
        losses[step] = engine.mean(loss_sum).item()
        norms[step] = float(norm)
        checksum = sum(float(t.double().sum()) for t in ema.module.parameters())
        agree = engine.same_on_all_ranks(checksum) and agree
        if first_step_s is None:
            first_step_s = time.perf_counter() - began
        if step in args.save_at or step == args.steps:
            evals[step] = eval_loss(engine, model, noise_scheduler, args.seed)
        if step in args.save_at:
            save(engine, args.out / f"step-{step}", step, scheduler, ema, reference)

    weights = engine.full_state_dict(model)
    weight_sum = sum(float(t.double().sum()) for t in weights.values())
    agree = engine.same_on_all_ranks(weight_sum) and agree
    if engine.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(args.out / "final.safetensors"))
        save_file(ema.module.state_dict(), str(args.out / "ema.safetensors"))
        if reference is not None:
            save_file(reference.module.state_dict(), str(args.out / "ema_reference.safetensors"))
        result = {
            "losses": losses,
            "eval_losses": evals,
            "grad_norms": norms,
            "lrs": lrs,
            "ranks_agree": agree,
            "init_exact": init_exact,
            "world_size": engine.world_size,
            "prepare_s": prepare_s,
            "first_step_s": first_step_s,
            "total_s": time.perf_counter() - started,
            "module_dtype": str(next(engine.unwrap(model).parameters()).dtype),
        }
        (args.out / "result.json").write_text(json.dumps(result, indent=1))
    engine.close()
    return 0


@torch.no_grad()
def eval_loss(engine, model, noise_scheduler, seed: int) -> float:
    """The loss on a fixed batch with fixed timesteps and noise, in eval mode (every rank runs it: a collective under
    ZeRO-3)."""
    model.eval()
    x, y = batch(seed, -1, 0)
    generator = torch.Generator().manual_seed(seed)
    with engine.autocast():
        loss = diffusion_loss(model, x.repeat(4, 1, 1, 1), y.repeat(4), noise_scheduler, generator=generator)
    model.train()
    return loss.item()


@torch.no_grad()
def update_reference(engine, reference: EMA, model, step: int) -> None:
    """An EMA of the module's own weights, gathered without ZeroEngine (the check on its gathering)."""
    module = engine.unwrap(model)
    params = list(module.parameters())
    if engine.stage == 3:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    else:
        context = nullcontext()
    with context:
        plain = tiny_dit()
        plain.load_state_dict({k: v.float() for k, v in module.state_dict().items()})
    reference.update(plain, step)


def save(engine, directory: Path, step: int, scheduler, ema: EMA, reference: EMA | None) -> None:
    """A checkpoint as checkpoint.save_checkpoint writes it: every rank saves state, rank 0 the rest."""
    engine.barrier()
    engine.save_state(str(directory))
    if engine.is_main:
        save_file(ema.module.state_dict(), str(directory / "ema.safetensors"))
        if reference is not None:
            save_file(reference.module.state_dict(), str(directory / "ema_reference.safetensors"))
        state = {"step": step, "lr_scheduler": scheduler.state_dict(), "ema_num_updates": ema.num_updates}
        (directory / "trainer.json").write_text(json.dumps(state))
    engine.barrier()


if __name__ == "__main__":
    sys.exit(main())
