"""The benchmark's reports (`run_scripts/benchmark.py`): `benchmark.json` (every sample) and `benchmark.md` (the
tables of docs/benchmarks.md), rewritten after each section."""

from __future__ import annotations

import json
import pathlib

from .benchmark import Results
from .benchmark_sections import ATTENTION_BACKENDS


def speedup_text(speedup: dict[str, float], cpu: bool) -> str:
    """`1.12x` (ratio of wall-clock medians), then the paired median and, on a CPU, the CPU-time ratio."""
    extra = f"paired {speedup['paired_median']:.2f}x" + (f", CPU time {speedup['cpu_time']:.2f}x" if cpu else "")
    return f"**{speedup['of_medians']:.2f}x** ({extra})"


def markdown(results: Results) -> str:
    meta = results["meta"]
    cpu = meta["device_name"].startswith("CPU")
    lines = [f"# MAE benchmark: {meta['device_name']}", "",
             f"{meta['date']}; torch {meta['torch']}, transformers {meta['transformers']}; {meta['dtype']}; "
             f"threads {meta['threads']}; SDPA backends: {meta['sdpa_backends']}; "
             f"load average at start {meta['loadavg']}.", ""]
    if results["train"]:
        lines += ["## Training step (forward + backward + fused AdamW), ours vs transformers' ViTMAE", "",
                  "| model | attention | batch | transformers img/s | ours img/s | speedup | "
                  "ours+compile img/s | speedup | step memory, transformers / ours (MiB) | "
                  "MFU transformers / ours / ours+compile |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["train"]:
            v, s = r["variants"], r["speedup"]
            compiled = v.get("ours+compile")
            mfu = " / ".join(f"{v[n]['mfu']:.1%}" if n in v and v[n]["mfu"] else "-"
                             for n in ("transformers", "ours", "ours+compile"))
            lines.append(
                f"| {r['size']} | {r['attn']} | {r['batch_size']} | {v['transformers']['images_per_s']:.1f} | "
                f"{v['ours']['images_per_s']:.1f} | {speedup_text(s['ours'], cpu)} | "
                + (f"{compiled['images_per_s']:.1f} | {speedup_text(s['ours+compile'], cpu)} | "
                   if compiled else "- | - | ")
                + f"{v['transformers']['memory_mib']:.0f} / {v['ours']['memory_mib']:.0f} "
                  f"({v['ours']['memory_kind']}) | {mfu} |")
        lines.append("")
    shares = [(r, name, v["kernel_time_shares"]) for r in results["train"] for name, v in r["variants"].items()
              if v.get("kernel_time_shares")]
    if shares:
        kinds = list(shares[0][2])
        lines += ["## Where the GPU time goes: share of kernel time per kind of kernel (`--profile`)", "",
                  "| model | attention | variant | " + " | ".join(kinds) + " |", "|---" * (3 + len(kinds)) + "|"]
        lines += [f"| {r['size']} | {r['attn']} | {name} | " + " | ".join(f"{share[k]:.1%}" for k in kinds) + " |"
                  for r, name, share in shares]
        lines.append("")
    if results["attention"]:
        lines += ["## Attention kernels alone: forward + backward at the model's shapes (ms; TFLOP/s)", "",
                  "| model | part | (batch, heads, tokens, head dim) | "
                  + " | ".join(b.name.lower() for b in ATTENTION_BACKENDS) + " |",
                  "|---" * (3 + len(ATTENTION_BACKENDS)) + "|"]
        for r in results["attention"]:
            for part, b in r["backends"].items():
                cells = [f"{b['ms'][n]:.2f}; {b['tflops_per_s'][n]:.3g}" if n in b["ms"] else "-"
                         for n in (backend.name for backend in ATTENTION_BACKENDS)]
                lines.append(f"| {r['size']} | {part} | {tuple(b['shape'])} | " + " | ".join(cells) + " |")
        lines.append("")
    if results["asymmetric"]:
        lines += ["## Asymmetric design: encoder on visible patches only vs on all patches with mask tokens", "",
                  "| model | batch | step img/s, mask tokens / visible only | step speedup | FLOPs ratio | "
                  "encoder fwd+bwd speedup |", "|---|---|---|---|---|---|"]
        for r in results["asymmetric"]:
            step, s, e = r["step"], r["speedup_step"], r["speedup_encoder"]
            lines.append(
                f"| {r['size']} | {r['batch_size']} | {step['mask_tokens']['images_per_s']:.1f} / "
                f"{step['visible_only']['images_per_s']:.1f} | {speedup_text(s, cpu)} | "
                f"{r['flops_ratio_step']:.2f}x | {speedup_text(e, cpu)} |")
        lines.append("")
    if results["data"]:
        lines += ["## Data path: decode + RandomResizedCrop(224, scale 0.2-1) + flip + normalise, one core", "",
                  "| JPEG | path | images/s | speedup |", "|---|---|---|---|"]
        for r in results["data"]:
            for name, ips in r["images_per_s"].items():
                lines.append(
                    f"| {r['jpeg']} (~{r['mean_kb']:.0f} kB) | {name} | {ips:.0f} | {r['speedup'][name]:.2f}x |")
        lines.append("")
    if results["errors"]:
        lines += ["## Errors", ""] + [f"- {e['section']} {e.get('size', '')}: {e['error']}" for e in results["errors"]]
    return "\n".join(lines) + "\n"


def write_reports(results: Results, output_dir: pathlib.Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "benchmark.json").write_text(json.dumps(results, indent=1))
    (output_dir / "benchmark.md").write_text(markdown(results))
