"""`python -m tltool.cli`: the same program as `tltool`."""

from tltool.cli import main

main()
