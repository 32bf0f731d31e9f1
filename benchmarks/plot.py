"""Plot the ratios from a `fastpeft bench --json` file as a PNG.

    python benchmarks/plot.py bench.json [out.png]

Left: the LoRA linear layer, time relative to the base layer (fastpeft/base and peft/base, forward and
forward+backward) per shape. Right: the decoder training step, relative to the base model (time, and
bytes saved for backward relative to fastpeft). A ratio below 1 on the peft/fastpeft bars of the
right panel would mean peft does better.
"""
import argparse
import json
import os
import sys


def _load(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"plot.py: {path}: no such file")
    except json.JSONDecodeError as e:
        raise SystemExit(f"plot.py: {path}: not valid JSON (line {e.lineno}: {e.msg})")
    if data.get("schema") != "fastpeft-bench/1":
        raise SystemExit(f"plot.py: {path}: not a `fastpeft bench --json` file (schema {data.get('schema')!r})")
    return data


def plot(data, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot.py needs matplotlib (pip install matplotlib)")
    layer, dec = data.get("layer", []), data.get("decoder", [])
    ncols = (1 if layer else 0) + (1 if dec else 0)
    if ncols == 0:
        raise SystemExit("plot.py: the file holds no layer or decoder results")
    fig, axes = plt.subplots(1, ncols, figsize=(max(6, 1.4 * len(layer) + 3) + (5 if dec else 0), 4.8),
                             squeeze=False, gridspec_kw={"width_ratios": ([max(1, len(layer))] if layer else [])
                                                         + ([2] if dec else [])})
    series = [("fwd_ms", "fastpeft/base", "fastpeft fwd", "#1f77b4"), ("fwd_ms", "peft/base", "peft fwd", "#ff7f0e"),
              ("fwd_bwd_ms", "fastpeft/base", "fastpeft fwd+bwd", "#aec7e8"),
              ("fwd_bwd_ms", "peft/base", "peft fwd+bwd", "#ffbb78")]
    col = 0
    if layer:
        ax = axes[0][col]
        col += 1
        width = 0.8 / len(series)
        for j, (metric, ratio, label, color) in enumerate(series):
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(layer))]
            ys = [e["ratios"][metric][ratio] or 0.0 for e in layer]
            ax.bar(xs, ys, width, label=label, color=color)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(layer)))
        ax.set_xticklabels([e["label"].replace(" K=", "\nK=").replace(" r=", "\nr=") for e in layer], fontsize=7)
        ax.set_ylabel("time / base layer (lower is better)")
        ax.set_title("LoRA linear layer")
        ax.legend(fontsize=7)
    if dec:
        ax = axes[0][col]
        e = dec[0]
        names = ["step fastpeft/base", "step peft/base", "step peft/fastpeft", "saved peft/fastpeft"]
        vals = [e["ratios"]["fwd_bwd_ms"]["fastpeft/base"], e["ratios"]["fwd_bwd_ms"]["peft/base"],
                e["ratios"]["fwd_bwd_ms"]["peft/fastpeft"], e["ratios"]["saved_bytes"]["peft/fastpeft"]]
        if "peak_mem_bytes" in e["ratios"]:
            names.append("peak mem peft/fastpeft")
            vals.append(e["ratios"]["peak_mem_bytes"]["peft/fastpeft"])
        ax.bar(range(len(vals)), [v or 0.0 for v in vals], color=["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd",
                                                                 "#8c564b"][:len(vals)])
        for i, v in enumerate(vals):
            ax.text(i, (v or 0.0), "-" if v is None else f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=7)
        ax.set_title(e["label"], fontsize=8)
        ax.set_ylabel("ratio")
    env = data["env"]
    fig.suptitle(f"fastpeft {env.get('fastpeft')} vs peft {env.get('peft')} on {env.get('device_name')} "
                 f"({env.get('device')}), torch {env.get('torch')}", fontsize=9)
    fig.tight_layout()
    from fastpeft.utils.atomic import atomic_path

    with atomic_path(out) as tmp:  # the temporary name has no .png suffix to infer the format from
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json_path")
    p.add_argument("out", nargs="?", default=None, help="PNG path (default: next to the JSON, .png)")
    args = p.parse_args(argv)
    out = args.out or os.path.splitext(args.json_path)[0] + ".png"
    plot(_load(args.json_path), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
