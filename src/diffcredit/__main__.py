"""``python -m diffcredit``: the ``diffcredit`` command."""

from diffcredit.cli import main

raise SystemExit(main())
