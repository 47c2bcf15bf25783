"""`python -m entclip` and `accelerate launch -m entclip ...`."""

from entclip.cli import main

main()
