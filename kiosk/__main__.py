"""`python -m kiosk` is the `kiosk` console script."""

from kiosk.cli import main

raise SystemExit(main())
