from chainguard_identity_operator.cli import main

raise SystemExit(main())
