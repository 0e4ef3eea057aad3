"""One module per subcommand: a library function ``run(...)`` and a thin Typer ``cli(...)``."""
