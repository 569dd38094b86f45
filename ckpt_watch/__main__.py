"""Entry point for ``python -m ckpt_watch``."""

from ckpt_watch.cli import main

main()
