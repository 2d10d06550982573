"""Allow ``python -m norga``."""

from norga.cli import main

raise SystemExit(main())
