from deepcut_fast.cli import main

raise SystemExit(main())
