from vcm.cli import main

raise SystemExit(main())
