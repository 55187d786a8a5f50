"""`python -m grail_pipeline` runs the command line."""

from grail_pipeline.cli.main import main

raise SystemExit(main())
