"""Runs the command line as `python -m tensorfile ...`."""

from .cli import main

main(prog_name="tensorfile")
