"""`python -m codiemb_pl ...` is the same as `codiemb ...`."""

from .cli import console_main

console_main()
