"""``python -m ztunnel.ctl``: the same as ``ztunnel-ctl``."""

from ztunnel.ctl.cli import main

raise SystemExit(main())
