from avn_study.cli import main

raise SystemExit(main())
