"""Run the benchmark suite: `.venv/bin/python -m bench --help`."""

from bench.run import main

main()
