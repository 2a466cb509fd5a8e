"""PNG plots of a sweep's records (matplotlib, no display needed)."""
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(records, x_key, y_key, **where):
    """{method: sorted [(x, y)]} of the successful records matching `where`."""
    out = defaultdict(list)
    for r in records:
        if r["status"] == "ok" and r.get(y_key) is not None and all(r[k] == v for k, v in where.items()):
            out[r["method"]].append((r[x_key], r[y_key]))
    return {m: sorted(points) for m, points in out.items()}


def _most_common(records, key, **where):
    counts = defaultdict(int)
    for r in records:
        if r["status"] == "ok" and all(r[k] == v for k, v in where.items()):
            counts[r[key]] += 1
    return max(counts, key=counts.get) if counts else None


def _plot(path, title, xlabel, ylabel, series, logx=True, logy=True, scale=1.0):
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, points in sorted(series.items()):
        xs, ys = zip(*points)
        ax.plot(xs, [y * scale for y in ys], marker="o", label=method)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(records, out, device_name):
    """Time and memory vs N (forward+backward, self workload) and fraction of matmul vs D."""
    written = []
    dim = _most_common(records, "dim", workload="self", mode="fwdbwd")
    dtype = _most_common(records, "dtype", workload="self", mode="fwdbwd", dim=dim)
    if dim is not None:
        where = dict(workload="self", mode="fwdbwd", dim=dim, dtype=dtype)
        written.append(_plot(out / "time_vs_n.png", f"forward+backward, D={dim}, {dtype}\n{device_name}",
                             "N = M (rows)", "time (ms)", _series(records, "n", "ms_median", **where)))
        written.append(_plot(out / "memory_vs_n.png", f"peak extra memory, D={dim}, {dtype}\n{device_name}",
                             "N = M (rows)", "MiB", _series(records, "n", "peak_extra_bytes", **where),
                             scale=1 / 2 ** 20))
    n = _most_common(records, "n", workload="self", mode="fwd")
    for mode in ("fwd", "bwd"):
        series = _series(records, "dim", "fraction_of_matmul", workload="self", mode=mode, n=n)
        series = {f"{m} ({dt})": pts for dt in ("bf16", "fp16", "fp32")
                  for m, pts in _series(records, "dim", "fraction_of_matmul", workload="self", mode=mode,
                                        n=n, dtype=dt).items()} or series
        written.append(_plot(out / f"fraction_of_matmul_{mode}.png",
                             f"{mode}: fraction of torch.matmul TFLOP/s, N={n}\n{device_name}",
                             "D", "fraction", series, logy=False))
    return [p for p in written if p is not None]
