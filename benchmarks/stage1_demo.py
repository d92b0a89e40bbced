"""Stage 1 on the demo dataset at default settings: full batch vs minibatch.

Each mode runs in a fresh process so its peak RSS is its own. Usage:

    python benchmarks/stage1_demo.py            # prints a Markdown table, writes benchmarks/results/stage1_demo.md
    python benchmarks/stage1_demo.py --batch-size 256 --repeats 2

Reported per mode: wall time of the whole run (data loading to written outputs), of the
consensus initialisation and of training, optimiser steps, peak resident memory, the
relative reconstruction error and the matched cosine of the 10 planted programs.
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
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import torch
    from deltanmf.pipeline import run

    torch.set_num_threads(torch.get_num_threads())
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("config", overrides=[f"data.batch_size={batch_size}", "trainer.enable_progress_bar=false",
                                           *extra], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = run_dir
    HydraConfig.instance().set_config(cfg)
    start = time.perf_counter()
    metrics = run(cfg, run_dir)
    wall = time.perf_counter() - start
    s1 = metrics["stage1"]
    return {
        "wall_s": wall, "init_s": s1["init_time_s"], "train_s": s1["train_time_s"], "steps": s1["steps"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "relative_error": s1["relative_error"], "recovery_mean": metrics["recovery"]["baseline_mean"],
        "recovery_min": metrics["recovery"]["baseline_min"], "device": s1["device"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", default="512", help="minibatch size for the minibatch mode")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode (the table shows each)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stage1_demo.md"))
    parser.add_argument("--one", nargs=2, metavar=("BATCH_SIZE", "RUN_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_run(args.one[0], args.one[1], args.overrides)))
        return

    # simulate the demo once, outside the timed runs
    subprocess.run([sys.executable, __file__, "--one", "null", tempfile.mkdtemp(), "trainer.max_steps=1",
                    "model.consensus.replicates=1", "model.consensus.iterations=1"], check=True,
                   capture_output=True)
    rows = []
    for repeat in range(args.repeats):
        for mode, batch in (("full batch", "null"), (f"minibatch ({args.batch_size})", args.batch_size)):
            with tempfile.TemporaryDirectory() as run_dir:
                proc = subprocess.run([sys.executable, __file__, "--one", batch, run_dir, *args.overrides],
                                      capture_output=True, text=True, check=True)
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            rows.append({"mode": mode, **json.loads(line[len("RESULT "):])})
    header = ("| mode | wall (s) | init (s) | train (s) | steps | peak RSS (MB) | rel. error "
              "| recovery mean | recovery min |\n|---|---|---|---|---|---|---|---|---|")
    lines = [header] + [
        f"| {r['mode']} | {r['wall_s']:.1f} | {r['init_s']:.1f} | {r['train_s']:.1f} | {r['steps']} "
        f"| {r['peak_rss_mb']:.0f} | {r['relative_error']:.4f} | {r['recovery_mean']:.4f} | {r['recovery_min']:.4f} |"
        for r in rows
    ]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"Command: `python benchmarks/stage1_demo.py {' '.join(sys.argv[1:])}`\n"
                   f"Device: {rows[0]['device']}; demo: 1,500 control cells x 1,500 genes, K=10.\n\n{table}\n")


if __name__ == "__main__":
    main()
