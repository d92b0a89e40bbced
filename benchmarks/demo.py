"""Both stages on the demo dataset at default settings: full batch vs minibatch.

Each mode runs in a fresh process so its peak RSS is its own. Usage:

    python benchmarks/demo.py                 # Markdown table; also written to benchmarks/results/demo.md
    python benchmarks/demo.py --batch-size 256 --repeats 2
    python benchmarks/demo.py stage=onestage  # extra Hydra overrides apply to every run

Reported per mode: wall time of the whole run (data loading to written outputs) and of
each stage (initialisation + training), optimiser steps per stage, peak resident memory,
relative reconstruction error, matched cosine of the planted baseline and case programs
(minimum over programs), and planted usage shifts called in the right direction.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(batch_size: str, run_dir: str, extra: list[str]) -> dict:
    from deltanmf.workflow.config import default_settings
    from deltanmf.workflow.run import run

    settings = default_settings(f"data.batch_size={batch_size}", "trainer.enable_progress_bar=false", "logger=none",
                                *extra)
    start = time.perf_counter()
    metrics = run(settings, run_dir).metrics
    out = {"wall_s": time.perf_counter() - start,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "device": metrics["stage1"]["device"], "recovery": metrics.get("recovery", {})}
    for stage in ("stage1", "stage2"):
        if stage in metrics:
            s = metrics[stage]
            out[stage] = {"time_s": s["init_time_s"] + s["train_time_s"], "steps": s["steps"],
                          "relative_error": s["relative_error"]}
    return out


def _row(mode: str, r: dict) -> str:
    rec = r["recovery"]
    s1, s2 = r["stage1"], r.get("stage2")
    shifts = f"{rec['shifts_called_correctly']}/{rec['shifts_planted']} ({rec['shifts_false']} false)" \
        if "shifts" in rec else "-"
    return (f"| {mode} | {r['wall_s']:.1f} | {s1['time_s']:.1f} | {s1['steps']} | "
            f"{(s2['time_s'] if s2 else float('nan')):.1f} | {s2['steps'] if s2 else '-'} | {r['peak_rss_mb']:.0f} | "
            f"{(s2 or s1)['relative_error']:.4f} | {rec.get('baseline_min', float('nan')):.4f} | "
            f"{rec.get('case_min', float('nan')):.4f} | {shifts} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", default="512", help="minibatch size for the minibatch mode")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode (the table shows each)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo.md"))
    parser.add_argument("--one", nargs=2, metavar=("BATCH_SIZE", "RUN_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_run(args.one[0], args.one[1], args.overrides)))
        return

    # simulate (and cache) the demo once, outside the timed runs
    from deltanmf.data import demo_path
    from deltanmf.workflow.config import default_settings

    data = default_settings(*args.overrides).data
    demo_path(data.simulation, data.cache_dir)

    lines = ["| mode | wall (s) | stage 1 (s) | stage 1 steps | stage 2 (s) | stage 2 steps | peak RSS (MB) "
             "| rel. error (stage 2) | baseline recovery (min) | case recovery (min) | shifts called |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    device = ""
    for _ in range(args.repeats):
        for mode, batch in (("full batch", "null"), (f"minibatch ({args.batch_size})", args.batch_size)):
            with tempfile.TemporaryDirectory() as run_dir:
                proc = subprocess.run([sys.executable, __file__, "--one", batch, run_dir, *args.overrides],
                                      capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"benchmark run failed:\n{proc.stderr[-3000:]}")
            result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
            device = result["device"]
            lines.append(_row(mode, result))
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"Command: `python benchmarks/demo.py {' '.join(sys.argv[1:])}`  \n"
                   f"Device: {device}; {time.strftime('%Y-%m-%d')}; demo: 1,500 control + 1,500 case cells x "
                   "1,500 genes, K=10, K_case=3.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
