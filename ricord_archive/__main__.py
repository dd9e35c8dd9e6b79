from ricord_archive.cli import main

raise SystemExit(main())
