"""The walkthrough behind `tensorfile demo`: saving and loading tensors, containers and a model's parameters, then a timed comparison with torch.save/torch.load."""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

from .benchmarks import rawio, workloads


class DemoError(RuntimeError):
    """A step of the demo did not give the result it shows."""


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise DemoError(f"demo check failed: {what}")


def walkthrough(directory: str, echo: Callable[[str], None], kept: bool = True) -> None:
    """The reference walkthrough, each statement echoed before it runs. `kept`: the
    directory outlives the demo (else it is a temporary one, and is not named)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    import tensorfile

    def step(code: str) -> None:
        echo(f">>> {code}")

    here = os.getcwd()
    os.chdir(directory)  # the walkthrough names its files relative, as a user would
    try:
        echo("-- a tensor")
        step("x = torch.arange(4)")
        x = torch.arange(4)
        step("tensorfile.save(x, 'x-file')")
        tensorfile.save(x, "x-file")
        step("x2 = tensorfile.load('x-file')")
        x2 = tensorfile.load("x-file")
        step("x2")
        echo(repr(x2))
        _check(torch.equal(x, x2), "x2 == x")

        echo("-- a list of tensors")
        step("y = torch.zeros(4)")
        y = torch.zeros(4)
        step("tensorfile.save([x, y], 'x-files')")
        tensorfile.save([x, y], "x-files")
        step("x2, y2 = tensorfile.load('x-files')")
        x2, y2 = tensorfile.load("x-files")
        step("(x2, y2)")
        echo(repr((x2, y2)))
        _check(torch.equal(x2, x) and torch.equal(y2, y), "(x2, y2) == (x, y)")

        echo("-- a dict of tensors")
        step("mydict = {'x': x, 'y': y}")
        mydict = {"x": x, "y": y}
        step("tensorfile.save(mydict, 'mydict')")
        tensorfile.save(mydict, "mydict")
        step("mydict2 = tensorfile.load('mydict')")
        mydict2 = tensorfile.load("mydict")
        step("mydict2")
        echo(repr(mydict2))
        _check(
            mydict2.keys() == mydict.keys()
            and all(torch.equal(mydict2[k], mydict[k]) for k in mydict),
            "mydict2 == mydict",
        )

        echo("-- a model's parameters")

        class MLP(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.hidden = nn.Linear(20, 256)
                self.output = nn.Linear(256, 10)

            def forward(self, x: Any) -> Any:
                return self.output(F.relu(self.hidden(x)))

        step("class MLP(nn.Module): Linear(20, 256) -> ReLU -> Linear(256, 10)")
        step("net = MLP(); X = torch.randn(size=(2, 20)); Y = net(X)")
        net = MLP()
        X = torch.randn(size=(2, 20))
        Y = net(X)
        step("tensorfile.save(net.state_dict(), 'mlp.params')")
        tensorfile.save(net.state_dict(), "mlp.params")
        step("clone = MLP()")
        clone = MLP()
        step("clone.load_state_dict(tensorfile.load('mlp.params'))")
        echo(repr(clone.load_state_dict(tensorfile.load("mlp.params"))))
        step("clone.eval()")
        echo(repr(clone.eval()))
        step("Y_clone = clone(X); Y_clone == Y")
        Y_clone = clone(X)
        same = Y_clone == Y
        echo(repr(same))
        _check(bool(same.all()), "clone(X) == net(X)")
        files = ", ".join(sorted(os.listdir(".")))
        if kept:
            echo(f"(files in {directory}: {files})")
        else:
            echo(f"(files written: {files}; in a temporary directory, removed when the demo ends)")
    finally:
        os.chdir(here)


def compare(
    directory: str, size_mb: float, runs: int, echo: Callable[[str], None], progress: bool
) -> dict[str, Any]:
    """Times durable save and load of a synthetic transformer state dict with tensorfile
    and with torch; returns the medians in seconds and prints them as a table."""
    import torch

    import tensorfile

    shapes = workloads.transformer_shapes(int(size_mb * (1 << 20)))
    payload = workloads.payload_nbytes(shapes, "float32")
    echo(
        f"-- tensorfile vs torch.save/torch.load: a synthetic transformer state dict, "
        f"{payload / (1 << 20):.1f} MiB of float32 in {len(shapes)} tensors, median of {runs} runs"
    )
    sd = workloads.build(shapes, "float32")
    tf_path = os.path.join(directory, "compare.tensorfile")
    pt_path = os.path.join(directory, "compare.pt")

    def tf_save() -> None:
        tensorfile.save(sd, tf_path)

    def pt_save() -> None:
        torch.save(sd, pt_path)
        rawio.make_durable(
            pt_path
        )  # tensorfile.save is durable by default; torch.save alone is not

    # Loads leave the result alive until the clock has stopped, as a caller would.
    kept: list[Any] = []
    steps: list[tuple[str, str, Callable[[], Any]]] = [
        ("save", "tensorfile", tf_save),
        ("save", "torch", pt_save),
        ("load", "tensorfile", lambda: kept.append(tensorfile.load(tf_path))),
        ("load", "torch", lambda: kept.append(torch.load(pt_path, weights_only=True))),
    ]
    times: dict[tuple[str, str], list[float]] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=runs * len(steps), desc="timing", leave=False, file=sys.stderr)
    try:
        for _ in range(runs):
            for op, system, fn in steps:
                path = tf_path if system == "tensorfile" else pt_path
                if op == "save" and os.path.exists(path):
                    os.unlink(path)  # both start from no file, so neither pays to free the old one
                t0 = time.perf_counter()
                fn()
                times.setdefault((op, system), []).append(time.perf_counter() - t0)
                kept.clear()
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()
    for system, loader in (
        ("tensorfile", tensorfile.load),
        ("torch", lambda p: torch.load(p, weights_only=True)),
    ):
        back = loader(tf_path if system == "tensorfile" else pt_path)
        _check(
            back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd),
            f"{system} round trip",
        )
        del back
    for p in (tf_path, pt_path):
        os.unlink(p)

    med = {k: statistics.median(v) for k, v in times.items()}
    echo(f"{'':<24}{'tensorfile':>20}{'torch':>20}")
    echo(f"{'':<24}{'seconds':>10}{'GB/s':>10}{'seconds':>10}{'GB/s':>10}{'speed-up':>10}")
    for op, label in (("save", "save (durable: fsync)"), ("load", "load (page cache warm)")):
        tf, pt = med[(op, "tensorfile")], med[(op, "torch")]
        echo(
            f"{label:<24}{tf:>10.3f}{payload / tf / 1e9:>10.2f}{pt:>10.3f}{payload / pt / 1e9:>10.2f}{pt / tf:>9.2f}x"
        )
    return {"payload_bytes": payload, "median_s": {f"{op}/{s}": v for (op, s), v in med.items()}}


def run(
    directory: str | None, size_mb: float, runs: int = 3, echo: Callable[[str], None] = print
) -> None:
    """The whole demo: the walkthrough, then the comparison. With no `directory`, files go
    to a temporary directory that is removed afterwards."""
    progress = sys.stderr.isatty()
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="tensorfile-demo-") as tmp:
            walkthrough(tmp, echo, kept=False)
            echo("")
            compare(tmp, size_mb, runs, echo, progress)
    else:
        walkthrough(directory, echo)
        echo("")
        compare(directory, size_mb, runs, echo, progress)
