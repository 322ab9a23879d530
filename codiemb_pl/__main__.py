"""`python -m codiemb_pl ...` is the same as `codiemb ...`."""

from codiemb_pl.cli.main import console_main

console_main()
