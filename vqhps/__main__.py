from vqhps.cli import main

raise SystemExit(main())
