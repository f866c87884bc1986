"""`python -m pairdots_server.cli`: the `pairdots` command."""

from pairdots_server.cli.main import main

raise SystemExit(main())
