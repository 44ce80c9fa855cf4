try:  # Ctrl-C while the CLI loads (typer, rich: a tenth of a second) is a clean 130 too
    from .cli import main
except KeyboardInterrupt:
    raise SystemExit(130) from None

raise SystemExit(main())
