from axion.cli import main

raise SystemExit(main())
