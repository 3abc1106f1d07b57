"""How a sweep reads in the MLflow UI, in a real browser: screenshots of the parent run, a trial's run page, its
charts, its artifacts (grids, the logged model) and the compare view of the trials, taken with headless Chromium.

    .venv/bin/python bench/mlflow_review.py [--out bench/results/mlflow-review] [--steps 60]

Needs `chromium` on the PATH (Debian: `apt-get install chromium`). Runs a 2-trial sweep of jobs/dit_digits.yaml
(learning rate 5e-4 and 1e-3, --steps steps, no evaluation) under a fresh root, serves its store with `orch ui`,
and writes one PNG per view and the text each view rendered (what the page says, to check without looking).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORCH = str(Path(sys.executable).with_name("orch"))
SPEC = REPO / "jobs" / "dit_digits.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def browse(chromium: str, url: str, png: Path) -> str:
    """A screenshot of `url` after its scripts ran (a virtual-time budget), and the text the page rendered."""
    flags = [
        chromium,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1600,1100",
    ]
    flags.append("--virtual-time-budget=20000")  # the MLflow UI is a single-page app: let it fetch and draw
    subprocess.run([*flags, f"--screenshot={png}", url], capture_output=True, timeout=180, check=True)
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True).stdout
    text = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, html, re; d = re.sub(r'(?s)<(style|script)[^>]*>.*?</\\1>', ' ', sys.stdin.read()); "
            "print(html.unescape(re.sub(r'<[^>]+>', ' ', d)))",
        ],
        input=dom,
        capture_output=True,
        text=True,
    ).stdout
    return " ".join(text.split())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "mlflow-review"))
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        print("needs chromium on the PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="orch-review-"))
    settings = [f"train.steps={args.steps}", "eval.every=", "sample.every=100000", "sample.steps=10"]
    sweep = [ORCH, "--root", str(root), "sweep", "run", str(SPEC), "--grid", "train.learning_rate=5e-4,1e-3"]
    sweep += ["--name", "review", *(arg for setting in settings for arg in ("--set", setting))]
    began = time.perf_counter()
    result = subprocess.run(sweep, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stdout, result.stderr, file=sys.stderr)
        return 1
    print(f"sweep of 2 trials in {time.perf_counter() - began:.0f} s under {root}")

    trials = sorted(p for p in root.iterdir() if (p / "state.json").is_file())
    states = [json.loads((p / "state.json").read_text()) for p in trials]
    from mlflow import MlflowClient

    client = MlflowClient(states[0]["mlflow_uri"])
    runs = [client.get_run(s["mlflow_run_id"]) for s in states]
    experiment = runs[0].info.experiment_id
    parent = runs[0].data.tags.get("mlflow.parentRunId")

    port = free_port()
    ui = subprocess.Popen(
        [ORCH, "--root", str(root), "ui", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(base + "/health")
        trial = runs[0].info.run_id
        ids = json.dumps([r.info.run_id for r in runs])
        views = {
            "parent-run": f"/#/experiments/{experiment}/runs/{parent}",
            "trial-run": f"/#/experiments/{experiment}/runs/{trial}",
            "trial-charts": f"/#/experiments/{experiment}/runs/{trial}/model-metrics",
            "trial-system-metrics": f"/#/experiments/{experiment}/runs/{trial}/system-metrics",
            "trial-artifacts": f"/#/experiments/{experiment}/runs/{trial}/artifacts",
            "experiment": f"/#/experiments/{experiment}",
            "compare-trials": "/#/compare-runs?runs="
            + urllib.parse.quote(ids)
            + "&experiments="
            + urllib.parse.quote(json.dumps([experiment])),
        }
        # MLflow 3.17's UI picks its GenAI or model-training view from the URL's workflowType (else the browser's
        # last choice, GenAI at first), not from the experiment: the model-training view is asked for here, and the
        # experiment once more as a fresh browser opens it.
        views = {
            name: path + ("&" if "?" in path else "?") + "workflowType=machine_learning" for name, path in views.items()
        }
        views["experiment-as-opened"] = f"/#/experiments/{experiment}"
        for name, path in views.items():
            text = browse(chromium, base + path, out / f"{name}.png")
            (out / f"{name}.txt").write_text(text + "\n")
            print(f"{name:22s} {(out / f'{name}.png').stat().st_size / 1e3:7.0f} kB  {text[:150]}")
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    print(f"screenshots and page texts in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
