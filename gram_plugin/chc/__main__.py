"""``python -m gram_plugin.chc``: the same as ``gram-plugin chc``."""

import sys

from .command import cli_main

sys.exit(cli_main(sys.argv[1:]))
