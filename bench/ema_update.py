"""Time of one EMA update of a DiT, and the bytes it moves from the device to the host, with the EMA where orch
kept it before (the host) and where it keeps it now (the training device).

    .venv/bin/python bench/ema_update.py [--model DiT-B/2] [--repeats 10]

On the CPU both placements are the same code path (model and shadow share the host), so the two rows
must agree within noise; on a GPU the host row pays a device-to-host copy of every weight per step.
Bytes per step by formula: the trainable parameters x 4 (fp32 weights, copied to the host shadow).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model.dit import DiT_models  # noqa: E402
from model.ema import EMA  # noqa: E402


def seconds_per_update(model: torch.nn.Module, ema: EMA, repeats: int, device: torch.device) -> float:
    times = []
    for step in range(1, repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        ema.update(model, step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > 1:  # the first update allocates
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="DiT-B/2")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = DiT_models[args.model](input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    host_ema = EMA(model, decay=0.9999)  # built before the model moves, as the trainer did: it stays on the host
    model = model.to(device)
    device_ema = EMA(model, decay=0.9999).to(device)  # where the trainer keeps it now
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{args.model}: {trainable:,} trainable parameters; {name}; torch {torch.__version__}; median of "
        f"{args.repeats} updates"
    )
    for label, ema, moved in (
        ("EMA on the host (before)", host_ema, 4 * trainable if device.type == "cuda" else 0),
        ("EMA on the device (now)", device_ema, 0),
    ):
        print(
            f"  {label:26s} {seconds_per_update(model, ema, args.repeats, device) * 1e3:8.1f} ms per update, "
            f"{moved / 1e9:.2f} GB device-to-host per update"
        )


if __name__ == "__main__":
    main()
