"""The `tensorfile` command line: inspect, verify, convert, diff, clean, bench and demo."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import click

from . import __version__

# Heavy modules (torch, the benchmark) are imported inside the commands so that
# `tensorfile --help` and `tensorfile clean` start fast.


class _Group(click.Group):
    """Turns the errors a user can cause (bad paths, bad files) into a one-line message
    and exit status 1; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from ._errors import FormatError

        try:
            return super().invoke(ctx)
        except (OSError, FormatError) as e:
            if isinstance(e, OSError) and e.strerror and e.filename:
                msg = f"{e.filename}: {e.strerror}"
            else:
                msg = str(e)
            raise click.ClickException(msg) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="tensorfile")
@click.option(
    "-q", "--quiet", is_flag=True, help="No progress bars (they show only on a terminal anyway)."
)
@click.pass_context
def main(ctx: click.Context, quiet: bool) -> None:
    """Fast, safe save and load of tensors and checkpoints.

    Reads tensorfile, torch.save (zip) and safetensors files; writes all three."""
    ctx.obj = {"quiet": quiet}


def _quiet_option(f: Any) -> Any:
    """Lets `--quiet` follow the command too (tensorfile verify --quiet FILE)."""

    def remember(ctx: click.Context, _param: Any, value: bool) -> bool:
        if value:
            ctx.ensure_object(dict)["quiet"] = True
        return value

    return click.option(
        "-q",
        "--quiet",
        is_flag=True,
        expose_value=False,
        callback=remember,
        help="No progress bars.",
    )(f)


@contextlib.contextmanager
def _progress(total: int, desc: str, unit: str = "B") -> Iterator[Any]:
    """A tqdm bar on stderr when it is a terminal and --quiet was not given; else a no-op.
    Yields update(n)."""
    ctx = click.get_current_context(silent=True)
    quiet = bool(ctx and (ctx.find_root().obj or {}).get("quiet")) or bool(
        ctx and (ctx.obj or {}).get("quiet")
    )
    if quiet or not sys.stderr.isatty():
        yield lambda n: None
        return
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        leave=False,
        file=sys.stderr,
    )
    try:
        yield bar.update
    finally:
        bar.close()


@main.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, writable=True),
    help="Write the files here and keep the walkthrough's (default: a temporary directory, removed after).",
)
@click.option(
    "--size-mb",
    type=click.FloatRange(min=1),
    default=256,
    show_default=True,
    help="Size of the synthetic model for the timed comparison, in MiB.",
)
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Timed runs; the median is shown.",
)
def demo(directory: str | None, size_mb: float, runs: int) -> None:
    """Save and load tensors, lists, dicts and a model's parameters, then time against torch."""
    from . import _demo

    if directory is not None:
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise click.ClickException(f"--dir {directory}: not a directory")
        os.makedirs(directory, exist_ok=True)
    try:
        _demo.run(directory, size_mb, runs, echo=lambda s: click.echo(s))
    except _demo.DemoError as e:
        raise click.ClickException(str(e)) from None


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Measure tensorfile against the machine's raw limits and its peers (--help for the options)."""
    from .benchmarks import harness

    sys.exit(harness.main(list(args), prog="tensorfile bench"))


@main.command()
@click.argument("directory", metavar="DIR", type=click.Path())
def clean(directory: str) -> None:
    """Remove temporary files that saves killed part way left in DIR, and in a
    torch.distributed.checkpoint directory the rank files of saves that died before they
    committed (never those a commit record names or a running save holds)."""
    from . import _files, dcp
    from ._errors import FormatError

    if not os.path.exists(directory):
        raise click.ClickException(f"{directory}: no such directory")
    if not os.path.isdir(directory):
        raise click.ClickException(f"{directory}: not a directory")
    removed = _files.clean(directory)
    problem = None
    try:
        dead = dcp.clean(directory)
    except FormatError as e:
        dead, problem = [], str(e)
    for path in removed + dead:
        click.echo(f"removed {path}")
    click.echo(
        f"{len(removed)} stale temporary file{'s' if len(removed) != 1 else ''} removed from {directory}"
    )
    rank_files = [p for p in dead if p.endswith(".tf")]
    if rank_files:
        click.echo(
            f"{len(rank_files)} uncommitted rank file{'s' if len(rank_files) != 1 else ''} "
            f"of dead checkpoint saves removed from {directory}"
        )
    if problem is not None:
        raise click.ClickException(f"{problem}; no rank files were removed")


def describe_file(path: str) -> dict[str, Any]:
    """What `inspect` shows: the format, version, every tensor (by key path) and totals."""
    from ._dtypes import ITEMSIZE
    from ._reader import open_reader

    with open_reader(path) as reader:
        lay = reader.layout
        tensors = []
        for key, i in reader.key_index().items():
            kind, s, dtype, shape, _strides, off, _flags = lay.tensors[i]
            numel = 1
            for d in shape:
                numel *= d
            held = lay.storage_refs.get(s)  # format 1.1: its bytes lie in another file
            where = reader.byte_source(s)[1] if held else int(lay.storage_offsets[s])
            tensors.append(
                {
                    "key": key,
                    "kind": kind,
                    "dtype": dtype,
                    "shape": list(shape),
                    "nbytes": numel * ITEMSIZE[kind][dtype],
                    "file_offset": where + off,
                    "held_in": held[0] if held else None,
                    "device": lay.storage_device[s],
                    "storage": s,
                }
            )
        return {
            "file": path,
            "format": reader.format,
            "version": reader.version,
            "file_nbytes": lay.file_nbytes,
            "header_nbytes": reader.header_nbytes,
            "storages": len(lay.storage_kind),
            "storage_nbytes": int(lay.storage_nbytes.sum()),
            "tensors": tensors,
            "metadata": dict(lay.metadata),
        }


def _format_label(info: dict[str, Any]) -> str:
    """The format and what its version number counts, for inspect's first line."""
    fmt, version = info["format"], info["version"]
    if not version:
        return str(fmt)
    if fmt == "torch.save":
        return f"torch.save zip, archive version {version}"
    return f"{fmt} {version}"


class _PathOrURL(click.ParamType):
    """An existing path, or an object-store URL (s3://, gs://, az://, http(s)://)."""

    name = "path_or_url"
    _path = click.Path(exists=True)

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        from . import _remote

        if _remote.has_url_scheme(value):
            try:
                _remote.resolve(value)
            except ValueError as e:
                self.fail(str(e), param, ctx)
            return value
        return self._path.convert(value, param, ctx)


_PATH_OR_URL = _PathOrURL()


def _is_checkpoint_dir(path: str) -> bool:
    return os.path.isdir(path)


def _inspect_checkpoint(directory: str, as_json: bool) -> None:
    from . import dcp

    info = dcp.describe_checkpoint(directory)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    total = sum(f["nbytes"] for f in info["files"])
    click.echo(
        f"{directory}: DCP checkpoint written by {info['writer']} (commit record "
        f"{info['commit_record']}, DCP metadata {info['dcp_version']}), "
        f"{len(info['files'])} data file(s), {total:,} bytes"
    )
    rows = [
        (
            t["key"],
            t["dtype"],
            "x".join(map(str, t["shape"])) or "()",
            f"{t['nbytes']:,}",
            str(len(t["chunks"])),
        )
        for t in info["tensors"]
    ]
    head = ("key", "dtype", "shape", "bytes", "chunks")
    widths = [max([len(h), *(len(r[c]) for r in rows)]) for c, h in enumerate(head)]
    for r in [head, *rows]:
        click.echo(
            "  ".join(
                v.ljust(w) if c in (0, 1) else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths))
            )
        )
    nbytes = sum(t["nbytes"] for t in info["tensors"])
    chunks = sum(len(t["chunks"]) for t in info["tensors"])
    click.echo(
        f"{len(info['tensors'])} tensor(s) in {chunks} chunk(s), {nbytes:,} bytes of tensor data; "
        f"{len(info['values'])} other value(s){': ' if info['values'] else ''}"
        + ", ".join(info["values"][:8])
        + (", ..." if len(info["values"]) > 8 else "")
    )
    click.echo(f"planner data: {info['planner_data']}")
    click.echo("data files:")
    for f in info["files"]:
        click.echo(f"  {f['name']}  {f['nbytes']:,} bytes, {f['items']} item(s)")


@main.command()
@click.argument("file", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def inspect(file: str, as_json: bool) -> None:
    """Show a file's format, its tensors (key, dtype, shape, bytes, offset, device), totals and metadata.

    Reads only the header. FILE may be a torch.distributed.checkpoint directory: its
    commit record, data files and each tensor's global shape and chunks are shown."""
    if _is_checkpoint_dir(file):
        _inspect_checkpoint(file, as_json)
        return
    info = describe_file(file)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{file}: {_format_label(info)}, {info['file_nbytes']:,} bytes")
    rows = [
        (
            t["key"],
            t["dtype"],
            "x".join(map(str, t["shape"])) or "()",
            f"{t['nbytes']:,}",
            (f"{t['held_in']}:" if t["held_in"] else "") + str(t["file_offset"]),
            t["device"],
        )
        for t in info["tensors"]
    ]
    head = ("key", "dtype", "shape", "bytes", "offset", "device")
    widths = [max([len(h), *(len(r[c]) for r in rows)]) for c, h in enumerate(head)]
    for r in [head, *rows]:
        click.echo(
            "  ".join(
                v.ljust(w) if c in (0, 1, 5) else v.rjust(w)
                for c, (v, w) in enumerate(zip(r, widths))
            )
        )
    click.echo(
        f"{len(info['tensors'])} tensor key(s) in {info['storages']} storage(s), "
        f"{info['storage_nbytes']:,} bytes of tensor data, header {info['header_nbytes']:,} bytes"
    )
    if info["metadata"]:
        click.echo("metadata:")
        for k, v in info["metadata"].items():
            click.echo(f"  {k}: {v}")


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path())
@_quiet_option
def verify(files: tuple[str, ...]) -> None:
    """Check files completely (structure, padding, every checksum) in bounded memory; exit 0
    only if all are sound. Works on tensorfile, torch.save and safetensors files, and on
    torch.distributed.checkpoint directories (the commit record, every data file, and
    that the record's chunks and checksums match the data)."""
    from . import _convert
    from ._errors import FormatError

    bad = 0
    for path in files:
        try:
            if _is_checkpoint_dir(path):
                from . import dcp

                with _progress(0, os.path.basename(path)) as update:
                    info = dcp.verify_checkpoint(path, update)
                click.echo(
                    f"ok   {path} ({info['format']}, {info['tensors']} tensors in "
                    f"{info['chunks']} chunks, {info['values']} other value(s), "
                    f"{info['nbytes']:,} bytes checked)"
                )
                continue
            total = os.path.getsize(path) if os.path.isfile(path) else 0
            with _progress(total, os.path.basename(path)) as update:
                info = _convert.verify(path, update)
        except (FormatError, OSError, ImportError, ValueError) as e:
            bad += 1
            msg = str(e)
            if isinstance(e, OSError) and e.strerror:
                msg = f"{e.filename or path}: {e.strerror}"
            elif path not in msg:
                msg = f"{path}: {msg}"
            click.echo(f"FAIL {msg}")
        else:
            click.echo(
                f"ok   {path} ({info['format']}, {info['tensors']} tensors, {info['nbytes']:,} bytes checked)"
            )
    if bad:
        raise SystemExit(1)


_TARGET_BY_SUFFIX = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch"}


@main.command()
@click.argument("src", metavar="IN", type=_PATH_OR_URL)
@click.argument("dst", metavar="OUT", type=click.Path())
@click.option(
    "--to",
    "to",
    type=click.Choice(["tensorfile", "safetensors", "torch", "dcp"]),
    default=None,
    help="Format to write (torch: a torch.save zip that torch.load(weights_only=True) reads).  "
    "[default: from OUT's extension: .safetensors, .pt or .pth for torch, a directory for dcp, "
    "else tensorfile]",
)
@click.option(
    "--skip-non-tensors",
    is_flag=True,
    help="For safetensors output: leave out values that are not tensors (safetensors holds tensors only).",
)
@_quiet_option
def convert(src: str, dst: str, to: str | None, skip_non_tensors: bool) -> None:
    """Convert IN (tensorfile, torch.save, safetensors, or a torch.distributed.checkpoint
    directory) to OUT, streaming through a bounded buffer. OUT is replaced atomically; the
    source's checksums are verified on the way."""
    from . import _convert, _files

    if to is None:
        if os.path.isdir(dst) or dst.endswith(os.sep):
            to = "dcp"
        else:
            to = _TARGET_BY_SUFFIX.get(os.path.splitext(dst)[1].lower(), "tensorfile")
    if os.path.abspath(src) == os.path.abspath(dst) or _files.same_file(src, dst):
        raise click.ClickException("IN and OUT are the same file")
    total = os.path.getsize(src) if os.path.isfile(src) else 0
    try:
        with _progress(total, "convert") as update:
            info = _convert.convert(src, dst, to, update, skip_non_tensors=skip_non_tensors)
    except (ValueError, TypeError, ImportError) as e:
        raise click.ClickException(str(e)) from None
    copies = info.get("duplicated")
    if copies and copies["nbytes"]:
        shown = ", ".join(copies["keys"][:4]) + (", ..." if len(copies["keys"]) > 4 else "")
        click.echo(
            f"warning: safetensors cannot share memory between tensors: {copies['tensors']} tensors "
            f"that share storage ({shown}) were written as separate copies, adding "
            f"{copies['nbytes']:,} bytes",
            err=True,
        )
    skipped = info["skipped"]
    note = f"; left out {len(skipped)} non-tensor value(s)" if skipped else ""
    written = "torch.save" if to == "torch" else to
    click.echo(f"wrote {dst} ({written}) from {src} ({info['from']}){note}")


@main.command()
@click.argument("a", metavar="A", type=_PATH_OR_URL)
@click.argument("b", metavar="B", type=_PATH_OR_URL)
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--all", "show_all", is_flag=True, help="List identical tensors too.")
@click.option(
    "--tensors-only",
    is_flag=True,
    help="Compare only the tensors, by key path (ignore plain values, types and structure).",
)
@_quiet_option
def diff(a: str, b: str, as_json: bool, show_all: bool, tensors_only: bool) -> None:
    """Compare A and B by key path, across formats: every value of the object tree (plain
    values such as step and lr, types, container kinds) and each common tensor's dtype,
    shape and max absolute difference, one tensor pair in memory at a time. Exit 0 when
    identical, 1 if not."""
    from . import _diff

    try:
        with _progress(0, "diff", unit="tensor") as update:
            report = _diff.diff(a, b, update, tensors_only=tensors_only)
    except (ValueError, ImportError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for key in report["only_in_a"]:
            click.echo(f"only in A: {key}")
        for key in report["only_in_b"]:
            click.echo(f"only in B: {key}")
        for c in report["changed"]:
            fa = f"{c['a'][0]}[{','.join(map(str, c['a'][1]))}]"
            fb = f"{c['b'][0]}[{','.join(map(str, c['b'][1]))}]"
            click.echo(f"changed:   {c['key']}: {fa} -> {fb}")
        for v in report["values"]:
            click.echo(f"differs:   {v['key']}: {v['a']} -> {v['b']}")
        for key, d in report["max_abs_diff"].items():
            if d != 0 or show_all:
                click.echo(
                    f"differs:   {key}: max abs difference {d:.6g}" if d else f"same:      {key}"
                )
        same = sum(1 for d in report["max_abs_diff"].values() if d == 0)
        others = "" if tensors_only else f"; {len(report['values'])} other value(s) differ"
        click.echo(
            f"{len(report['max_abs_diff']) + len(report['changed'])} common tensor(s): {same} identical, "
            f"{len(report['max_abs_diff']) - same} with different values, {len(report['changed'])} with "
            f"different dtype or shape; {len(report['only_in_a'])} only in A, {len(report['only_in_b'])} only in B"
            f"{others}"
        )
    if not report["identical"]:
        raise SystemExit(1)
