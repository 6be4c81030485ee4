from avn_study.cli.commands import main

raise SystemExit(main())
