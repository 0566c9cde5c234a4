"""Run the benchmark suite and regenerate BENCHMARKS.md from benchmarks/results/*.json.

    python benchmarks/run_all.py                 # all but best (read from its results file)
    python benchmarks/run_all.py --best          # also the best recipe (3 runs of ~10 min)
    python benchmarks/run_all.py --sweep         # also the sweep benchmark (~20 min)
    python benchmarks/run_all.py --only lab,fast # some of them
    python benchmarks/run_all.py --table-only    # just rewrite BENCHMARKS.md
    python benchmarks/run_all.py --quick         # smoke run of everything; writes nothing
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import bench_best
import bench_explain
import bench_fast
import bench_inference
import bench_lab
import bench_lrfind
import bench_memory
import bench_sweep
import benchutil as bu

BENCHES = {
    "lab": bench_lab.main,
    "fast": bench_fast.main,
    "best": bench_best.main,
    "inference": bench_inference.main,
    "memory": bench_memory.main,
    "sweep": bench_sweep.main,
    "explain": bench_explain.main,
    "lrfind": bench_lrfind.main,
}
# Long benchmarks, run only when asked for (their flag, or --only); their results files stay.
OPT_IN = ("best", "sweep")
# Benchmarks that print a report rather than return figures: their output is kept verbatim.
TEXT_BENCHES = {
    "robustness": (["bench_robustness.py"], ["-n", "200", "--repeat", "1"]),
    "serve": (["bench_serve.py"], ["--requests", "300"]),
}
INFERENCE_TARGET = 0.9  # mnistlab's API at ≥ 90% of plain eager PyTorch: no real overhead


def run_text_bench(name: str, quick: bool) -> None:
    """Run one of TEXT_BENCHES; unless quick, keep its output in results/<name>.txt."""
    script, quick_args = TEXT_BENCHES[name]
    cmd = [sys.executable, str(bu.HERE / script[0]), *(quick_args if quick else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    text = out.stdout + (f"\n(exit status {out.returncode}: {out.stderr[-500:]})"
                         if out.returncode else "")
    print(text)
    if not quick:
        bu.RESULTS.mkdir(parents=True, exist_ok=True)
        (bu.RESULTS / f"{name}.txt").write_text(text)


def yes(flag: bool) -> str:
    return "**yes**" if flag else "**no**"


def machine_line(hw: dict) -> str:
    return (
        f"{hw['cpu']}, {hw['cores']} cores (AVX-512: {hw['avx512']}, AVX-512 BF16: "
        f"{hw['avx512_bf16']}), torch {hw['torch']}, Python {hw['python']}, GPU: "
        f"{hw['gpu'] or 'none'}"
    )


def table(results: dict[str, dict]) -> list[str]:
    rows = ["| Figure | mnistlab | Reference | Ratio | Target | Met? |", "|---" * 6 + "|"]
    lab = results.get("lab")
    if lab:
        ours, ref = lab["mnistlab"], lab["reference"]
        accs = ", ".join(f"{v:.2f}" for v in ours["test_acc"])
        rows.append(
            f"| Lab recipe, 5 epochs, seconds (median of {ours['seconds']['n']}) | "
            f"{ours['seconds']['median']:.2f} s (test acc {accs}%; {ours.get('threads')} thread) | "
            f"{ref['seconds']['median']:.1f} s (lab-style, {ref.get('threads')} threads) | "
            f"{lab['ratio']:.1f}× | ≥ 15×, acc 97.2–98.2% | {yes(lab['met'])} |"
        )
    fast = results.get("fast")
    if fast:
        ours, ref = fast["mnistlab"], fast["reference"]
        accs = ", ".join(f"{v:.2f}" for v in ours["test_acc"])
        rows.append(
            f"| Time to 99%, `--recipe fast`, seconds (median of {ours['seconds']['n']} seeds) | "
            f"{ours['seconds']['median']:.2f} s (max {ours['seconds']['max']:.2f}; "
            f"{ours.get('threads')} threads); test acc {accs}% | {ref['seconds']['median']:.1f} s "
            f"(`cnn`, lab-style, epochs {ref['epochs']}) | {fast['ratio']:.1f}× | every seed ≥ "
            f"99.0%, ≤ 8 s, ≥ 15× "
            f"| {yes(fast['met'])} |"
        )
    best = results.get("best")
    if best:
        ours, ref = best["mnistlab"], best["reference"]
        acc = ours["test_acc"]
        rows.append(
            f"| Best accuracy, `--recipe best`, {acc['n']} seeds | mean {acc['mean']:.3f}% "
            f"(min {acc['min']:.2f}, max {acc['max']:.2f}); {ours['seconds']['max'] / 60:.1f} min "
            f"max a run on {max(ours.get('threads') or [0])} thread(s) | "
            f"{ref['test_acc']['mean']:.2f}% (lab's Advanced MLP) | "
            f"{best['error_ratio']:.1f}× fewer errors | mean ≥ 99.65%, ≤ 15 min a run | "
            f"{yes(best['met'])} |"
        )
    inf = results.get("inference")
    if inf:
        for row in inf["rows"]:
            ratio = row["mnistlab"] / row["eager"]
            ort = f"; onnxruntime {row['onnxruntime']:,.0f}/s" if "onnxruntime" in row else ""
            rows.append(
                f"| Inference `{row['model']}`, batch {row['batch']}, images/s "
                f"({inf['threads']} thread) | {row['mnistlab']:,.0f}/s | eager PyTorch "
                f"{row['eager']:,.0f}/s{ort} | {ratio:.2f}× | ≥ {INFERENCE_TARGET}× eager | "
                f"{yes(ratio >= INFERENCE_TARGET)} |"
            )
    mem = results.get("memory")
    if mem:
        ours, ref = mem["mnistlab"]["peak_rss_mib"], mem["reference"]["peak_rss_mib"]
        rows.append(
            f"| Peak RSS of a lab-recipe run (max of {ours['n']}) | {ours['max']:.0f} MiB | "
            f"{ref['median']:.0f} MiB (lab-style, 1 epoch) | {ours['max'] / ref['median']:.2f}× "
            f"| ≤ 1024 MiB | {yes(mem['met'])} |"
        )
    sweep = results.get("sweep")
    if sweep:
        for row in sweep["rows"]:
            rows.append(
                f"| Sweep `{sweep['space']}`, {row['workers']} worker(s), pruner {row['pruner']}: "
                f"trials per hour ({row['trials']} trials, {row['pruned']} pruned) | "
                f"{row['trials_per_hour']:.0f}/h ({row['epochs_per_hour']:.0f} epochs/h) | – | – "
                f"| reported, not targeted | – |"
            )
        found, lab = sweep["search"], sweep["lab"]
        rows.append(
            f"| Sweep `{sweep['space']}`: best validation accuracy after {found['trials']} trials "
            f"| {found['best']['val_acc']:.2f}% (its test acc, measured once: "
            f"{found['test_acc']:.2f}%) | lab recipe {lab['val_acc']:.2f}% "
            f"(test {lab['test_acc']:.2f}%) | {found['best']['val_acc'] - lab['val_acc']:+.2f} "
            "points | reported, not targeted | – |"
        )
    exp = results.get("explain")
    if exp:
        lat, f, e = exp["latency_ms"], exp["faithfulness"], exp["embedding_seconds"]
        rows.append(
            f"| `/api/explain`, one digit, bundled model, ms (median of "
            f"{lat['explain_pixels']['n']}, {exp['threads']} threads) | "
            f"{lat['explain_pixels']['median']:.1f} ms (PNG upload "
            f"{lat['explain_png']['median']:.1f} ms) | `/api/predict` "
            f"{lat['predict_pixels']['median']:.1f} ms | "
            f"{lat['explain_pixels']['median'] / lat['predict_pixels']['median']:.1f}× | "
            f"≤ 50 ms | {yes(exp['met']['explain'])} |"
        )
        rows.append(
            f"| Faithfulness of integrated gradients, {f['digits']} test digits | top 10% "
            f"beats random for {100 * f['top_beats_random']:.1f}%; "
            f"{100 * f['near_ink_share']:.1f}% of positive attribution within 2 px of ink | "
            f"random ink pixels | – | ≥ 90%, ≥ 80% | {yes(exp['met']['faithful'])} |"
        )
        rows.append(
            f"| Embedding map (t-SNE) of {exp['embedding_digits']:,} test digits, seconds "
            f"(median of {e['n']}) | {e['median']:.1f} s | – | – | ≤ 10 s | "
            f"{yes(exp['met']['embedding'])} |"
        )
    lrf = results.get("lrfind")
    if lrf:
        lrs = ", ".join(f"{r['suggested_lr']:.2g}" for r in lrf["seeds"])
        wall = max(r["wall_seconds"] for r in lrf["seeds"])
        auto = lrf.get("auto") or {}
        acc = f"{auto['test_acc']:.2f}%" if auto else "not run"
        rows.append(
            f"| `mnistlab lr-find`, lab recipe, {len(lrf['seeds'])} seeds | suggested {lrs}; "
            f"≤ {wall:.1f} s a command; `--lr auto` {acc} | the lab's 0.001 | – | in [3e-4, "
            f"3e-3], ≤ 10 s, 97.2–98.2% | "
            f"{yes(all(lrf['met'].values()))} |"
        )
    return rows


def write_markdown(results: dict[str, dict]) -> None:
    lines = [
        "# Benchmarks",
        "",
        "Regenerated by `python benchmarks/run_all.py` (see its docstring for options; "
        "`--table-only` rewrites this file from `benchmarks/results/*.json`). Every figure is "
        "timed from after `import torch` to the final test accuracy, data loading and "
        "per-epoch evaluation included, and every benchmark runs its reference in the same "
        "invocation. Accuracy is always on the full 10,000 test images.",
        "",
        *table(results),
        "",
        "## Conditions and commands",
        "",
    ]
    for name, r in results.items():
        hw = r["hardware"]
        lines.append(
            f"- **{name}** — `{r['command']}` — {hw['date']}, load average {hw['loadavg']} "
            f"(1, 5, 15 min) — {machine_line(hw)}"
        )
    for name, (script, _) in TEXT_BENCHES.items():
        path = bu.RESULTS / f"{name}.txt"
        if path.is_file():
            lines += ["", f"## {name} (`python benchmarks/{script[0]}`)", "", "```",
                      path.read_text().strip(), "```"]
    lines += [
        "",
        "The machine is a shared 2-core VM: other jobs ran during some measurements (the load "
        "average above says how busy it was). Ratios come from runs interleaved in one "
        "invocation, so both sides saw the same conditions.",
        "",
    ]
    notes = bu.HERE / "NOTES.md"  # hand-written analysis, kept next to the generated figures
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    path = bu.REPO / "BENCHMARKS.md"
    path.write_text("\n".join(lines))
    print(f"wrote {path.relative_to(bu.REPO)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the benchmarks and regenerate BENCHMARKS.md.")
    p.add_argument("--only", default="", help="Comma-separated subset of: "
                   + ", ".join([*BENCHES, *TEXT_BENCHES]))
    p.add_argument("--best", action="store_true", help="Also run the best recipe (~30 min).")
    p.add_argument("--sweep", action="store_true", help="Also run the sweep benchmark (~20 min).")
    p.add_argument("--table-only", action="store_true", help="Only rewrite BENCHMARKS.md.")
    p.add_argument("--quick", action="store_true", help="Smoke run of each; writes nothing.")
    a = p.parse_args(argv)
    asked = {"best": a.best, "sweep": a.sweep}
    names = [n for n in a.only.split(",") if n] or [
        n for n in [*BENCHES, *TEXT_BENCHES] if n not in OPT_IN or asked[n] or a.quick
    ]
    unknown = set(names) - set(BENCHES) - set(TEXT_BENCHES)
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    if not a.table_only:
        for name in names:
            print(f"\n=== {name} ===", flush=True)
            if name in TEXT_BENCHES:
                run_text_bench(name, a.quick)
            else:
                BENCHES[name](["--quick"] if a.quick else [])
    if a.quick:
        return 0
    results = {name: r for name in BENCHES if (r := bu.load_result(name)) is not None}
    write_markdown(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
