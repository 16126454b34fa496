"""Stereo `interleave` vs `frames`, same model size and the same compute budget.

    python scripts/compare_layouts.py OUT [--data TRAIN_DIR --val-data VAL_DIR] [--steps 2000]

1. The budget. Both layouts train the tiny preset (stereo, 1,024-frame windows, batch 8, one
   CPU thread each). The interleave run takes --steps steps; the frames run takes --steps x
   RATIO, RATIO = (interleave step time) / (frames step time), measured here first (--ratio
   sets it), so that both get the same wall-clock time. The two runs train at the same time,
   so they share whatever else the machine is doing.
2. Quality: `sashimi.evaluate` on the held-out data (--val-data, or fresh synthetic clips
   without --data): continuous NLL through the exact recurrence, overall and per channel.
3. Speed: training samples/s and frames/s (from each run's log), generation steps/s and
   frames/s (`generate_audio`, batch 1, 1 s, the two layouts alternating).
4. Writes OUT/table.md, OUT/results.json and OUT/curves.png (validation NLL vs wall-clock time).

A rerun skips a finished training run and continues an interrupted one (--resume).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = ("interleave", "frames")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (one run folder per layout inside)")
    p.add_argument("--data", default=None, help="training folder (default: the built-in synthetic music)")
    p.add_argument("--val-data", default=None, help="held-out folder (needed with --data)")
    p.add_argument("--steps", type=int, default=2000, help="interleave steps; frames gets steps x ratio")
    p.add_argument("--ratio", type=float, default=None, help="frames steps per interleave step (default: measured)")
    p.add_argument("--val-every", type=int, default=250, help="interleave validation interval (frames: x ratio)")
    p.add_argument("--val-crops", type=int, default=128)
    p.add_argument("--eval-seconds", type=float, default=4.0, help="excerpt length for sashimi.evaluate")
    p.add_argument("--excerpts-per-file", type=int, default=2)
    p.add_argument("--clips", type=int, default=16, help="synthetic evaluation clips (without --data)")
    p.add_argument("--gen-seconds", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.data and not a.val_data:
        p.error("--data needs --val-data (a held-out folder to score)")
    return a


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))


# ------------------------------------------------------------------------------------ budget
def measure_ratio(steps: int = 12, rounds: int = 3) -> tuple[float, dict]:
    """Median training-step time of each layout (tiny preset, batch 8 x 1,024 frames, one
    thread), the layouts alternating so that both see the same load."""
    import torch
    from sashimi.model import PRESETS, ModelConfig, SaShiMi
    torch.set_num_threads(1)
    torch.manual_seed(0)
    setups = {}
    for layout in LAYOUTS:
        cfg = ModelConfig(**dict(PRESETS["tiny"], channels=2, stereo_layout=layout))
        model = SaShiMi(cfg)
        setups[layout] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    batch = torch.randint(0, 256, (8, 1025, 2))
    times = {k: [] for k in LAYOUTS}
    for _ in range(rounds):
        for layout in LAYOUTS:
            model, opt = setups[layout]
            for i in range(steps):
                t = time.perf_counter()
                loss = model.nll_bits(batch).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                if i >= 2:                                  # the first steps warm up
                    times[layout].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return med["interleave"] / med["frames"], med


# ---------------------------------------------------------------------------------- training
def last_step(run: Path) -> int:
    if not (run / "checkpoint.pt").exists():
        return -1
    from sashimi import checkpoint
    return int(checkpoint.load(run / "checkpoint.pt")["step"])


def train_both(a, out: Path, plan: dict) -> None:
    procs = []
    for layout, (steps, val_every) in plan.items():
        run = out / layout
        if last_step(run) >= steps:
            print(f"{layout}: already trained ({steps} steps)")
            continue
        cmd = [sys.executable, "-m", "sashimi.train", "--stereo", "--stereo-layout", layout,
               "--steps", str(steps), "--val-every", str(val_every), "--val-crops", str(a.val_crops),
               "--checkpoint-every", str(max(val_every, steps // 4)), "--sample-every", "0",
               "--threads", "1", "--seed", str(a.seed), "--out", str(run)]
        if a.data:
            cmd += ["--data", a.data, "--val-data", a.val_data]
        if last_step(run) >= 0:
            cmd.append("--resume")
        print("$ " + " ".join(cmd[1:]))
        log = open(out / f"{layout}.train.log", "a")
        procs.append((layout, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=ROOT)))
    for layout, proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"{layout}: training failed (see {out / (layout + '.train.log')})")


def read_log(run: Path) -> list[dict]:
    with open(run / "log.csv") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------- scoring
def evaluate(a, run: Path) -> dict:
    cmd = [sys.executable, "-m", "sashimi.evaluate", "--checkpoint", str(run / "checkpoint.pt"),
           "--seconds", str(a.eval_seconds), "--out", str(run / "eval"), "--quiet", "--device", "cpu",
           "--overwrite"]   # a rerun scores the run again
    cmd += (["--data", a.val_data, "--excerpts-per-file", str(a.excerpts_per_file)] if a.data
            else ["--data", "synthetic", "--clips", str(a.clips)])
    print("$ " + " ".join(cmd[1:]))
    subprocess.run(cmd, check=True, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((run / "eval" / "summary.json").read_text())


def generation_speed(out: Path, seconds: float, rounds: int = 3) -> dict:
    """Generation of `seconds` of stereo audio, batch 1, each layout `rounds` times alternating:
    the median frames/s and backbone steps/s."""
    import torch
    from sashimi import checkpoint
    from sashimi.generate import generate_audio
    from sashimi.quantize import Quantizer
    torch.set_num_threads(1)
    models = {k: checkpoint.load_model(out / k / "checkpoint.pt", "cpu")[0] for k in LAYOUTS}
    times = {k: [] for k in LAYOUTS}
    for r in range(rounds):
        for layout, model in models.items():
            cfg = model.cfg
            frames = int(seconds * cfg.sample_rate)
            t = time.perf_counter()
            generate_audio(model, frames, 1, Quantizer(cfg.quantization, cfg.bits), temperature=1.0,
                           seed=r, progress=False)
            times[layout].append(time.perf_counter() - t)
    result = {}
    for layout, model in models.items():
        frames = int(seconds * model.cfg.sample_rate)
        per_frame = model.cfg.channels // model.cfg.step_tokens     # backbone steps per frame
        med = statistics.median(times[layout])
        result[layout] = dict(frames_per_s=frames / med, steps_per_s=frames * per_frame / med, seconds=med)
    return result


# ----------------------------------------------------------------------------------- reports
def summarise(a, out: Path, plan: dict, ratio: float, step_times: dict | None) -> dict:
    from sashimi import checkpoint
    from sashimi.model import count_parameters
    results = dict(ratio=ratio, step_times_s=step_times, data=a.data or "synthetic", val_data=a.val_data,
                   date=time.strftime("%Y-%m-%d"), layouts={})
    excerpts = {}
    gen = generation_speed(out, a.gen_seconds)
    for layout, (steps, _) in plan.items():
        run = out / layout
        rows = read_log(run)
        train_rows = [r for r in rows if r["train_bits"]]
        vals = [r for r in rows if r.get("val_bits")]
        elapsed = float(rows[-1]["elapsed_s"])
        samples = steps * 8 * 1024 * 2
        ev = evaluate(a, run)
        model = checkpoint.load_model(run / "checkpoint.pt", "cpu")[0]
        results["layouts"][layout] = dict(
            steps=steps, elapsed_s=elapsed, parameters=count_parameters(model),
            train_samples_per_s=samples / elapsed, train_frames_per_s=samples / 2 / elapsed,
            median_window_samples_per_s=statistics.median(float(r["tokens_per_s"]) for r in train_rows),
            final_val=dict(bits=float(vals[-1]["val_bits"]), L=float(vals[-1]["val_bits_L"]),
                           R=float(vals[-1]["val_bits_R"]), se=float(vals[-1].get("val_se") or "nan")),
            curve=[dict(step=int(r["step"]), elapsed_s=float(r["elapsed_s"]), bits=float(r["val_bits"]),
                        L=float(r["val_bits_L"]), R=float(r["val_bits_R"])) for r in vals],
            eval=dict(bits=ev["bits"], se=ev["bits_se"], L=ev["per_channel"]["L"], R=ev["per_channel"]["R"],
                      excerpts=ev["excerpts"], seconds=ev["seconds"]),
            generation=gen[layout])
        excerpts[layout] = ev["per_excerpt"]
    # the same excerpts scored by both models: the paired difference is far tighter than either s.e.
    diffs = [excerpts["interleave"][k] - excerpts["frames"][k] for k in excerpts["interleave"]]
    results["paired"] = dict(mean=statistics.mean(diffs), n=len(diffs), frames_better=sum(d > 0 for d in diffs),
                             se=statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan"))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def table(results: dict) -> str:
    L = results["layouts"]
    rows = [
        ("training steps (same wall-clock budget)", "{steps:,}", "steps"),
        ("wall-clock time of the run (s)", "{elapsed_s:,.0f}", "elapsed_s"),
        ("parameters", "{parameters:,}", "parameters"),
    ]
    out = ["| | interleave | frames |", "|---|---|---|"]
    for name, fmt, key in rows:
        out.append(f"| {name} | " + " | ".join(fmt.format(**{key: L[k][key]}) for k in LAYOUTS) + " |")

    def line(name, f):
        out.append(f"| {name} | " + " | ".join(f(L[k]) for k in LAYOUTS) + " |")
    line("**held-out NLL, bits/sample (s.e.)**", lambda r: f"**{r['eval']['bits']:.3f}** ({r['eval']['se']:.3f})")
    P = results["paired"]
    out.append(f"| held-out NLL, interleave - frames, same excerpts (s.e.) | {P['mean']:+.3f} ({P['se']:.3f}); "
               f"frames better on {P['frames_better']} of {P['n']} | |")
    line("held-out NLL, L / R", lambda r: f"{r['eval']['L']:.3f} / {r['eval']['R']:.3f}")
    line("trainer's last validation (L / R)",
         lambda r: f"{r['final_val']['bits']:.3f} ({r['final_val']['L']:.3f} / {r['final_val']['R']:.3f})")
    line("training samples/s (frames/s)",
         lambda r: f"{r['train_samples_per_s']:,.0f} ({r['train_frames_per_s']:,.0f})")
    line("generation steps/s (frames/s), batch 1",
         lambda r: f"{r['generation']['steps_per_s']:,.0f} ({r['generation']['frames_per_s']:,.0f})")
    return "\n".join(out)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for i, layout in enumerate(LAYOUTS):
        c = results["layouts"][layout]["curve"]
        t = [r["elapsed_s"] / 60 for r in c]
        ax.plot(t, [r["bits"] for r in c], "-o", color=f"C{i}", lw=2, ms=3, label=f"{layout}")
        ax.plot(t, [r["L"] for r in c], ":", color=f"C{i}", lw=1, label=f"{layout}, L")
        ax.plot(t, [r["R"] for r in c], "--", color=f"C{i}", lw=1, label=f"{layout}, R")
    ax.set_xlabel("wall-clock training time (min, 1 CPU thread each)")
    ax.set_ylabel("validation NLL (bits / sample)")
    ax.set_title(f"stereo layouts, tiny preset: {results['data']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    step_times = None
    if a.ratio is None:
        ratio, step_times = measure_ratio()
        print(f"training step: interleave {step_times['interleave'] * 1e3:.0f} ms, frames "
              f"{step_times['frames'] * 1e3:.0f} ms: frames gets {ratio:.2f}x the steps")
    else:
        ratio = a.ratio
    plan = {"interleave": (a.steps, a.val_every),
            "frames": (round(a.steps * ratio), round(a.val_every * ratio))}
    train_both(a, out, plan)
    results = summarise(a, out, plan, ratio, step_times)
    text = table(results)
    (out / "table.md").write_text(text + "\n")
    print(text)
    try:
        plot(results, out / "curves.png")
        print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'curves.png'}")
    except ImportError:
        print(f"wrote {out / 'table.md'}, {out / 'results.json'} (no plot: matplotlib is not installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
