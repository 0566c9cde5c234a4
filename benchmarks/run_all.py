"""Run the benchmark suite and regenerate BENCHMARKS.md from benchmarks/results/<machine>/.

    python benchmarks/run_all.py                 # all but best (read from its results file)
    python benchmarks/run_all.py --best          # also the best recipe (3 runs of ~15 min)
    python benchmarks/run_all.py --sweep         # also the sweep benchmark (~30 min)
    python benchmarks/run_all.py --only lab,fast # some of them
    python benchmarks/run_all.py --table-only    # just rewrite BENCHMARKS.md
    python benchmarks/run_all.py --quick         # smoke run of everything; writes nothing

BENCHMARKS.md has one section per kind of machine (CPU model, instruction sets, cores, GPU):
a run replaces the figures of the machine it runs on and keeps every other machine's.

Adding a benchmark: write `benchmarks/bench_NAME.py` whose `main(argv)` measures, builds its
table lines with `benchutil.row(...)` into `figures["rows"]` and returns
`benchutil.finish("NAME", hw, args, figures)` (it accepts `--quick` and `--no-save`); then add
`"NAME": bench_NAME.main` to BENCHES below.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import bench_best
import bench_explain
import bench_fast
import bench_inference
import bench_lab
import bench_lrfind
import bench_main
import bench_memory
import bench_serve
import bench_sweep
import benchutil as bu

# name -> main(argv) returning the result: adding a benchmark is one line here.
BENCHES = {
    "lab": bench_lab.main,
    "main": bench_main.main,
    "fast": bench_fast.main,
    "best": bench_best.main,
    "inference": bench_inference.main,
    "serve": bench_serve.main,
    "memory": bench_memory.main,
    "explain": bench_explain.main,
    "lrfind": bench_lrfind.main,
    "sweep": bench_sweep.main,
}
SLOW = {"best", "sweep"}  # run only with --best / --sweep (or --only)
COMPARABLE = {"main", "serve"}  # take --compare-with SRC
# Benchmarks that print a report rather than return figures: their output is kept verbatim.
TEXT_BENCHES = {
    "robustness": (["bench_robustness.py"], ["-n", "200", "--repeat", "1"]),
}
INFERENCE_TARGET = 0.9  # results from before the engine choice: ≥ 90% of eager PyTorch


def run_text_bench(name: str, quick: bool) -> None:
    """Run one of TEXT_BENCHES; unless quick, keep its output in results/<name>.txt."""
    script, quick_args = TEXT_BENCHES[name]
    cmd = [sys.executable, str(bu.HERE / script[0]), *(quick_args if quick else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    text = out.stdout + (f"\n(exit status {out.returncode}: {out.stderr[-500:]})"
                         if out.returncode else "")
    print(text)
    if not quick:
        folder = bu.results_dir()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.txt").write_text(text)


def yes(flag: bool) -> str:
    return "**yes**" if flag else "**no**"


def machine_line(hw: dict) -> str:
    return (
        f"{bu.machine_label(hw)}, torch {hw['torch']}, Python {hw['python']}, GPU: "
        f"{hw['gpu'] or 'none'}"
    )


def generic_rows(result: dict) -> list[str]:
    date = result["hardware"]["date"].split()[0]
    return [
        f"| {r['figure']} | {r['mnistlab']} | {r['reference']} | {r['ratio']} | {r['target']} | "
        f"{yes(r['met']) if r['met'] is not None else '–'} | {date} |"
        for r in result["rows"]
    ]


def table(results: dict[str, dict]) -> list[str]:
    """One machine's table: a line per figure, in BENCHES order."""
    rows = ["| Figure | mnistlab | Reference | Ratio | Target | Met? | Date |", "|---" * 7 + "|"]
    for name in [*BENCHES, *sorted(set(results) - set(BENCHES))]:
        result = results.get(name)
        if result is None:
            continue
        listed = result.get("rows") and "figure" in result["rows"][0]
        rows += generic_rows(result) if listed else legacy_rows(name, result)
    return rows


def legacy_rows(name: str, result: dict) -> list[str]:
    """Lines of results written before benchmarks listed their own rows."""
    date = result["hardware"]["date"].split()[0]
    lines = _legacy_rows({name: result})
    return [line + f" {date} |" for line in lines]


def _legacy_rows(results: dict[str, dict]) -> list[str]:
    rows: list[str] = []
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


def machine_section(label: str, results: dict[str, dict], folder: Path) -> list[str]:
    """A machine's heading, its table, how each figure was measured, and its text reports."""
    dates = sorted({r["hardware"]["date"].split()[0] for r in results.values()})
    any_hw = next(iter(results.values()))["hardware"]
    flags = " ".join(any_hw.get("cpu_flags") or []) or (
        "avx2" + (" avx512f" if any_hw.get("avx512") else "")
        + (" avx512_bf16" if any_hw.get("avx512_bf16") else ""))
    lines = [
        f"## {label}",
        "",
        f"Measured {dates[0]}" + (f" to {dates[-1]}" if len(dates) > 1 else "")
        + f"; CPU flags: `{flags}`.",
        "",
        *table(results),
        "",
        "Conditions and commands:",
        "",
    ]
    for name, r in results.items():
        hw = r["hardware"]
        lines.append(
            f"- **{name}** — `{r['command']}` — {hw['date']}, load average {hw['loadavg']} "
            f"(1, 5, 15 min) — {machine_line(hw)}"
        )
    for path in sorted(folder.glob("*.txt")):
        if path.stem in results:
            continue
        lines += ["", f"### {path.stem} (`python benchmarks/bench_{path.stem}.py`)", "", "```",
                  path.read_text().strip(), "```"]
    return [*lines, ""]


def write_markdown(machines: dict[str, dict[str, dict]] | None = None) -> None:
    """BENCHMARKS.md: a section per machine kind, newest figures first."""
    machines = bu.load_all() if machines is None else machines
    order = sorted(machines, key=lambda m: max(r["hardware"]["date"]
                                               for r in machines[m].values()), reverse=True)
    lines = [
        "# Benchmarks",
        "",
        "Regenerated by `python benchmarks/run_all.py` (see its docstring for options; "
        "`--table-only` rewrites this file from `benchmarks/results/<machine>/`). There is one "
        "section per kind of machine; a run replaces its own machine's figures and keeps the "
        "others. Training figures are timed from after `import torch` to the final test "
        "accuracy, data loading and per-epoch evaluation included; every benchmark runs its "
        "reference in the same invocation. Accuracy is always on the full 10,000 test images.",
        "",
        "The machines are shared 2-core VMs: other jobs ran during some measurements (the "
        "load average beside each figure says how busy it was). Ratios come from runs "
        "interleaved in one invocation, so both sides saw the same conditions.",
        "",
    ]
    for label in order:
        folder = bu.RESULTS / bu.machine_slug(label)
        lines += machine_section(label, machines[label], folder)
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
    p.add_argument("--sweep", action="store_true", help="Also run the sweep benchmark (~30 min).")
    p.add_argument("--table-only", action="store_true", help="Only rewrite BENCHMARKS.md.")
    p.add_argument("--quick", action="store_true", help="Smoke run of each; writes nothing.")
    p.add_argument("--compare-with", metavar="SRC", default=None,
                   help="A source tree (e.g. a worktree of commit e2fd09a) that the main-command "
                   "and serve benchmarks also time, side by side.")
    a = p.parse_args(argv)
    names = [n for n in a.only.split(",") if n] or [
        n for n in [*BENCHES, *TEXT_BENCHES]
        if n not in SLOW or {"best": a.best, "sweep": a.sweep}[n] or a.quick
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
                args = ["--quick"] if a.quick else []
                if a.compare_with and name in COMPARABLE:
                    args += ["--compare-with", a.compare_with]
                BENCHES[name](args)
    if a.quick:
        return 0
    write_markdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
